"""Supervised flow matching for (source, instruction, target) pairs. Pure torch, no Lightning.

With ``x_t = (1 − t)·x0 + t·ε`` the target velocity is ``ε − x0``; the loss is its squared error.
"""

from __future__ import annotations

import torch


def flow_matching_loss(v_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean((v_pred − (ε − x0))²)``, shape ``(B,)``."""
    if v_pred.shape != noise.shape or noise.shape != x0.shape:
        raise ValueError(f"shapes differ: v {tuple(v_pred.shape)}, noise {tuple(noise.shape)}, x0 {tuple(x0.shape)}")
    return ((v_pred.float() - (noise.float() - x0.float())) ** 2).flatten(1).mean(dim=1)
