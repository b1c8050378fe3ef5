"""AWMObjective on a hand-made rollout and a fake policy: what it declares, a gradient that does not depend on
the micro-batching, on-policy ratio 1 with no θ_old forward, the θ_old forward off-policy, idle calls."""

from __future__ import annotations

import pytest
import torch

from editr1.algorithms.grouping import decide
from editr1.objectives.awm import AWMObjective
from editr1.policies import lora
from editr1.settings import AWMSettings
from editr1.training.experience import Experience
from test_objectives_nft import REWARDS, FakePolicy, _module, _rollout


def _run(obj, chunks, idle: bool = False):
    policy = FakePolicy()
    module = _module(policy)
    work = obj.prepare(module, {"experience": Experience(_rollout(["a", "b", "c"]), REWARDS, decide(REWARDS))})
    sums: dict = {}
    for positions in chunks:
        for k, v in obj.micro_batch(module, work, positions, idle, work.count).items():
            sums[k] = sums.get(k, 0.0) + v
    return policy.theta.grad, obj.metrics(module, work, sums) if sums else {}, policy.calls, work


def test_what_it_declares():
    obj = AWMObjective(AWMSettings(std_mode="group", adv_clip=2.0))
    assert (obj.name, obj.needs, obj.main_metric, obj.keep_old, obj.rollout_sde) == (
        "awm",
        "rollouts",
        "loss/policy",
        0.0,
        None,  # ODE rollouts
    )
    assert obj.group_settings() == ("group", 2.0)
    assert AWMObjective(AWMSettings(on_policy=False)).keep_old is None
    with pytest.raises(RuntimeError, match="RewardCallback"):
        obj.prepare(_module(), {"prompt": ["a"]})
    assert obj.prepare(_module(), {"experience": Experience.nothing(3)}).count == 0


def test_advantages_are_clipped_and_scaled_and_timesteps_are_the_rollouts():
    _, _, _, work = _run(AWMObjective(AWMSettings(advantage_max=1.0, adv_clip=5.0)), [[0]])
    step = work.data
    assert step.idx == [0, 1, 2, 6, 7, 8] and step.timesteps.shape == (4, 6)  # int(5 · 0.9) = 4 rounds
    assert float(step.advantages.abs().max()) <= 1.0 and float(step.advantages.abs().max()) > 0.1


def test_the_gradient_does_not_depend_on_the_micro_batching_and_the_ratio_is_one():
    obj = AWMObjective(AWMSettings(kl_weight=0.1, weighting="uniform"))
    whole, metrics, calls, _ = _run(obj, [[0, 1, 2, 3, 4, 5]])
    split, split_metrics, _, _ = _run(obj, [[0, 1], [2, 3, 4], [5]])
    assert whole is not None and whole.abs() > 0
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    assert metrics["policy/ratio_mean"] == 1.0 and metrics["policy/clip_frac"] == 0.0
    assert metrics["loss"] == pytest.approx(metrics["loss/policy"] + 0.1 * metrics["loss/kl"])
    assert metrics["loss/matching"] > 0 and metrics["loss/kl"] > 0
    assert all(split_metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7) for k, v in metrics.items())
    assert calls == [None, lora.DEFAULT] * 4  # on-policy: no θ_old forward, log p_old = log p detached


def test_off_policy_log_p_old_comes_from_theta_old():
    obj = AWMObjective(AWMSettings(on_policy=False, kl_weight=0.0, clip_range=1e-3, weighting="uniform"))
    _, metrics, calls, _ = _run(obj, [[0, 1, 2, 3, 4, 5]])
    assert calls == [lora.OLD, lora.DEFAULT] * 4
    assert metrics["policy/clip_frac"] > 0  # θ (0.3) and θ_old (0.25) differ


def test_an_idle_call_has_zero_gradient():
    grad, metrics, calls, _ = _run(AWMObjective(AWMSettings()), [[0]], idle=True)
    assert float(grad) == 0.0 and metrics == {} and calls == [None, lora.DEFAULT] * 4
