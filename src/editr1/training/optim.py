"""The optimiser of the LoRA weights, built from :class:`editr1.settings.OptimSettings`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from editr1.settings import OptimSettings


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimSettings) -> Any:
    """AdamW (torch) or AdamW8bit (bitsandbytes) on ``params``, with a linear warm-up scheduler (stepped every
    optimiser step) when ``cfg.warmup_steps`` > 0 — what ``configure_optimizers`` returns."""
    params = list(params)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "adamw":
        opt = torch.optim.AdamW(params, **kwargs)
    elif cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        raise ValueError(f"optim.name must be 'adamw' or 'adamw8bit', got {cfg.name!r}")
    if cfg.warmup_steps <= 0:
        return opt
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
