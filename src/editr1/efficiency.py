"""The speed and memory switches of ``model.efficiency`` applied to a policy's transformer."""

from __future__ import annotations

import torch

from editr1.policies.base import EditPolicy
from editr1.settings import EfficiencySettings


def apply_efficiency(policy: EditPolicy, cfg: EfficiencySettings) -> None:
    """Turn on the switches of ``cfg`` on ``policy``'s transformer (nothing when all are off).

    Activation checkpointing recomputes a block's forward in backward with whatever adapter is active
    then: ``training_step`` calls backward with θ ("default") active, the adapter its forward used.
    """
    if cfg.activation_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    policy.autocast_dtype = torch.bfloat16 if cfg.autocast == "bf16" else None
    if cfg.compile:
        policy.transformer.compile(backend=cfg.compile_backend)
