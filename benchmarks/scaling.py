"""Scaling of the NFT training step: time per step against group size K, resolution and the number of
trained timesteps, one axis varied at a time from a common base point. Writes a PNG plot
(``docs/benchmarks_scaling.png``) and prints the table.

Each point is ``EditR1Module.training_step`` (see ``perf_common.py``), best of ``--repeats`` runs; the
points of an axis are measured interleaved, so machine noise hits them alike.

    python benchmarks/scaling.py [--quick] [--out docs/benchmarks_scaling.png]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from editr1.module import EditR1Module, NFTSettings  # noqa: E402
from editr1.policies.lora import LoraSettings  # noqa: E402
from perf_common import detach_from_trainer, flux_policy, interleaved, nft_step, step_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make(resolution: int, micro: int) -> EditR1Module:
    m = EditR1Module(
        policy=flux_policy("tiny", resolution),
        lora=LoraSettings(rank=32, alpha=64.0),
        nft=NFTSettings(micro_batch_size=micro),
        seed=1,
    )
    detach_from_trainer(m)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer points and repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_scaling.png"))
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    base = dict(k=4, res=32, timesteps=2)  # one group; timesteps = ⌊0.99 · steps⌋ with steps = timesteps + 1
    axes = {
        "group size K": ("k", [2, 4, 8] if args.quick else [2, 4, 8, 12, 16]),
        "resolution (px)": ("res", [32, 64] if args.quick else [32, 48, 64, 96, 128]),
        "trained timesteps": ("timesteps", [1, 2, 4] if args.quick else [1, 2, 3, 5, 8]),
    }
    print(
        f"tiny FLUX.1-Kontext (hidden 32, 1 + 1 blocks, VAE 2x), LoRA r32, one group, micro-batch 4, "
        f"{args.threads} thread(s); base point K={base['k']}, {base['res']}px, {base['timesteps']} timesteps"
    )
    t0 = time.perf_counter()
    results = {}
    modules: dict[int, EditR1Module] = {}
    for label, (key, values) in axes.items():
        cases = {}
        for v in values:
            p = {**base, key: v}
            m = modules.setdefault(p["res"], make(p["res"], micro=4))
            data = step_data(m, 1, p["k"], p["timesteps"] + 1)
            cases[v] = lambda m=m, data=data: nft_step(m, data)
        times = interleaved(cases, repeats)
        results[label] = {v: min(ts) for v, ts in times.items()}
        row = "  ".join(f"{v}: {t:.3f} s" for v, t in results[label].items())
        print(f"{label:18s} {row}")
        tokens = None
        if key == "res":
            tokens = {v: modules[v].policy.latent_shape()[0] for v in values}
            print(f"{'':18s} image tokens (x2 with the condition): {tokens}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (label, series) in zip(axs, results.items()):
        xs, ys = list(series), list(series.values())
        ax.plot(xs, ys, "o-", label="measured")
        if label == "resolution (px)":
            ref = [ys[0] * (x / xs[0]) ** 2 for x in xs]
            ax.plot(xs, ref, "--", color="grey", label="∝ pixels (from the first point)")
        else:
            ref = [ys[0] * x / xs[0] for x in xs]
            ax.plot(xs, ref, "--", color="grey", label="∝ x (from the first point)")
        ax.set_xlabel(label)
        ax.set_ylabel("s per training step")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"NFT training step, tiny FLUX.1-Kontext on {args.threads} CPU thread(s): "
        f"base K={base['k']}, {base['res']}px, {base['timesteps']} timesteps",
        fontsize=10,
    )
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
