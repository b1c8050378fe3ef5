"""GPU suite: the real FLUX.1-Kontext and Qwen-Image(-Edit) transformers at their published sizes (the
``architecture:`` of ``configs/model/flux_kontext_dev.yaml`` and ``qwen_image_edit.yaml``), with random weights
(nothing is downloaded), trained by ``EditR1Module.training_step`` at 512², LoRA r 32, activation checkpointing
off and on.

For each model and checkpointing setting it prints: NFT step time and a flow-matching step on the same samples
(P1 on the accelerator), the time of one group's rollout (K edits, 6 DPM-Solver++ steps, transformer only), MFU =
model FLOPs of the step / (step time × the GPU's peak bf16 rate), and the peak memory of an NFT step against what
``editr1 plan`` predicts for it (the same code: the step simulated on the meta device, plus the weights and LoRA
state). FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward without gradient and
one forward + backward of a micro-batch; the step's FLOPs are then rounds × micro-batches × (2 forwards + 1
forward/backward) with the KL term (1 + 1 without it). Then ``--fit-steps`` optimiser steps of a real
``editr1 fit`` of the paper's configuration (FLUX.1-Kontext at its real size with random weights, the tiny judge,
synthetic scenes; ``--fit-groups`` prompts a step instead of 24).

Only the transformer runs in the step measurements: the condition (prompt embeddings, source-image latents) is
random with the real shapes; the text encoders and the VAE run once per prompt and are not part of a training step.

    python benchmarks/gpu_perf.py                       # both models, bf16 weights, LoRA r32, checkpointing off and on
    python benchmarks/gpu_perf.py --only flux --checkpointing on --micro-batch 4
    python benchmarks/gpu_perf.py --device cpu --preset tiny   # check the script's logic on a CPU (tests do)

Without a CUDA device (and without ``--device cpu``) it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

# Peak dense bf16 tensor rates (FLOP/s) by device-name substring; --peak-tflops overrides.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = {"flux": "flux_kontext_dev.yaml", "qwen": "qwen_image_edit.yaml"}
# Stand-ins for --preset tiny (a CPU check of the script); the real sizes are read from the model configs.
TINY = {
    "flux": dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "qwen": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ),
}  # fmt: skip


def transformer_sizes(name: str, preset: str) -> dict:
    """The transformer's config keys: the model config's ``architecture.transformer`` (real) or the stand-in."""
    if preset == "tiny":
        return dict(TINY[name])
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "model" / MODEL_CONFIGS[name]).read_text())
    return dict(cfg["model"]["policy"]["init_args"]["architecture"]["transformer"])


def build_policy(name: str, preset: str, resolution: int, device: str, dtype: torch.dtype):
    """The editr1 policy class around a randomly initialised transformer (no VAE, no text encoders)."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel, QwenImageTransformer2DModel

    from editr1.policies.base import EditPolicy
    from editr1.policies.flux_kontext import FLUX_SCHEDULER_CONFIG, FluxKontextPolicy
    from editr1.policies.qwen_image_edit import QWEN_SCHEDULER_CONFIG, QwenImageEditPolicy

    cls, model_cls, sched = {
        "flux": (FluxKontextPolicy, FluxTransformer2DModel, FLUX_SCHEDULER_CONFIG),
        "qwen": (QwenImageEditPolicy, QwenImageTransformer2DModel, QWEN_SCHEDULER_CONFIG),
    }[name]
    from editr1.dtypes import default_dtype

    with default_dtype(dtype), torch.device(device):  # in the target dtype: no float32 copy of 20 B weights
        transformer = model_cls(**transformer_sizes(name, preset)).eval().requires_grad_(False)
    policy = cls.__new__(cls)
    EditPolicy.__init__(policy, resolution, resolution)
    policy.transformer = transformer
    # sigmas() reads the scheduler config; example_condition() the pipeline's position ids
    policy.pipe = SimpleNamespace(
        scheduler=SimpleNamespace(config=sched), _prepare_latent_image_ids=FluxKontextPipeline._prepare_latent_image_ids
    )
    policy.vae_scale_factor = 8
    policy.latent_h = policy.latent_w = resolution // 8
    policy.latent_channels = 16
    policy.guidance_scale = 2.5
    policy.variant = "edit"
    policy.max_sequence_length = 512
    policy.condition_hw = (resolution, resolution)
    return policy


def step_data(module, cond, groups: int, k: int, steps: int):
    from editr1.algorithms.grouping import GroupDecision
    from editr1.training.experience import Experience
    from editr1.training.rollout import Rollout

    policy = module.policy
    device = policy.device
    g = torch.Generator(device).manual_seed(1)
    x0 = torch.randn(groups * k, *policy.latent_shape(), generator=g, device=device)
    ro = Rollout(
        prompts=["p"] * groups,
        requirements=[""] * groups,
        keys=[f"k{i}" for i in range(groups)],
        sources=torch.zeros(groups, 3, 1, 1),
        targets=None,
        cond=cond,
        x0=x0,
        edits=torch.zeros(groups * k, 3, 1, 1),
        sigmas=policy.sigmas(steps),
        group_size=k,
        index=0,
        base_seed=int(module.seed),
    )
    rewards = torch.rand(groups, k)
    mask = torch.ones(groups, k, dtype=torch.bool)
    decision = GroupDecision(
        r=torch.rand(groups, k),
        train_mask=mask,
        dropped_low_variance=~mask[:, 0],
        dropped_nan=~mask[:, 0],
        mean=rewards.mean(1),
        std=rewards.std(1),
    )
    return Experience(ro, rewards, decision)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def make_module(name: str, args, device: str, checkpointing: bool):
    from editr1.module import EditR1Module, EfficiencySettings, NFTSettings
    from editr1.policies.lora import LoraSettings

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    policy = build_policy(name, args.preset, args.resolution, device, dtype)
    eff = EfficiencySettings(
        activation_checkpointing=checkpointing, compile=args.compile, autocast="bf16" if args.autocast else "no"
    )
    with torch.device(device) if device == "meta" else contextlib.nullcontext():
        return EditR1Module(
            policy=policy,
            lora=LoraSettings(rank=32, alpha=64.0),
            nft=NFTSettings(micro_batch_size=args.micro_batch, kl_weight=args.kl_weight),
            seed=1,
            efficiency=eff,
        )


def planned_peak(name: str, args, checkpointing: bool, data_bytes: int) -> tuple[int, int]:
    """``editr1 plan``'s prediction for this step on one process: (everything held, the step's own peak)."""
    from editr1.planning.command import model_sizes
    from editr1.planning.estimate import Parallel, per_device
    from editr1.planning.trace import training_peak_bytes

    meta = make_module(name, args, "meta", checkpointing)
    state = per_device(model_sizes(meta), Parallel(), "adamw")
    mb = min(args.micro_batch, args.groups * args.group_size)
    step = training_peak_bytes(meta.policy, mb, args.text_tokens, kl=args.kl_weight > 0)
    return state.total + data_bytes + step, step


def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.2f} MiB"


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_model(name: str, args) -> None:
    from editr1.planning.measure import peak_bytes
    from editr1.policies import lora
    from editr1.sampling import sample
    from perf_common import detach_from_trainer, fm_step, nft_step, timed

    device = args.device
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    module = make_module(name, args, device, settings[0])
    policy = module.policy
    detach_from_trainer(module)
    n_params = sum(p.numel() for n, p in policy.transformer.named_parameters() if "lora_" not in n)
    lora_params = sum(p.numel() for p in policy.trainable_parameters())
    cond = policy.example_condition(args.groups, args.text_tokens, device=device)
    data = step_data(module, cond, args.groups, args.group_size, args.steps)
    data_bytes = _tensor_bytes(data.rollout.x0, *cond.tensors.values())
    built = time.perf_counter() - t0
    seq = policy.latent_shape()[0]
    print(
        f"\n== {name} ({args.preset}): transformer {n_params / 1e9:.2f} B parameters ({args.dtype}), LoRA r32 "
        f"{lora_params / 1e6:.1f} M; {args.resolution}² = {seq} image + {seq} condition + {args.text_tokens} text "
        f"tokens; {args.groups} group(s) x {args.group_size}, micro-batch {args.micro_batch}, "
        f"{int(0.99 * args.steps)} trained timestep(s); compile {args.compile}, autocast {args.autocast}  "
        f"(built in {built:.0f} s)"
    )

    # FLOPs of one micro-batch: forward without gradient, forward + backward
    mb = min(args.micro_batch, args.groups * args.group_size)
    x = data.rollout.x0[:mb]
    t = torch.full((mb,), 0.5, device=device)
    c = cond.select(data.rollout.group_index[:mb])

    def fwd():
        with torch.no_grad():
            policy.velocity(x, t, c)

    def fwd_bwd():
        policy.velocity(x, t, c).float().square().mean().backward()

    f_flops, fb_flops = count_flops(fwd), count_flops(fwd_bwd)
    module.optimizers().zero_grad(set_to_none=True)
    n = args.groups * args.group_size
    chunks = -(-n // args.micro_batch)
    rounds = int(0.99 * args.steps)
    forwards = 2 if args.kl_weight > 0 else 1
    step_flops = rounds * chunks * (forwards * f_flops + fb_flops)
    fm_flops = rounds * chunks * fb_flops
    peak_rate = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak_rate is None and cuda:
        gpu = torch.cuda.get_device_name()
        peak_rate = next((v for key, v in PEAK_BF16.items() if key in gpu), None)
    print(
        f"  forward (no grad) {f_flops / 1e12:.3g} TFLOP, forward+backward {fb_flops / 1e12:.3g} TFLOP per "
        f"micro-batch of {mb}; NFT step {step_flops / 1e12:.3g} TFLOP, FLOP ratio NFT / flow matching "
        f"{step_flops / fm_flops:.2f}x"
    )

    for checkpointing in settings:
        transformer = policy.transformer
        transformer.enable_gradient_checkpointing() if checkpointing else transformer.disable_gradient_checkpointing()
        for _ in range(args.warmup):
            nft_step(module, data)
            fm_step(module, data)
        module.optimizers().zero_grad(set_to_none=True)
        held = torch.cuda.memory_allocated(device) if cuda else None
        step_peak = peak_bytes(lambda: nft_step(module, data), device)
        nft_t, fm_t = [], []
        for _ in range(args.repeats):
            nft_t.append(timed(lambda: nft_step(module, data)))
            fm_t.append(timed(lambda: fm_step(module, data)))
        best_nft, best_fm = min(nft_t), min(fm_t)
        planned, planned_step = planned_peak(name, args, checkpointing, data_bytes)
        print(f"  -- activation checkpointing {'on' if checkpointing else 'off'}")
        print(
            f"  NFT step {best_nft:.3f} s, flow-matching step {best_fm:.3f} s: ratio {best_nft / best_fm:.2f}x "
            f"(target <= 1.7x); {step_flops / best_nft / 1e12:.3g} TFLOP/s"
        )
        if peak_rate:
            print(
                f"  MFU: NFT step {step_flops / best_nft / peak_rate:.1%}, flow-matching step "
                f"{fm_flops / best_fm / peak_rate:.1%} (peak {peak_rate / 1e12:.0f} TFLOP/s bf16; target >= 35%)"
            )
        else:
            print("  MFU: unknown peak rate for this device (give --peak-tflops)")
        print(
            f"  the NFT step's own peak (above what was held before it): measured {_size(step_peak)}, "
            f"editr1 plan {_size(planned_step)} ({planned_step / step_peak - 1:+.1%})"
        )
        if held is not None:
            measured = held + step_peak
            print(
                f"  peak memory of the NFT step: measured {_size(measured)}, editr1 plan "
                f"{_size(planned)} ({planned / measured - 1:+.1%}; target within 15%)"
            )

    # one group's rollout: K samples, 6 DPM-Solver++ steps, one batch, θ_old active
    k = args.group_size
    noise = torch.randn(k, *policy.latent_shape(), device=device)
    cg = cond.select([0] * k)

    def rollout():
        with torch.no_grad(), policy.adapter(lora.OLD):
            sample(lambda xx, tt: policy.velocity(xx, tt, cg), noise, policy.sigmas(6), "dpmpp_2m")

    rollout()
    ro_t = min(timed(rollout) for _ in range(args.repeats))
    print(f"  rollout of one group (K = {k}, 6 DPM-Solver++ steps, one batch): {ro_t:.3f} s")


def fit_command(args, out_dir: Path) -> list[str]:
    """``editr1 fit`` of the paper's configuration with random weights (real-size FLUX.1-Kontext from its
    ``architecture``) and the tiny judge; the tiny demo model with ``--preset tiny``."""
    configs = ROOT / "configs"
    if args.preset == "real":
        files = ["demo.yaml", "model/flux_kontext_dev.yaml", "reward/tiny_local.yaml", "trainer/gpu.yaml"]
        extra = ["--model.policy.init_args.pretrained_model_name_or_path=null"]
    else:
        files = ["demo.yaml", "demo_smoke.yaml", "reward/tiny_local.yaml", "trainer/cpu.yaml"]
        extra = []
    cmd = [sys.executable, "-m", "editr1", "fit"]
    for f in files:
        cmd += ["-c", str(configs / f)]
    return (
        cmd
        + extra
        + [
            f"--data.batch_size={args.fit_groups}",
            f"--trainer.max_steps={args.fit_steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={out_dir}",
            "--trainer.logger.init_args.name=gpu_perf_fit",
        ]
    )


def run_fit(args) -> None:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cmd = fit_command(args, Path(d))
        print(f"\n== editr1 fit, {args.fit_steps} step(s), {args.fit_groups} group(s) a step:\n   {' '.join(cmd)}")
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        tail = [line for line in out.stdout.splitlines() if "editr1 run summary" in line]
        print(f"  exit status {out.returncode} after {wall:.0f} s; {tail[-1] if tail else out.stderr[-1500:]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["flux", "qwen"], choices=["flux", "qwen"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="real", choices=["real", "tiny"])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--text-tokens", type=int, default=512, help="prompt-embedding tokens per prompt")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of the frozen weights")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=4, help="K (the rollout measurement uses the same K)")
    ap.add_argument("--steps", type=int, default=3, help="rollout steps; trained timesteps = ⌊0.99·steps⌋")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--kl-weight", type=float, default=1e-4)
    ap.add_argument("--checkpointing", default="both", choices=["off", "on", "both"], help="activation checkpointing")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (useful with --dtype fp32)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--fit-steps", type=int, default=2, help="steps of the real editr1 fit run (0: skip it)")
    ap.add_argument("--fit-groups", type=int, default=2, help="prompts a step of that run (the paper: 24)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_perf.py: no CUDA device here; nothing measured (use --device cpu --preset tiny to check the script)")
        return
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.only:
        run_model(name, args)  # its model is freed when it returns
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.fit_steps > 0:
        run_fit(args)


if __name__ == "__main__":
    main()
