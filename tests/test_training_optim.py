"""build_optimizer: AdamW from the settings, the warm-up schedule, a clear error for an unknown name."""

from __future__ import annotations

import pytest
import torch

from editr1.settings import OptimSettings
from editr1.training.optim import build_optimizer


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_adamw_takes_every_setting():
    opt = build_optimizer(_params(), OptimSettings(lr=0.01, betas=(0.8, 0.9), weight_decay=0.5, eps=1e-6))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (0.01, (0.8, 0.9), 0.5, 1e-6)


def test_warm_up_is_linear_per_step():
    out = build_optimizer(_params(), OptimSettings(lr=1.0, warmup_steps=4))
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert out["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_unknown_optimiser_and_bad_limits_are_errors():
    bad = OptimSettings()
    object.__setattr__(bad, "name", "sgd")
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(_params(), bad)
    with pytest.raises(ValueError, match="max_idle_steps"):
        OptimSettings(max_idle_steps=-1)
