"""The DiffusionNFT objective and the old-policy / EMA schedules. Pure torch, no Lightning.

Flow matching with ``x_t = (1 − t)·x0 + t·ε``; the model predicts ``v ≈ ε − x0`` so ``x0 = x_t − t·v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_FLOOR = 1e-5


@dataclass
class NFTLoss:
    """Per-sample terms of the NFT loss (shape ``(B,)``) and the reduced total."""

    loss: torch.Tensor  # scalar: weighted mean(policy) + kl_weight * weighted mean(kl)
    policy: torch.Tensor  # (B,) c · (r·L⁺ + (1 − r)·L⁻) / β
    kl: torch.Tensor  # (B,) mean((v_θ − v_ref)²)
    old_deviation: torch.Tensor  # (B,) mean((v_θ − v_old)²), no grad


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·ε`` with a per-sample ``t`` of shape ``(B,)``."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    adv_clip: float = 5.0,
    v_ref: torch.Tensor | None = None,
    kl_weight: float = 1e-4,
    weights: torch.Tensor | None = None,
) -> NFTLoss:
    """DiffusionNFT loss for a batch of samples at one timestep each.

    ``v_theta`` carries the gradient; ``v_old`` and ``v_ref`` must not. ``r`` is the optimality
    probability per sample. ``weights`` (``(B,)``, default ones) turns samples off (0) without
    changing shapes — the mean is over samples with positive weight, so padding costs nothing.

        v⁺ = β·v_θ + (1 − β)·v_old        v⁻ = (1 + β)·v_old − β·v_θ
        x0± = x_t − t·v±                  w± = mean|x0± − x0| (float64, no grad, ≥ 1e-5)
        L± = mean((x0± − x0)² / w±)       policy = c·(r·L⁺ + (1 − r)·L⁻)/β
        loss = mean(policy) + λ_KL·mean((v_θ − v_ref)²)
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if v_old.requires_grad or (v_ref is not None and v_ref.requires_grad):
        raise ValueError("v_old and v_ref must be computed without gradients")
    batch = v_theta.shape[0]
    t_ = _expand(t, x_t)
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    x0_pos = x_t - t_ * v_pos
    x0_neg = x_t - t_ * v_neg
    loss_pos = _adaptive_mse(x0_pos, x0)
    loss_neg = _adaptive_mse(x0_neg, x0)
    if weights is None:
        weights = torch.ones(batch, dtype=loss_pos.dtype, device=loss_pos.device)
    weights = weights.to(loss_pos.dtype)
    on = weights > 0
    # A switched-off sample (padding, a failed judgement) may carry r = NaN: neutralise it so that
    # neither the loss nor the gradient sees a NaN. A NaN r on a sample that trains is a bug.
    r = torch.where(on, r.to(loss_pos.dtype), torch.full_like(loss_pos, 0.5))
    if torch.isnan(r).any():
        raise ValueError("nft_loss: r is NaN for a sample with positive weight")
    policy = adv_clip * (r * loss_pos + (1 - r) * loss_neg) / beta
    if v_ref is not None:
        kl = ((v_theta - v_ref) ** 2).flatten(1).mean(dim=1)
    else:
        kl = torch.zeros_like(policy)
    total = weights.sum()
    denom = torch.where(total > 0, total, torch.ones_like(total))
    # where(), not 0 * x: a switched-off sample (padding, a NaN r) must not poison the sum.
    loss = torch.where(on, weights * policy, torch.zeros_like(policy)).sum() / denom
    if v_ref is not None and kl_weight:
        loss = loss + kl_weight * torch.where(on, weights * kl, torch.zeros_like(kl)).sum() / denom
    with torch.no_grad():
        old_dev = ((v_theta - v_old) ** 2).flatten(1).mean(dim=1)
    return NFTLoss(loss=loss, policy=policy, kl=kl, old_deviation=old_dev)


def reference_sample_weights(
    train_mask: torch.Tensor, order: torch.Tensor, micro_batch_size: int, world: int = 1
) -> torch.Tensor:
    """Per-sample loss weights (float64, ``(N,)``) that reproduce the reference code's normalisation.

    The reference shuffles all N samples of a process, kept and masked alike (``order[j]`` is the
    sample at shuffled position j), cuts them into ``ceil(N / micro_batch_size)`` micro-batches, takes
    each micro-batch's mean over its kept samples (an all-masked micro-batch adds 0) and divides by the
    number of micro-batches (its gradient-accumulation steps); DDP then averages over ``world``
    processes. So a kept sample weighs ``1 / (kept in its micro-batch × micro-batches × world)``, and
    the more is filtered, the smaller the step. Masked samples weigh 0 and are never computed.
    (editr1's default weighs every kept sample ``1 / kept over all processes``.)
    """
    mask = train_mask.reshape(-1).bool()
    n = mask.numel()
    if order.shape != (n,) or not torch.equal(order.sort().values.cpu(), torch.arange(n)):
        raise ValueError(f"order must be a permutation of {n} sample indices")
    if micro_batch_size < 1 or world < 1:
        raise ValueError("micro_batch_size and world must be >= 1")
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    position = torch.empty(n, dtype=torch.long)
    position[order.cpu()] = torch.arange(n)
    micro = position // micro_batch_size  # the micro-batch each sample falls into
    n_micro = -(-n // micro_batch_size)
    kept = torch.zeros(n_micro, dtype=torch.float64).index_add_(0, micro, mask.cpu().double())
    weights = 1.0 / (kept[micro].clamp(min=1.0) * n_micro * world)
    return torch.where(mask.cpu(), weights, torch.zeros_like(weights))


def _adaptive_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean((pred − target)² / w)`` with ``w = mean|pred − target|`` (float64, no grad)."""
    with torch.no_grad():
        w = (pred.double() - target.double()).abs().flatten(1).mean(dim=1).clamp(min=WEIGHT_FLOOR)
    sq = ((pred - target) ** 2).flatten(1).mean(dim=1)
    return sq / w.to(sq.dtype)


def old_policy_eta(step: int, rate: float = 0.001, cap: float = 0.5, delay: int = 0) -> float:
    """Mixing weight η for ``θ_old ← η·θ_old + (1 − η)·θ`` after optimiser step ``step`` (1-based).

    ``η = 0`` while ``step < delay``, then ``min(rate·(step − delay), cap)``. The paper: rate 0.001,
    cap 0.5, delay 0. A delayed variant: rate 0.0075, cap 0.999, delay 75.
    """
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if not 0.0 <= cap <= 1.0:
        raise ValueError(f"cap must be in [0, 1], got {cap}")
    if step < delay:
        return 0.0
    return float(min(rate * (step - delay), cap))


def ema_decay(step: int, cap: float = 0.9) -> float:
    """EMA decay of θ for evaluation/export: ``min((1 + s)/(10 + s), cap)``."""
    return float(min((1 + step) / (10 + step), cap))


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
