"""Flow-GRPO (Liu et al., 2025): the SDE step with the flow ODE's marginals, its Gaussian log-probability,
the PPO-clipped ratio objective and the KL to the reference. Pure torch, no Lightning.

Written after ``sde_step_with_logprob`` and the training loop of the released code (yifan123/flow_grpo,
``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` and ``scripts/train_sd3.py``). Convention:
``x_σ = (1 − σ)·x0 + σ·ε``, the model returns ``v ≈ ε − x0``; a step goes from σ to σ_next < σ, so
``dt = σ_next − σ < 0``:

    std_t = a·sqrt(σ / (1 − σ))                     (σ = 1 → σ replaced by σ_max in the denominator)
    mean  = x·(1 + std_t²/(2σ)·dt) + v·(1 + std_t²·(1 − σ)/(2σ))·dt
    x_next = mean + std_t·sqrt(−dt)·ε
    log p(x_next) = mean over dimensions of log N(x_next; mean, (std_t·sqrt(−dt))²)

With ``a = 0`` the step is the Euler step of the ODE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SDEStep:
    """One SDE step: the next latent, its log-probability ``(B,)``, the step's mean and ``std_t`` ``(B, 1, …)``."""

    x_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std_t: torch.Tensor


@dataclass
class ClippedObjective:
    """Per-sample PPO-clipped loss ``(B,)``, the importance ratio and whether it lies outside ``1 ± clip``."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def _column(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a scalar or ``(B,)``) as float32 of shape ``(B, 1, …)`` broadcasting over ``like``."""
    v = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def sde_std(sigma: torch.Tensor, sigma_max: float, noise_level: float) -> torch.Tensor:
    """``std_t = a·sqrt(σ/(1 − σ))``; where σ = 1 the denominator uses ``σ_max`` (the released code passes the
    schedule's second σ) instead, so the first step of a schedule that starts at 1 is finite."""
    if not 0.0 <= sigma_max < 1.0:
        raise ValueError(f"sigma_max must be in [0, 1), got {sigma_max}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    guarded = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
    return noise_level * torch.sqrt(sigma / (1 - guarded))


def sde_mean(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, std_t: torch.Tensor) -> torch.Tensor:
    """The mean of the SDE step from σ to σ_next (σ, σ_next, std_t scalars or per sample)."""
    s, dt = _column(sigma, x), _column(sigma_next, x) - _column(sigma, x)
    std = _column(std_t, x)
    return x.float() * (1 + std**2 / (2 * s) * dt) + v.float() * (1 + std**2 * (1 - s) / (2 * s)) * dt


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, std²)`` averaged over every dimension but the first, shape ``(B,)``."""
    std = _column(std, mean) if std.ndim <= 1 else std
    lp = -((x.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(dim=1)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    *,
    sigma_max: float,
    noise_level: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> SDEStep:
    """One step from σ to σ_next: sample ``x_next = mean + std_t·sqrt(−dt)·noise`` (rollouts), or score a given
    ``x_next`` (training: its log-probability under the velocity ``v``). Computed in float32."""
    if (noise is None) == (x_next is None):
        raise ValueError("give exactly one of noise (to sample) and x_next (to score)")
    sig = _column(sigma, x)
    if bool((_column(sigma_next, x) >= sig).any()):
        raise ValueError("an SDE step must go to a lower noise level (sigma_next < sigma)")
    std_t = sde_std(sig, sigma_max, noise_level)
    mean = sde_mean(x, v, sig, _column(sigma_next, x), std_t)
    scale = std_t * torch.sqrt(sig - _column(sigma_next, x))
    if x_next is None:
        x_next = mean + scale * noise.float()
    return SDEStep(x_next, gaussian_log_prob(x_next.detach(), mean, scale), mean, std_t)


def clipped_advantages(r: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """The clipped advantage ``clip(A, ±c)`` back from the optimality probability ``r = clip(A, ±c)/(2c) + 0.5``
    the reward stage hands every objective (exact up to float64 rounding)."""
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be positive, got {adv_clip}")
    return (r.double() - 0.5) * (2 * adv_clip)


def ppo_clipped(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> ClippedObjective:
    """``max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))`` per sample with ``ρ = exp(log p − log p_old)``; ``clipped`` is the
    released code's ``clipfrac`` test ``|ρ − 1| > ε``."""
    if clip_range <= 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    adv = advantages.to(log_prob.dtype)
    ratio = torch.exp(log_prob - old_log_prob.to(log_prob.dtype))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return ClippedObjective(torch.maximum(unclipped, clipped), ratio, (ratio - 1.0).abs() > clip_range)


def sde_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std_t: torch.Tensor) -> torch.Tensor:
    """The released code's KL term per sample: ``mean((mean − mean_ref)²) / (2·std_t²)``. The two means differ
    only through the velocity, ``mean − mean_ref = (v − v_ref)·(1 + std_t²(1 − σ)/(2σ))·dt``, so this is the
    velocity-space distance ``mean((v − v_ref)²)`` times ``((1 + std_t²(1 − σ)/(2σ))·dt)² / (2·std_t²)``."""
    std = std_t.flatten() if std_t.ndim > 1 else std_t.expand(mean.shape[0])
    return ((mean - mean_ref) ** 2).flatten(1).mean(dim=1) / (2 * std.float() ** 2)


def train_steps(num_steps: int, fraction: float, window: tuple[int, int] | None = None) -> list[int]:
    """The denoising steps Flow-GRPO trains on: the first ``int(n·fraction)`` (at least 1) of the SDE steps —
    every step, or the steps ``start … stop − 1`` of ``window`` (the rest of a windowed rollout is ODE)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {fraction}")
    start, stop = window if window is not None else (0, num_steps)
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"sde_window must satisfy 0 <= start < stop <= {num_steps} (rollout steps), got {window}")
    sde = list(range(start, stop))
    return sde[: max(1, int(len(sde) * fraction))]
