"""FlowGRPOObjective: what it declares, the errors of prepare, a gradient that does not depend on the
micro-batching, the importance ratio 1 on an on-policy update (a fake policy, and the tiny FLUX.1-Kontext with
rollouts from module.sample_groups), and a clip that acts off-policy."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from editr1.algorithms.grouping import decide
from editr1.objectives.flow_grpo import FlowGRPOObjective
from editr1.policies import lora
from editr1.policies.base import Condition
from editr1.sampling import SDESampling, sample_sde
from editr1.settings import FlowGRPOSettings
from editr1.training.experience import Experience
from editr1.training.rollout import Rollout

K = 3
SIGMAS = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])  # 5 steps: the first int(5 · 0.99) = 4 train
REWARDS = torch.tensor([[0.1, 0.5, 0.9], [1.0, 1.0, 1.0], [0.2, 0.4, 0.3]])  # group 1 is saturated: filtered


class FakePolicy:
    """v = w_adapter · x_t + cond + t: θ is a parameter (θ_old's value unless told), θ_old and the base fixed."""

    def __init__(self, theta: float = 0.25) -> None:
        self.theta = torch.nn.Parameter(torch.tensor(theta))
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


def _experience(policy: FakePolicy, keys=("a", "b", "c")) -> Experience:
    g = len(keys)
    cond = Condition({"e": torch.tensor([[float(sum(map(ord, key)) % 5) / 5] for key in keys])})
    group = torch.arange(g).repeat_interleave(K)
    noise = torch.randn(g * K, 2, 3, generator=torch.Generator().manual_seed(0))
    with policy.adapter(lora.OLD):
        tr = sample_sde(
            lambda x, t: policy.velocity(x, t, cond.select(group)),
            noise,
            SIGMAS,
            SDESampling(0.7),
            lambda i: torch.randn(g * K, 2, 3, generator=torch.Generator().manual_seed(10 + i)),
        )
    policy.calls.clear()
    ro = Rollout(
        prompts=[f"p {k}" for k in keys],
        requirements=[""] * g,
        keys=list(keys),
        sources=torch.zeros(g, 3, 2, 2),
        targets=None,
        cond=cond,
        x0=tr.x0,
        edits=torch.zeros(g * K, 3, 2, 2),
        sigmas=SIGMAS,
        group_size=K,
        index=2,
        base_seed=5,
        latents=tr.latents,
        log_probs=tr.log_probs,
    )
    return Experience(ro, REWARDS, decide(REWARDS))


def _module(policy, sharded=False):
    return SimpleNamespace(
        policy=policy,
        sharded=sharded,
        world_size=1,
        device=torch.device("cpu"),
        loss_world_scale=1.0,
        global_step=4,
        manual_backward=lambda loss: loss.backward(),
    )


def _run(obj, chunks, theta: float = 0.25, idle: bool = False):
    policy = FakePolicy(theta)
    module = _module(policy)
    work = obj.prepare(module, {"experience": _experience(policy)})
    sums: dict = {}
    for positions in chunks:
        for k, v in obj.micro_batch(module, work, positions, idle, work.count).items():
            sums[k] = sums.get(k, 0.0) + v
    return policy.theta.grad, obj.metrics(module, work, sums) if sums else {}, policy.calls


def test_what_it_declares():
    obj = FlowGRPOObjective(FlowGRPOSettings(std_mode="group", adv_clip=2.0, noise_level=0.5, sde_window=(1, 3)))
    assert (obj.name, obj.needs, obj.main_metric, obj.keep_old) == ("flow_grpo", "rollouts", "loss/policy", 0.0)
    assert obj.group_settings() == ("group", 2.0)
    assert obj.rollout_sde == SDESampling(0.5, (1, 3))
    assert FlowGRPOObjective(FlowGRPOSettings(on_policy=False)).keep_old is None


def test_prepare_errors():
    obj = FlowGRPOObjective(FlowGRPOSettings())
    with pytest.raises(RuntimeError, match="RewardCallback"):
        obj.prepare(_module(FakePolicy()), {"prompt": ["a"]})
    assert obj.prepare(_module(FakePolicy()), {"experience": Experience.nothing(K)}).count == 0
    with pytest.raises(RuntimeError, match="sharded training needs every rank"):
        obj.prepare(_module(FakePolicy(), sharded=True), {"experience": Experience.nothing(K)})
    exp = _experience(FakePolicy())
    exp.rollout.latents = None
    with pytest.raises(RuntimeError, match="SDE rollouts"):
        obj.prepare(_module(FakePolicy()), {"experience": exp})


def test_on_policy_the_ratio_is_one_and_the_gradient_does_not_depend_on_the_micro_batching():
    obj = FlowGRPOObjective(FlowGRPOSettings(kl_weight=0.1))
    whole, metrics, calls = _run(obj, [[0, 1, 2, 3, 4, 5]])
    split, split_metrics, _ = _run(obj, [[0, 1], [2, 3, 4], [5]])
    assert whole is not None and whole.abs() > 0
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and metrics["policy/clip_frac"] == 0.0
    assert metrics["policy/approx_kl"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["loss"] == pytest.approx(metrics["loss/policy"] + 0.1 * metrics["loss/kl"])
    assert metrics["loss/kl"] > 0 and metrics["policy/trained_samples"] == 6.0
    assert all(split_metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7) for k, v in metrics.items())
    assert calls == [lora.DEFAULT, None] * 4  # 4 trained steps: θ, then the reference for the KL
    _, _, calls = _run(FlowGRPOObjective(FlowGRPOSettings(kl_weight=0.0)), [[0]])
    assert calls == [lora.DEFAULT] * 4


def test_off_policy_the_ratio_moves_and_the_clip_acts():
    obj = FlowGRPOObjective(FlowGRPOSettings(kl_weight=0.0, clip_range=1e-4))
    _, metrics, _ = _run(obj, [[0, 1, 2, 3, 4, 5]], theta=0.35)
    assert metrics["policy/approx_kl"] > 1e-5 and metrics["policy/clip_frac"] > 0.5  # ratios on both sides of 1


def test_an_idle_call_makes_the_same_calls_with_zero_gradient():
    grad, metrics, calls = _run(FlowGRPOObjective(FlowGRPOSettings()), [[0]], idle=True)
    assert float(grad) == 0.0 and metrics == {} and calls == [lora.DEFAULT, None] * 4


def test_the_ratio_is_one_on_an_on_policy_update_of_the_tiny_flux():
    """Rollouts by module.sample_groups (SDE, θ_old, batches of 16) scored again by θ in micro-batches of 3:
    the same weights, other batch shapes — the ratio is 1 to float tolerance."""
    from conftest import small_module
    from editr1.settings import RolloutSettings

    m = small_module(
        objective="flow_grpo",
        rollout=RolloutSettings(group_size=4, steps=3, batch_size=16),
        flow_grpo=FlowGRPOSettings(micro_batch_size=3, kl_weight=0.0),
    )
    m.setup("fit")
    m.manual_backward = lambda loss: loss.backward()
    images = torch.rand(2, 3, m.policy.height, m.policy.width, generator=torch.Generator().manual_seed(0))
    batch = {"prompt": ["make it red", "add a square"], "requirement": ["", ""], "key": ["a", "b"], "image": images}
    ro = m.sample_groups(batch)
    assert ro.latents.shape[:2] == (8, 4) and torch.isfinite(ro.log_probs).all()
    rewards = torch.tensor([[0.1, 0.6, 0.3, 0.9], [0.5, 0.2, 0.8, 0.4]])
    obj = m.objective
    work = obj.prepare(m, {"experience": Experience(ro, rewards, decide(rewards))})
    sums: dict = {}
    for positions in ([0, 1, 2], [3, 4, 5], [6, 7]):
        for k, v in obj.micro_batch(m, work, positions, False, work.count).items():
            sums[k] = sums.get(k, 0.0) + v
    metrics = obj.metrics(m, work, sums)
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["policy/approx_kl"] < 1e-8
