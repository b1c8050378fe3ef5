"""The LoRA optimiser from OptimSettings: AdamW with the configured hyper-parameters, a linear warm-up
scheduler when asked for, and a clear error for an unknown name."""

from __future__ import annotations

import pytest
import torch

from editr1.settings import OptimSettings
from editr1.training.optim import build_optimizer


def _params():
    return (torch.nn.Parameter(torch.ones(2)) for _ in range(3))  # a generator, as trainable_parameters may be


def test_adamw_with_the_settings_and_no_scheduler_without_warmup():
    cfg = OptimSettings(lr=2e-3, betas=(0.8, 0.95), weight_decay=0.01, eps=1e-6)
    opt = build_optimizer(_params(), cfg)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (2e-3, (0.8, 0.95), 0.01, 1e-6)
    assert len(group["params"]) == 3


def test_warmup_is_linear_then_flat():
    out = build_optimizer(_params(), OptimSettings(lr=1.0, warmup_steps=4))
    assert set(out) == {"optimizer", "lr_scheduler"} and out["lr_scheduler"]["interval"] == "step"
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_an_unknown_optimiser_is_refused():
    with pytest.raises(ValueError, match="optim.name must be 'adamw' or 'adamw8bit', got 'sgd'"):
        build_optimizer(_params(), OptimSettings(name="sgd"))
