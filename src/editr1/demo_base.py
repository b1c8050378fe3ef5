"""Pretrain the demo's supervised base model from scratch on synthetic scenes, on a CPU.

Real diffusers/transformers classes throughout (AutoencoderKL, FluxTransformer2DModel, CLIP and T5
text encoders) at small sizes. Two stages, each a fixed number of steps so the result is reproducible:

1. the VAE, as a near-lossless autoencoder of scene images (its latents are then normalised:
   ``shift_factor`` / ``scaling_factor`` from their mean and std);
2. supervised flow matching of the transformer and both text encoders on (source, instruction,
   target) triples of the ``train`` split (held-out shape/colour pairs never appear), VAE frozen.

The weights go to one safetensors file that ``TinyFlux(weights=...)`` loads. Run::

    python -m editr1.demo_base --out data/demo_base

and see ``data/demo_base/README.md`` for what the shipped base was trained with and how it scores.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from editr1.algorithms.flow_matching import flow_matching_loss
from editr1.algorithms.timesteps import continuous_timesteps
from editr1.data.scenes import SceneConfig, make_example
from editr1.evaluation.scenes import evaluate_scenes
from editr1.images import to_tensor_images
from editr1.policies.flux_kontext import FluxKontextPolicy, TinyFlux
from editr1.policies.tiny import TinyTextConfig
from editr1.seeding import derive_seed

DEMO_SCENES = SceneConfig(size=32, holdout=["circle:yellow", "square:magenta", "triangle:cyan"])
DEMO_TINY = TinyFlux(
    heads=4,
    head_dim=32,
    layers=2,
    single_layers=2,
    vae_channels=[16, 32],
    latent_channels=8,
    text=TinyTextConfig(clip_hidden=64, clip_layers=1, clip_max_length=64, t5_hidden=64, t5_layers=2, heads=2),
)
MAX_SEQUENCE_LENGTH = 16


def scene_batch(config: SceneConfig, split: str, seeds: list[int]) -> dict:
    examples = [make_example(s, config, split) for s in seeds]
    size = config.size
    return {
        "source": to_tensor_images([e["image"] for e in examples], size, size),
        "target": to_tensor_images([e["target"] for e in examples], size, size),
        "prompt": [e["prompt"] for e in examples],
        "task": [e["task"] for e in examples],
    }


# ------------------------------------------------------------------------------------------- VAE
def train_vae(
    policy: FluxKontextPolicy, steps: int, batch: int = 32, lr: float = 5e-3, seed: int = 0, log=print
) -> dict:
    """Train the VAE as a deterministic autoencoder of scene images (the posterior mode is decoded,
    as ``encode_images`` uses it), then normalise its latents."""
    vae = policy.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start = time.perf_counter()
    for step in range(steps):
        seeds = [derive_seed(seed, 11, step, i) % 10_000_000 for i in range(batch // 2)]
        b = scene_batch(DEMO_SCENES, "train", seeds)
        x = torch.cat([b["source"], b["target"]]) * 2 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = F.mse_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step:5d}  mse {loss.item():.5f}  {time.perf_counter() - start:.0f}s")
    vae.eval().requires_grad_(False)
    # Normalise the latents to zero mean and unit std, as FLUX's VAE does with its own constants.
    b = scene_batch(DEMO_SCENES, "train", list(range(20_000_000, 20_000_256)))
    with torch.no_grad():
        z = vae.encode(torch.cat([b["source"], b["target"]]) * 2 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return {"vae_steps": steps, "vae_seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------- editor
def train_editor(
    policy: FluxKontextPolicy,
    steps: int,
    batch: int = 32,
    lr: float = 1e-3,
    warmup: int = 200,
    seed: int = 0,
    eval_every: int = 0,
    log=print,
) -> dict:
    """Supervised flow matching of the transformer and the text encoders (VAE frozen)."""
    modules = [policy.transformer, policy.text_encoder, policy.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.perf_counter()
    history = []
    for step in range(steps):
        seeds = [derive_seed(seed, 12, step, i) % 10_000_000 for i in range(batch)]
        b = scene_batch(DEMO_SCENES, "train", seeds)
        g = torch.Generator().manual_seed(derive_seed(seed, 13, step))
        with torch.no_grad():
            x0 = policy.encode_images(b["target"])
        cond = policy.condition(b["source"], b["prompt"])
        t = continuous_timesteps(torch.rand(batch, generator=g), "logit_normal")
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
        loss = flow_matching_loss(policy.velocity(x_t, t, cond), eps, x0).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(
                f"edit step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.perf_counter() - start:.0f}s"
            )
        if eval_every and (step + 1) % eval_every == 0:
            r = evaluate(policy, "heldout", count=64)
            history.append({"step": step + 1, **r})
            log(f"  held-out reward {r['mean']:.3f} (identity {r['identity']:.3f}, ceiling {r['ceiling']:.3f})")
            for m in modules:
                m.requires_grad_(True)
    for m in modules:
        m.eval().requires_grad_(False)
    return {"editor_steps": steps, "editor_seconds": time.perf_counter() - start, "history": history}


# ------------------------------------------------------------------------------------------- evaluation
def evaluate(policy: FluxKontextPolicy, split: str = "heldout", count: int = 64) -> dict:
    """Held-out scene reward (Euler, 8 steps, one edit per prompt), identity baseline and ceiling."""
    return evaluate_scenes(policy, DEMO_SCENES, split, count).summary()


def shipped_base() -> FluxKontextPolicy:
    """The shipped base (``asset:demo_base/model.safetensors``) as configs/demo.yaml builds it, frozen."""
    import dataclasses

    base = FluxKontextPolicy(
        tiny=dataclasses.replace(DEMO_TINY, weights="asset:demo_base/model.safetensors"),
        resolution=DEMO_SCENES.size,
        guidance_scale=2.5,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        torch_dtype="float32",
    )
    return base.requires_grad_(False)


# ------------------------------------------------------------------------------------------- saving
def save(policy: FluxKontextPolicy, out: Path, tiny: TinyFlux, metrics: dict) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for k, v in getattr(policy, name).state_dict().items():
            state[f"{name}.{k}"] = v.detach().contiguous().clone()
    vae_cfg = policy.vae.config
    meta = {"shift_factor": str(vae_cfg.shift_factor), "scaling_factor": str(vae_cfg.scaling_factor)}
    path = out / "model.safetensors"
    save_file(state, str(path), metadata=meta)
    (out / "metrics.json").write_text(json.dumps({"tiny": asdict(tiny), **metrics}, indent=2) + "\n")
    return path


def load_vae(policy: FluxKontextPolicy, path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        state = {k[len("vae.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("vae.")}  # noqa: SIM118 - safe_open has no __iter__
        meta = f.metadata()
    policy.vae.load_state_dict(state)
    policy.vae.register_to_config(
        shift_factor=float(meta["shift_factor"]), scaling_factor=float(meta["scaling_factor"])
    )


@dataclass
class PretrainOptions:
    """The options of ``python -m editr1.demo_base``.

    Args:
        out: output folder (model.safetensors and metrics.json).
        vae_steps: optimiser steps of stage 1, the VAE.
        editor_steps: optimiser steps of stage 2, the transformer and both text encoders.
        batch: (source, instruction, target) examples per editor step.
        lr: the editor's peak learning rate.
        seed: seeds the initial weights and every batch.
        threads: CPU threads for torch.
        eval_every: a held-out evaluation every this many editor steps (0: none).
        vae_from: reuse the VAE of an earlier model.safetensors (skips stage 1).
        eval_count: prompts per split in the final evaluation.
    """

    out: str = "data/demo_base"
    vae_steps: int = 3000
    editor_steps: int = 6000
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2
    eval_every: int = 2000
    vae_from: str | None = None
    eval_count: int = 128


def main(argv: list[str] | None = None) -> None:
    from editr1.cli import function_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    args = function_cli(PretrainOptions, argv, "python -m editr1.demo_base", description=__doc__)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tiny = DEMO_TINY
    policy = FluxKontextPolicy(resolution=DEMO_SCENES.size, max_sequence_length=MAX_SEQUENCE_LENGTH, tiny=tiny)
    metrics: dict = {"command": "python -m editr1.demo_base " + " ".join(argv)}
    if args.vae_from:
        load_vae(policy, args.vae_from)
        metrics["vae_from"] = args.vae_from
    else:
        metrics.update(train_vae(policy, args.vae_steps, seed=args.seed))
    metrics["after_vae"] = evaluate(policy, "heldout", min(64, args.eval_count))
    print("after the VAE stage:", metrics["after_vae"])
    metrics.update(
        train_editor(
            policy, args.editor_steps, batch=args.batch, lr=args.lr, seed=args.seed, eval_every=args.eval_every
        )
    )
    for split in ("heldout", "unseen"):
        metrics[split] = evaluate(policy, split, args.eval_count)
        print(split, metrics[split])
    path = save(policy, Path(args.out), tiny, metrics)
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
