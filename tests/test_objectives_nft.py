"""NFTObjective on a hand-made rollout and a fake policy (no model): what it declares, the errors of prepare,
which samples train at which timesteps, and a loss whose gradient does not depend on the micro-batching."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from editr1.algorithms.grouping import decide
from editr1.algorithms.nft import old_policy_eta
from editr1.objectives.nft import NFTObjective
from editr1.policies import lora
from editr1.policies.base import Condition
from editr1.settings import NFTSettings, OldPolicySettings
from editr1.training.experience import Experience
from editr1.training.rollout import Rollout

K = 3
SIGMAS = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])  # 5 steps: int(5 · 0.99) = 4 training rounds


class FakePolicy:
    """v = w_adapter · x_t + cond: θ is a parameter, θ_old and the reference are fixed."""

    def __init__(self) -> None:
        self.theta = torch.nn.Parameter(torch.tensor(0.3))
        self.weights = {lora.OLD: torch.tensor(0.25), None: torch.tensor(0.2)}
        self.active = lora.DEFAULT
        self.calls: list = []

    @contextlib.contextmanager
    def adapter(self, name):
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous

    def velocity(self, x_t, t, cond):
        self.calls.append(self.active)
        w = self.theta if self.active == lora.DEFAULT else self.weights[self.active]
        return w * x_t + cond["e"][:, :, None] + t[:, None, None]


def _rollout(keys: list[str]) -> Rollout:
    g = len(keys)
    x0 = torch.stack([torch.full((2, 3), float(sum(map(ord, key)) % 7 + j)) for key in keys for j in range(K)])
    return Rollout(
        prompts=[f"p {key}" for key in keys],
        requirements=[""] * g,
        keys=keys,
        sources=torch.zeros(g, 3, 2, 2),
        targets=None,
        cond=Condition({"e": torch.tensor([[float(sum(map(ord, key)) % 5)] for key in keys])}),
        x0=x0 / 7,
        edits=torch.zeros(g * K, 3, 2, 2),
        sigmas=SIGMAS,
        group_size=K,
        index=2,
        base_seed=5,
    )


def _experience(keys: list[str], rewards: torch.Tensor) -> Experience:
    return Experience(_rollout(keys), rewards, decide(rewards))


def _module(policy=None, sharded=False, step=4):
    return SimpleNamespace(
        policy=policy or FakePolicy(),
        sharded=sharded,
        world_size=1,
        device=torch.device("cpu"),
        loss_world_scale=1.0,
        global_step=step,
        old_policy=OldPolicySettings(rate=0.1, cap=0.5),
        manual_backward=lambda loss: loss.backward(),
    )


REWARDS = torch.tensor([[0.1, 0.5, 0.9], [1.0, 1.0, 1.0], [0.2, 0.4, 0.3]])  # group 1 is saturated: filtered


def test_what_it_declares():
    obj = NFTObjective(NFTSettings(std_mode="group", adv_clip=2.0))
    assert (obj.name, obj.needs, obj.main_metric, obj.progress_bar, obj.keep_old) == (
        "nft",
        "rollouts",
        "loss/policy",
        "loss",
        None,
    )
    assert obj.group_settings() == ("group", 2.0)
    assert obj.steps_without_samples is False
    assert NFTObjective(NFTSettings(normalize="reference")).steps_without_samples is True


def test_prepare_without_experience_names_the_reward_callback():
    with pytest.raises(RuntimeError, match="RewardCallback"):
        NFTObjective(NFTSettings()).prepare(_module(), {"prompt": ["a"]})


def test_a_process_without_rollout_trains_nothing_unless_sharded():
    obj = NFTObjective(NFTSettings())
    work = obj.prepare(_module(), {"experience": Experience.nothing(K)})
    assert (work.count, work.can_idle) == (0, False)
    with pytest.raises(RuntimeError, match="sharded training needs every rank"):
        obj.prepare(_module(sharded=True), {"experience": Experience.nothing(K)})


def test_prepare_keeps_the_trainable_samples_with_rollout_timesteps():
    obj = NFTObjective(NFTSettings())
    work = obj.prepare(_module(), {"experience": _experience(["a", "b", "c"], REWARDS)})
    assert work.count == 6 and work.rows == 3 and work.can_idle
    step = work.data
    assert step.idx == [0, 1, 2, 6, 7, 8] and step.weights is None
    assert step.timesteps.shape == (4, 6)
    allowed = set(SIGMAS[:-1].tolist())
    for column in step.timesteps.T.tolist():  # a permutation prefix of the training σ's, per sample
        assert len(set(column)) == 4 and set(column) <= allowed
    assert step.r.shape == (9,) and step.r.dtype == torch.float64


def test_a_samples_timesteps_follow_its_key_not_its_batch_position():
    obj = NFTObjective(NFTSettings())
    a = obj.prepare(_module(), {"experience": _experience(["a", "b", "c"], REWARDS)}).data
    rewards = REWARDS[[2, 0]]
    b = obj.prepare(_module(), {"experience": _experience(["c", "a"], rewards)}).data
    assert b.idx == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(b.timesteps[:, :3], a.timesteps[:, 3:])  # c's samples
    torch.testing.assert_close(b.timesteps[:, 3:], a.timesteps[:, :3])  # a's samples


def test_reference_normalisation_gives_each_kept_sample_a_weight():
    obj = NFTObjective(NFTSettings(normalize="reference", micro_batch_size=2))
    step = obj.prepare(_module(), {"experience": _experience(["a", "b", "c"], REWARDS)}).data
    assert step.weights.shape == (6,) and (step.weights > 0).all()
    assert float(step.weights.sum()) <= 1.0 + 1e-12  # filtering only ever shrinks the step


def _grad(obj, chunks: list[list[int]], idle: bool = False) -> tuple[torch.Tensor, dict, list]:
    policy = FakePolicy()
    module = _module(policy)
    work = obj.prepare(module, {"experience": _experience(["a", "b", "c"], REWARDS)})
    sums: dict = {}
    for positions in chunks:
        for k, v in obj.micro_batch(module, work, positions, idle, work.count).items():
            sums[k] = sums.get(k, 0.0) + v
    return policy.theta.grad, obj.metrics(module, work, sums) if sums else {}, policy.calls


def test_the_gradient_does_not_depend_on_the_micro_batching():
    obj = NFTObjective(NFTSettings(kl_weight=0.1))
    whole, metrics, calls = _grad(obj, [[0, 1, 2, 3, 4, 5]])
    split, split_metrics, _ = _grad(obj, [[0, 1], [2, 3, 4], [5]])
    assert whole is not None and whole.abs() > 0
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    assert metrics.keys() == {"loss", "loss/policy", "loss/kl", "nft/old_deviation", "nft/eta", "nft/trained_samples"}
    assert metrics["loss"] == pytest.approx(metrics["loss/policy"] + 0.1 * metrics["loss/kl"])
    assert all(split_metrics[k] == pytest.approx(v, rel=1e-6) for k, v in metrics.items())
    assert metrics["nft/trained_samples"] == 6.0 and metrics["nft/eta"] == old_policy_eta(4, 0.1, 0.5) == 0.4
    assert metrics["loss/kl"] > 0
    # 4 rounds: each an old, a reference (kl_weight > 0) and a θ forward, in that order
    assert calls == [lora.OLD, None, lora.DEFAULT] * 4


def test_no_reference_forward_without_kl_and_an_idle_call_has_zero_gradient():
    obj = NFTObjective(NFTSettings(kl_weight=0.0))
    _, _, calls = _grad(obj, [[0, 1, 2, 3, 4, 5]])
    assert calls == [lora.OLD, lora.DEFAULT] * 4
    grad, metrics, calls = _grad(obj, [[0]], idle=True)
    assert grad is not None and float(grad) == 0.0  # the same calls, weighted by zero
    assert calls == [lora.OLD, lora.DEFAULT] * 4 and metrics == {}
