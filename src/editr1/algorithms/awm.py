"""Advantage Weighted Matching (Xue et al., 2025, arXiv 2509.25050): the flow-matching loss of pretraining on
forward-noised rollout latents, each sample weighted by its advantage. Pure torch, no Lightning.

With ``x_t = (1 − t)·x0 + t·ε`` for a rollout's clean latent x0 and fresh noise ε, the per-sample
"log-likelihood" is ``log p = −w(t, ℓ)`` of the flow-matching error ``ℓ = mean((v_θ − (ε − x0))²)``, and the
loss is the PPO form of the released code (scxue/advantage_weighted_matching, ``scripts/train_sd3_awm.py``,
``loss_type: exp_first``):

    ρ = exp(log p − log p_old)      loss = max(−A·ρ, −A·clip(ρ, 1 ± ε))  (+ λ·mean((v_θ − v_ref)²))

On-policy (``log p_old`` = ``log p`` detached) ρ = 1 and the gradient is ``A·∇w(t, ℓ)``: the advantage-weighted
flow-matching loss of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from editr1.algorithms.flow_grpo import ppo_clipped

Weighting = Literal["uniform", "t", "t2", "ghuber"]
GHUBER_EPS = 1e-10


@dataclass
class AWMLoss:
    """Per-sample terms ``(B,)``: the clipped policy loss, log p, the ratio, whether it was clipped, the KL."""

    policy: torch.Tensor
    log_prob: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    kl: torch.Tensor


def matching_log_prob(
    v: torch.Tensor,
    noise: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    weighting: Weighting = "uniform",
    power: float = 0.25,
) -> torch.Tensor:
    """``log p = −w(t, ℓ)`` with ``ℓ = mean((v − (ε − x0))²)`` per sample, in float64 (as the released code).

    ``uniform``: ℓ; ``t``: t·ℓ; ``t2``: t²·ℓ; ``ghuber`` (the released recipe, ``power`` 0.25):
    t·((ℓ + 1e-10)^p − (1e-10)^p)/p, a robust loss that grows like ℓ^p.
    """
    err = ((v.double() - (noise.double() - x0.double())) ** 2).flatten(1).mean(dim=1)
    t = t.double().flatten()
    if weighting == "uniform":
        w = err
    elif weighting == "t":
        w = err * t
    elif weighting == "t2":
        w = err * t**2
    elif weighting == "ghuber":
        if power <= 0:
            raise ValueError(f"ghuber power must be positive, got {power}")
        w = ((err + GHUBER_EPS) ** power - GHUBER_EPS**power) * t / power
    else:
        raise ValueError(f"weighting must be one of uniform, t, t2, ghuber; got {weighting!r}")
    return -w


def awm_loss(
    v_theta: torch.Tensor,
    noise: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_log_prob: torch.Tensor | None = None,
    clip_range: float = 1.0,
    weighting: Weighting = "uniform",
    power: float = 0.25,
    v_ref: torch.Tensor | None = None,
) -> AWMLoss:
    """The AWM terms for one batch at one timestep each. ``old_log_prob=None``: on-policy (the released code's
    ``off_policy: false``), ρ = 1 exactly. ``v_ref``: the reference velocity for the KL (``None``: KL 0)."""
    log_prob = matching_log_prob(v_theta, noise, x0, t, weighting, power)
    old = log_prob.detach() if old_log_prob is None else old_log_prob.double()
    out = ppo_clipped(log_prob, old, advantages.double(), clip_range)
    if v_ref is None:
        kl = torch.zeros_like(log_prob, dtype=torch.float32)
    else:
        kl = ((v_theta.float() - v_ref.float()) ** 2).flatten(1).mean(dim=1)
    return AWMLoss(out.loss, log_prob, out.ratio, out.clipped, kl)
