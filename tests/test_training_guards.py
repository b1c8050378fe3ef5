"""The run guards on a stand-in module: idle streaks warn once and stop at the limit, non-finite rollouts and
adapters stop at once."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from editr1.settings import OptimSettings
from editr1.training import guards
from editr1.training.guards import RunStopped


class FakeTrainer:
    log_dir = None

    def __init__(self, root) -> None:
        self.default_root_dir = str(root)
        self.global_step = 7
        self.saved = []

    def save_checkpoint(self, path):
        self.saved.append(path)


def _module(tmp_path, limit: int, params=None):
    return SimpleNamespace(
        idle_in_a_row=0,
        optim=OptimSettings(max_idle_steps=limit, lr=0.5),
        global_step=7,
        global_rank=0,
        trainer=FakeTrainer(tmp_path),
        world_size=1,
        device="cpu",
        policy=SimpleNamespace(trainable_parameters=lambda: params or []),
    )


def test_an_idle_streak_warns_once_then_stops_with_a_checkpoint(tmp_path):
    m = _module(tmp_path, limit=3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        guards.count_idle_step(m)  # one idle step is ordinary (the filter dropped every group): quiet
        assert not seen
        guards.count_idle_step(m)  # two in a row with a limit of 3: a warning, once
    assert len(seen) == 1 and "2 steps in a row trained nothing; last: step 7: nothing to train" in str(seen[0].message)
    with pytest.raises(RunStopped, match=r"3 steps in a row trained nothing \(optim.max_idle_steps = 3\)"):
        guards.count_idle_step(m)
    assert m.trainer.saved == [str(tmp_path / "checkpoints" / "stopped-idle-step7.ckpt")]


def test_limit_zero_never_stops(tmp_path):
    m = _module(tmp_path, limit=0)
    with pytest.warns(UserWarning):
        for _ in range(50):
            guards.count_idle_step(m)
    assert m.idle_in_a_row == 50 and not m.trainer.saved


def test_non_finite_rollouts_and_adapters_stop(tmp_path):
    m = _module(tmp_path, limit=3, params=[torch.tensor([1.0, float("inf")])])
    guards.check_finite_rollout(m, torch.zeros(2, 3))
    guards.check_finite_rollout(m, None)  # a process without prompts only joins the check
    with pytest.raises(RunStopped, match="non-finite latents at step 7 \\(lr 0.5\\)"):
        guards.check_finite_rollout(m, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(RunStopped, match="adapters are not finite after optimiser step 7"):
        guards.check_finite_adapters(m)
    guards.check_finite_adapters(_module(tmp_path, 3, params=[torch.ones(2)]))
    assert not m.trainer.saved  # diverged weights are never saved
