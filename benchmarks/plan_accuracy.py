"""How close ``editr1 plan``'s simulated peaks are to measured ones, on the CPU: for tiny FLUX.1-Kontext and
Qwen-Image-Edit builds (2 heads × 32, 2 blocks of each kind, LoRA r 4) at several resolutions, with activation
checkpointing off and on, the peak of a real NFT training step (``module.training_step``, one micro-batch of 2,
after a first step so the optimiser's states exist) measured by torch's profiler, against the peak
``editr1.planning.trace.training_peak_bytes`` simulates for the same model built on the meta device.

    python benchmarks/plan_accuracy.py [--sizes 64 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from editr1.module import EditR1Module, EfficiencySettings, NFTSettings  # noqa: E402
from editr1.planning.measure import cpu_peak_bytes  # noqa: E402
from editr1.planning.trace import training_peak_bytes  # noqa: E402
from editr1.policies.flux_kontext import FluxKontextPolicy, TinyFlux  # noqa: E402
from editr1.policies.lora import LoraSettings  # noqa: E402
from editr1.policies.qwen_image_edit import QwenImageEditPolicy, TinyQwenImage  # noqa: E402
from perf_common import detach_from_trainer, nft_step, step_data  # noqa: E402


def module(kind: str, resolution: int, checkpointing: bool, device: str) -> EditR1Module:
    with torch.device(device):
        if kind == "flux":
            tiny = TinyFlux(heads=2, head_dim=32, layers=2, single_layers=2)
            policy = FluxKontextPolicy(resolution=resolution, tiny=tiny, max_sequence_length=16)
        else:
            tiny = TinyQwenImage(heads=2, head_dim=32, layers=2)
            policy = QwenImageEditPolicy(resolution=resolution, tiny=tiny, condition_resolution=56)
        return EditR1Module(
            policy=policy,
            lora=LoraSettings(rank=4, alpha=8.0),
            nft=NFTSettings(micro_batch_size=2, kl_weight=1e-4),
            seed=1,
            efficiency=EfficiencySettings(activation_checkpointing=checkpointing),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':<7}{'px':>5}{'ckpt':>6}{'measured MB':>13}{'simulated MB':>14}{'error':>8}")
    worst = 0.0
    for kind in ("flux", "qwen"):
        for res in args.sizes:
            for ckpt in (False, True):
                m = module(kind, res, ckpt, "cpu")
                detach_from_trainer(m)
                data = step_data(m, groups=1, k=2, steps=2)
                nft_step(m, data)
                measured = cpu_peak_bytes(lambda m=m, data=data: nft_step(m, data))
                meta = module(kind, res, ckpt, "meta")
                tokens = data.rollout.cond["prompt_embeds"].shape[1]
                simulated = training_peak_bytes(meta.policy, 2, tokens, kl=True)
                error = simulated / measured - 1
                worst = max(worst, abs(error))
                row = f"{kind:<7}{res:>5}{'on' if ckpt else 'off':>6}"
                print(f"{row}{measured / 1e6:13.2f}{simulated / 1e6:14.2f}{error:+8.1%}")
    print(f"largest error: {worst:.1%}")


if __name__ == "__main__":
    main()
