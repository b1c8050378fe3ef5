"""The guards that stop a run which cannot progress, on a fake module: non-finite rollouts or adapters stop
at once, a streak of idle steps warns once and stops at its limit with a checkpoint."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from editr1.settings import OptimSettings
from editr1.training.guards import check_finite_adapters, check_finite_rollout, count_idle_step


class FakeTrainer:
    def __init__(self, tmp_path) -> None:
        self.log_dir, self.default_root_dir, self.global_step = None, str(tmp_path), 9
        self.saved: list[str] = []

    def save_checkpoint(self, path):
        self.saved.append(path)


def _module(tmp_path=None, max_idle_steps=3, rank=0, params=()):
    return SimpleNamespace(
        world_size=1,
        device=torch.device("cpu"),
        global_step=9,
        global_rank=rank,
        idle_in_a_row=0,
        optim=OptimSettings(lr=0.5, max_idle_steps=max_idle_steps),
        trainer=FakeTrainer(tmp_path),
        policy=SimpleNamespace(trainable_parameters=lambda: list(params)),
    )


def test_finite_or_absent_rollout_latents_pass():
    check_finite_rollout(_module(), torch.zeros(2, 3))
    check_finite_rollout(_module(), None)  # a process without a rollout this step


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rollout_latents_stop_the_run_naming_step_and_lr(bad):
    x0 = torch.zeros(2, 3)
    x0[1, 2] = bad
    with pytest.raises(RuntimeError, match=r"non-finite latents at step 9 \(lr 0.5\).*lower learning rate"):
        check_finite_rollout(_module(), x0)


def test_non_finite_adapters_stop_the_run():
    good = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(3))]
    check_finite_adapters(_module(params=good))
    check_finite_adapters(_module(params=[]))
    broken = [*good, torch.nn.Parameter(torch.tensor([1.0, float("inf")]))]
    with pytest.raises(RuntimeError, match=r"adapters are not finite after optimiser step 9 \(lr 0.5\)"):
        check_finite_adapters(_module(params=broken))


def test_an_idle_streak_warns_once_then_stops_at_the_limit(tmp_path):
    m = _module(tmp_path, max_idle_steps=3)
    with pytest.warns(UserWarning, match="step 9: nothing to train on any process"):
        count_idle_step(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning within the streak
        count_idle_step(m)
        assert m.idle_in_a_row == 2 and m.trainer.saved == []
        with pytest.raises(RuntimeError, match=r"3 steps in a row trained nothing \(optim.max_idle_steps = 3\)"):
            count_idle_step(m)
    assert m.trainer.saved == [str(tmp_path / "checkpoints" / "stopped-idle-step9.ckpt")]


def test_other_ranks_do_not_warn_and_a_zero_limit_never_stops(tmp_path):
    m = _module(tmp_path, max_idle_steps=0, rank=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(50):
            count_idle_step(m)
    assert m.idle_in_a_row == 50 and m.trainer.saved == []
