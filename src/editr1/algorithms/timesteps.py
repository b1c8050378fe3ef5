"""Which timesteps a rollout is trained on. Pure torch, no Lightning."""

from __future__ import annotations

import math
from typing import Literal

import torch

TimestepMode = Literal["rollout", "uniform", "logit_normal"]


def num_train_timesteps(num_steps: int, fraction: float = 0.99) -> int:
    """How many of a rollout's σ's are trained on: ``int(steps · fraction)``, the reference code's rule
    (the float product, truncated: 100 steps × 0.29 = 28.999… → 28). A setting that gives 0 is an error
    (the reference would divide by zero)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = int(num_steps * fraction)
    if count < 1:
        raise ValueError(
            f"timestep_fraction {fraction} of {num_steps} rollout steps trains on int({num_steps} × {fraction}) = 0 "
            f"timesteps; raise nft.timestep_fraction to at least {1 / num_steps:.4g}"
        )
    return count


def rollout_timesteps(sigmas: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """Per sample, a random permutation of the rollout's σ's, first ``count`` of them.

    ``sigmas``: the rollout schedule *without* the terminal 0 (length = number of solver steps).
    ``keys``: ``(batch, len(sigmas))`` uniform numbers, one row per sample; their argsort is the
    permutation. Returns ``(count, batch)``: row j is every sample's timestep at training round j.
    """
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-d tensor, got shape {tuple(sigmas.shape)}")
    if keys.ndim != 2 or keys.shape[1] != sigmas.numel():
        raise ValueError(f"keys must have shape (batch, {sigmas.numel()}), got {tuple(keys.shape)}")
    if not 1 <= count <= sigmas.numel():
        raise ValueError(f"count must be in [1, {sigmas.numel()}], got {count}")
    if (sigmas <= 0).any():
        raise ValueError("training sigmas must be positive (drop the terminal 0 of the schedule)")
    order = keys.argsort(dim=1)[:, :count]  # (batch, count): a permutation prefix per sample
    return sigmas.to(torch.float32)[order].T.contiguous()


def continuous_timesteps(
    uniforms: torch.Tensor,
    mode: TimestepMode = "uniform",
    t_min: float = 0.0,
    t_max: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Timesteps from uniform numbers ``u`` (any shape): uniform, or logit-normal via the normal
    quantile ``√2·erfinv(2u − 1)``; mapped into ``[t_min, t_max]``."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    if mode == "uniform":
        u = uniforms
    elif mode == "logit_normal":
        eps = 1e-6
        z = math.sqrt(2.0) * torch.erfinv(2 * uniforms.clamp(eps, 1 - eps) - 1)
        u = torch.sigmoid(z * logit_std + logit_mean)
    else:
        raise ValueError(f"continuous timestep mode must be 'uniform' or 'logit_normal', got {mode!r}")
    return t_min + (t_max - t_min) * u


def train_timesteps(
    mode: TimestepMode,
    sigmas: torch.Tensor,
    keys: torch.Tensor,
    fraction: float = 0.99,
    **continuous_kwargs: float,
) -> torch.Tensor:
    """``(count, batch)`` training timesteps for samples of a rollout with schedule ``sigmas``.

    ``keys``: ``(batch, len(sigmas))`` uniform numbers per sample (their only randomness). In every
    mode the number of rounds is ``int(steps · fraction)`` of the rollout's solver steps.
    """
    count = num_train_timesteps(sigmas.numel(), fraction)
    if mode == "rollout":
        return rollout_timesteps(sigmas, keys, count)
    return continuous_timesteps(keys[:, :count].T.contiguous(), mode, **continuous_kwargs)
