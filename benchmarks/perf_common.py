"""Shared pieces of the performance benchmarks (``perf.py``, ``scaling.py``, ``gpu_perf.py``).

The training step measured is ``EditR1Module.training_step`` itself, run outside a Trainer: the few
Trainer services it calls (``optimizers``, ``manual_backward``, ``log``) are replaced by their plain
equivalents (the optimizer from ``configure_optimizers``, ``loss.backward()``, no logging). Rollouts are
built from a real ``policy.encode`` of synthetic scenes and random clean latents: the step's cost does
not depend on the latents' values.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from editr1.algorithms.flow_matching import flow_matching_loss  # noqa: E402
from editr1.algorithms.grouping import GroupDecision  # noqa: E402
from editr1.algorithms.nft import add_noise  # noqa: E402
from editr1.algorithms.timesteps import train_timesteps  # noqa: E402
from editr1.module import EditR1Module  # noqa: E402
from editr1.seeding import TRAIN_NOISE, TRAIN_TIMESTEPS, per_sample_rand, per_sample_randn  # noqa: E402
from editr1.training.experience import Experience  # noqa: E402
from editr1.training.rollout import Rollout  # noqa: E402

# Transformer sizes. "small" is the "hidden 256": 4 heads x 64, with a VAE that downsamples 8x
# like the real ones (so 128 px images give 8 x 8 = 64 packed image tokens, as 512 px do in FLUX / 16).
SIZES = {
    "tiny": dict(heads=2, head_dim=16, layers=1, single_layers=1, vae_channels=[16, 32], latent_channels=4),
    "small": dict(heads=4, head_dim=64, layers=2, single_layers=4, vae_channels=[16, 16, 32, 32], latent_channels=16),
}


def flux_policy(size: str = "tiny", resolution: int = 32, seq: int = 16):
    from editr1.policies import FluxKontextPolicy, TinyFlux
    from editr1.policies.tiny import TinyTextConfig

    text = TinyTextConfig(clip_hidden=64, t5_hidden=64, heads=2) if size == "small" else TinyTextConfig()
    return FluxKontextPolicy(resolution=resolution, max_sequence_length=seq, tiny=TinyFlux(text=text, **SIZES[size]))


def scenes(n: int, size: int, seed: int = 0) -> tuple[list, list[str]]:
    """``n`` synthetic source images and instructions."""
    from editr1.data.scenes import SceneConfig, make_example

    cfg = SceneConfig(size=size)
    ex = [make_example(seed + i, cfg) for i in range(n)]
    return [e["image"] for e in ex], [e["prompt"] for e in ex]


def detach_from_trainer(module: EditR1Module) -> torch.optim.Optimizer:
    """Let ``training_step`` run without a Trainer; returns its optimizer."""
    module.setup("fit")
    cfg = module.configure_optimizers()
    opt = cfg["optimizer"] if isinstance(cfg, dict) else cfg
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None
    return opt


def step_data(
    module: EditR1Module, groups: int, k: int, steps: int, keep_groups: int | None = None, seed: int = 0
) -> Experience:
    """A rollout of ``groups`` prompts × ``k`` samples on ``steps`` σ's, with random rewards; the first
    ``keep_groups`` groups train (all by default), the others are dropped as low-variance."""
    policy = module.policy
    images, prompts = scenes(groups, policy.height, seed)
    sources = policy.preprocess(images)
    cond = policy.encode(sources, prompts)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((groups * k, *policy.latent_shape()), generator=g).to(policy.device)
    keys = [f"bench-{seed}-{i}" for i in range(groups)]
    ro = Rollout(
        prompts=prompts,
        requirements=[""] * groups,
        keys=keys,
        sources=sources,
        targets=None,
        cond=cond,
        x0=x0,
        edits=torch.zeros(groups * k, 3, 1, 1),
        sigmas=policy.sigmas(steps),
        group_size=k,
        index=0,
        base_seed=int(module.seed),
    )
    rewards = torch.rand(groups, k, generator=g)
    keep = groups if keep_groups is None else keep_groups
    dropped = torch.arange(groups) >= keep
    mask = (~dropped)[:, None].expand(groups, k).clone()
    r = torch.rand(groups, k, generator=g)
    decision = GroupDecision(
        r=r,
        train_mask=mask,
        dropped_low_variance=dropped,
        dropped_nan=torch.zeros(groups, dtype=torch.bool),
        mean=rewards.mean(1),
        std=rewards.std(1),
    )
    return Experience(ro, rewards, decision)


def nft_step(module: EditR1Module, data: Experience) -> float:
    out = module.training_step({"experience": data}, 0)
    return float(out)


def fm_step(module: EditR1Module, data: Experience) -> float:
    """A plain flow-matching (SFT) step on exactly what ``nft_step`` trains on: the same samples,
    micro-batches, timesteps, noise and condition rows; one forward with gradient per sample and
    timestep, towards ε − x0. Followed by the same clip + optimiser step."""
    ro, nft, policy = data.rollout, module.nft, module.policy
    idx = data.decision.train_mask.flatten().nonzero().squeeze(1).tolist()
    n = len(idx)
    train_sigmas = ro.sigmas[:-1]
    keys = per_sample_rand(train_sigmas.numel(), [ro.sample_seed(TRAIN_TIMESTEPS, i) for i in idx])
    ts = train_timesteps(nft.timesteps, train_sigmas, keys, nft.timestep_fraction, t_min=nft.t_min, t_max=nft.t_max)
    rounds = ts.shape[0]
    group_index = ro.group_index
    mb = nft.micro_batch_size
    total = 0.0
    for s in range(0, n, mb):
        sel = idx[s : s + mb]
        sel_t = torch.tensor(sel, device=module.device)
        cond = ro.cond.select(group_index[sel])
        x0 = ro.x0[sel_t]
        for j in range(rounds):
            t = ts[j, s : s + len(sel)].to(module.device)
            eps = per_sample_randn(x0.shape[1:], [ro.sample_seed(TRAIN_NOISE, i, j) for i in sel], module.device)
            x_t = add_noise(x0, eps, t)
            v = policy.velocity(x_t, t, cond)
            loss = flow_matching_loss(v, eps, x0)
            module.manual_backward(loss.sum() / (n * rounds))
            total += float(loss.detach().sum())
    module._clip_and_step(module.optimizers())
    module._update_shadow_adapters()
    return total / (n * rounds)


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Each case ``warmup`` times, then all cases in turn ``repeats`` times; seconds per run."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    return times


@contextmanager
def model_time(module: EditR1Module):
    """Seconds spent inside ``policy.velocity`` (forwards) and ``manual_backward`` (backward) while the
    block runs: ``acc["forward"]``, ``acc["backward"]``."""
    acc = {"forward": 0.0, "backward": 0.0}
    policy = module.policy
    velocity, backward = policy.velocity, module.manual_backward

    def timed_velocity(*a, **k):
        t0 = time.perf_counter()
        out = velocity(*a, **k)
        acc["forward"] += time.perf_counter() - t0
        return out

    def timed_backward(loss):
        t0 = time.perf_counter()
        backward(loss)
        acc["backward"] += time.perf_counter() - t0

    policy.velocity = timed_velocity
    module.manual_backward = timed_backward
    try:
        yield acc
    finally:
        del policy.velocity
        module.manual_backward = backward


def fmt_ratio(value: float, target: float, op: str) -> str:
    met = value <= target if op == "<=" else value >= target
    return f"{value:.2f}x (target {op} {target}x: {'met' if met else 'NOT met'})"
