"""Runs the demo's comparisons (several seeds each) and writes the table in docs/results.md.

Every arm is the default run (`editr1 fit`, configs/demo.yaml) with a few overrides; each run's
held-out evaluation (SceneEvaluation: 64 prompts x 2 edits per split, Euler, fixed seeds) is read
from its run folder. Runs go one after another (each uses both cores).

    python benchmarks/demo_results.py --seeds 0 1 2                # all arms, ~2 hours on 2 cores
    python benchmarks/demo_results.py --arms default euler --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARMS: dict[str, tuple[str, list[str]]] = {
    "default": ("Edit-R1 (DPM-Solver++ rollouts, paper filter, β = 1)", []),
    "no_filter": ("without group filtering", ["--reward.filter.rule=none"]),
    "beta_0.1": ("β = 0.1", ["--model.nft.beta=0.1"]),
    "euler": ("Euler rollouts (same number of steps)", ["--model.rollout.solver=euler"]),
    "sft": ("supervised LoRA (configs/sft_demo.yaml), same wall time", ["SFT"]),
}


def run(arm: str, seed: int, out_root: Path, sft_steps: int) -> dict:
    name = f"{arm}/seed{seed}"
    overrides = ARMS[arm][1]
    if overrides == ["SFT"]:
        args = ["fit", "-c", str(ROOT / "configs" / "sft_demo.yaml"), f"--trainer.max_steps={sft_steps}"]
    else:
        args = ["fit", *overrides]
    args += [
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={out_root}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=true",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "editr1", *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    run_dir = sorted((out_root / arm / f"seed{seed}").glob("version_*"))[-1]
    result = json.loads((run_dir / "scene_eval.json").read_text())
    result["wall_s"] = wall
    print(
        f"{name}: {wall:.0f}s  heldout {result['before']['heldout']['mean']:.3f} -> "
        f"{result['after']['heldout']['mean']:.3f}",
        flush=True,
    )
    return result


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    lines = [
        "| arm | runs | held-out after | change | unseen after | change |",
        "|---|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        ha = [r["after"]["heldout"]["mean"] for r in runs]
        hd = [r["after"]["heldout"]["mean"] - r["before"]["heldout"]["mean"] for r in runs]
        ua = [r["after"]["unseen"]["mean"] for r in runs]
        ud = [r["after"]["unseen"]["mean"] - r["before"]["unseen"]["mean"] for r in runs]
        seeds_run = ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        lines.append(
            f"| {ARMS[arm][0]} | seeds {seeds_run} | {mean_std(ha)} | {mean_std(hd)} | {mean_std(ua)} | "
            f"{mean_std(ud)} |"
        )
    first = next(iter(results.values()))[0]
    b = first["before"]
    lines.append("")
    lines.append(
        f"SFT base (before training, the same for every run): held-out {b['heldout']['mean']:.3f}, "
        f"unseen {b['unseen']['mean']:.3f}. Identity baseline (return the source): "
        f"{b['heldout']['identity']:.3f} / {b['unseen']['identity']:.3f}. Ceiling (VAE round trip of the "
        f"target): {b['heldout']['ceiling']:.3f} / {b['unseen']['ceiling']:.3f}. Seeds: {seeds}."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="runs/results", help="run folders")
    ap.add_argument("--json", default="runs/results/results.json", help="all figures, for the docs")
    ap.add_argument("--sft-steps", type=int, default=500, help="steps of the supervised arm (~ the demo's wall time)")
    ap.add_argument(
        "--table-only",
        nargs="*",
        default=None,
        metavar="JSON",
        help="print the table from these results files (merged) without running anything",
    )
    args = ap.parse_args()
    if args.table_only is not None:
        merged: dict[str, list[dict]] = {}
        for path in args.table_only or [args.json]:
            for arm, runs in json.loads((ROOT / path).read_text()).items():
                have = {r["seed"] for r in merged.get(arm, [])}
                merged.setdefault(arm, []).extend(r for r in runs if r["seed"] not in have)
        print(table({a: merged[a] for a in ARMS if a in merged}, args.seeds))
        return
    out_root = (ROOT / args.out).resolve()
    results: dict[str, list[dict]] = {}
    json_path = ROOT / args.json
    if json_path.is_file():
        results = json.loads(json_path.read_text())
    for arm in args.arms:
        for seed in args.seeds:
            done = [r for r in results.get(arm, []) if r.get("seed") == seed]
            if done:
                continue
            r = run(arm, seed, out_root, args.sft_steps)
            r["seed"] = seed
            results.setdefault(arm, []).append(r)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(results, indent=1))
    print(table({a: results[a] for a in args.arms if a in results}, args.seeds))


if __name__ == "__main__":
    main()
