"""GPU suite: the real FLUX.1-Kontext and Qwen-Image(-Edit) transformers at their published sizes, with
random weights (nothing is downloaded), trained by ``EditR1Module.training_step`` at 512².

For each model it prints: NFT step time and a flow-matching step on the same samples (P1 on the
accelerator), the time of one group's rollout (K edits, 6 DPM-Solver++ steps, transformer only), peak
GPU memory of the step, and MFU = model FLOPs of the step / (step time × the GPU's peak bf16 rate).
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward without gradient and
one forward + backward of a micro-batch; the step's FLOPs are then rounds × micro-batches × (2 forwards
+ 1 forward/backward) with the KL term (1 + 1 without it).

Only the transformer runs: the condition (prompt embeddings, source-image latents) is random with the
real shapes; the text encoders and the VAE run once per prompt and are not part of a training step.

    python benchmarks/gpu_perf.py                       # both models, bf16 weights, LoRA r32
    python benchmarks/gpu_perf.py --only flux --checkpointing --micro-batch 4
    python benchmarks/gpu_perf.py --device cpu --preset tiny   # check the script's logic on a CPU

Without a CUDA device (and without ``--device cpu``) it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
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

# Published architecture sizes (diffusers configs of FLUX.1-Kontext-dev and Qwen-Image-Edit) and a tiny
# stand-in of each for --preset tiny.
ARCH = {
    "flux": {
        "real": dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        "tiny": dict(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    },
    "qwen": {
        "real": dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            axes_dims_rope=(16, 56, 56),
        ),
        "tiny": dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
    },
}


def build_policy(name: str, preset: str, resolution: int, device: str, dtype: torch.dtype):
    """The editr1 policy class around a randomly initialised transformer (no VAE, no text encoders)."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    from editr1.policies.base import EditPolicy
    from editr1.policies.flux_kontext import FLUX_SCHEDULER_CONFIG, FluxKontextPolicy
    from editr1.policies.qwen_image_edit import QWEN_SCHEDULER_CONFIG, QwenImageEditPolicy

    cls, model_cls, sched = {
        "flux": (FluxKontextPolicy, FluxTransformer2DModel, FLUX_SCHEDULER_CONFIG),
        "qwen": (QwenImageEditPolicy, QwenImageTransformer2DModel, QWEN_SCHEDULER_CONFIG),
    }[name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype: no float32 copy of 20 B weights
    try:
        with torch.device(device):
            transformer = model_cls(**ARCH[name][preset]).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    policy = cls.__new__(cls)
    EditPolicy.__init__(policy, resolution, resolution)
    policy.transformer = transformer
    policy.pipe = SimpleNamespace(scheduler=SimpleNamespace(config=sched))  # sigmas() reads the scheduler config
    policy.vae_scale_factor = 8
    policy.latent_h = policy.latent_w = resolution // 8
    policy.latent_channels = 16
    policy.guidance_scale = 2.5
    policy.variant = "edit"
    return policy


def random_condition(name: str, policy, groups: int, text_tokens: int, device: str):
    from editr1.policies.base import Condition

    g = torch.Generator(device).manual_seed(0)
    cfg = policy.transformer.config
    seq, ch = policy.latent_shape()
    image_latents = torch.randn(groups, seq, ch, generator=g, device=device)
    embeds = torch.randn(groups, text_tokens, cfg.joint_attention_dim, generator=g, device=device)
    if name == "flux":
        from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline

        ids = FluxKontextPipeline._prepare_latent_image_ids(
            1, policy.latent_h // 2, policy.latent_w // 2, device, torch.float32
        )
        image_ids = ids.clone()
        image_ids[..., 0] = 1
        return Condition(
            {
                "prompt_embeds": embeds,
                "pooled": torch.randn(groups, cfg.pooled_projection_dim, generator=g, device=device),
                "image_latents": image_latents,
            },
            {"text_ids": torch.zeros(text_tokens, 3, device=device), "img_ids": torch.cat([ids, image_ids])},
        )
    mask = torch.ones(groups, text_tokens, dtype=torch.long, device=device)
    return Condition(
        {"prompt_embeds": embeds, "prompt_mask": mask, "image_latents": image_latents}, {"num_images": torch.tensor(1)}
    )


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


def run_model(name: str, args) -> None:
    from editr1.module import EditR1Module, EfficiencySettings, NFTSettings
    from editr1.policies import lora
    from editr1.policies.lora import LoraSettings
    from editr1.sampling import sample
    from perf_common import detach_from_trainer, fm_step, nft_step, timed

    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t0 = time.perf_counter()
    policy = build_policy(name, args.preset, args.resolution, device, dtype)
    n_params = sum(p.numel() for p in policy.transformer.parameters())
    eff = EfficiencySettings(
        activation_checkpointing=args.checkpointing, compile=args.compile, autocast="bf16" if args.autocast else "no"
    )
    module = EditR1Module(
        policy=policy,
        lora=LoraSettings(rank=32, alpha=64.0),
        nft=NFTSettings(micro_batch_size=args.micro_batch, kl_weight=args.kl_weight),
        seed=1,
        efficiency=eff,
    )
    detach_from_trainer(module)
    lora_params = sum(p.numel() for p in policy.trainable_parameters())
    cond = random_condition(name, policy, args.groups, args.text_tokens, device)
    data = step_data(module, cond, args.groups, args.group_size, args.steps)
    built = time.perf_counter() - t0
    seq = policy.latent_shape()[0]
    print(
        f"\n== {name} ({args.preset}): transformer {n_params / 1e9:.2f} B parameters ({args.dtype}), LoRA r32 "
        f"{lora_params / 1e6:.1f} M; {args.resolution}² = {seq} image + {seq} condition + {args.text_tokens} text "
        f"tokens; {args.groups} group(s) x {args.group_size}, micro-batch {args.micro_batch}, "
        f"{args.steps - 1} trained timesteps; checkpointing {args.checkpointing}, compile {args.compile}, "
        f"autocast {args.autocast}  (built in {built:.0f} s)"
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

    for _ in range(args.warmup):
        nft_step(module, data)
        fm_step(module, data)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    nft_t, fm_t = [], []
    for _ in range(args.repeats):
        nft_t.append(timed(lambda: nft_step(module, data)))
        fm_t.append(timed(lambda: fm_step(module, data)))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    # one group's rollout: K samples, 6 DPM-Solver++ steps, one batch, θ_old active
    k = args.group_size
    noise = torch.randn(k, *policy.latent_shape(), device=device)
    cg = cond.select([0] * k)

    def rollout():
        with torch.no_grad(), policy.adapter(lora.OLD):
            sample(lambda xx, tt: policy.velocity(xx, tt, cg), noise, policy.sigmas(6), "dpmpp_2m")

    rollout()
    ro_t = min(timed(rollout) for _ in range(args.repeats))

    peak_rate = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak_rate is None and cuda:
        gpu = torch.cuda.get_device_name()
        peak_rate = next((v for key, v in PEAK_BF16.items() if key in gpu), None)
    best_nft, best_fm = min(nft_t), min(fm_t)
    print(
        f"  NFT step {best_nft:.3f} s, flow-matching step {best_fm:.3f} s: ratio {best_nft / best_fm:.2f}x "
        f"(target <= 1.7x); FLOP ratio {step_flops / fm_flops:.2f}x"
    )
    print(
        f"  forward (no grad) {f_flops / 1e12:.3g} TFLOP, forward+backward {fb_flops / 1e12:.3g} TFLOP per "
        f"micro-batch of {mb}; NFT step {step_flops / 1e12:.3g} TFLOP -> {step_flops / best_nft / 1e12:.3g} TFLOP/s"
    )
    if peak_rate:
        print(
            f"  MFU: NFT step {step_flops / best_nft / peak_rate:.1%}, flow-matching step "
            f"{fm_flops / best_fm / peak_rate:.1%} (peak {peak_rate / 1e12:.0f} TFLOP/s bf16)"
        )
    else:
        print("  MFU: unknown peak rate for this device (give --peak-tflops)")
    print(f"  peak memory of the training steps: {peak:.1f} GiB")
    print(f"  rollout of one group (K = {k}, 6 DPM-Solver++ steps, one batch): {ro_t:.3f} s")


def main() -> None:
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
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (useful with --dtype fp32)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_perf.py: no CUDA device here; nothing measured (use --device cpu --preset tiny to check the script)")
        return
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.only:
        run_model(name, args)  # its model is freed when it returns
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
