"""Experience: what the reward stage hands training_step — nothing to train, or the samples that get a loss."""

from __future__ import annotations

import torch

from editr1.algorithms.grouping import decide
from editr1.policies.base import Condition
from editr1.training.experience import Experience
from editr1.training.rollout import Rollout


def _rollout(g: int, k: int) -> Rollout:
    return Rollout(
        prompts=[f"p{i}" for i in range(g)],
        requirements=[""] * g,
        keys=[f"k{i}" for i in range(g)],
        sources=torch.zeros(g, 3, 2, 2),
        targets=None,
        cond=Condition({"e": torch.zeros(g, 1)}),
        x0=torch.zeros(g * k, 4),
        edits=torch.zeros(g * k, 3, 2, 2),
        sigmas=torch.tensor([1.0, 0.0]),
        group_size=k,
        index=0,
        base_seed=0,
    )


def test_nothing_is_an_empty_step_of_the_right_width():
    exp = Experience.nothing(group_size=5)
    assert exp.rollout is None and exp.trainable == 0
    assert exp.rewards.shape == (0, 5)
    d = exp.decision
    assert d.num_groups == 0 and d.train_mask.shape == (0, 5) and d.frac_groups_dropped == 0.0
    assert d.dropped_nan.shape == (0,) and d.ban.shape == (0,)


def test_trainable_counts_the_samples_the_decision_keeps():
    # group 0 varies (kept, 3 samples); group 1 is saturated (mean 1 > 0.9, std 0: dropped);
    # group 2 has one NaN (dropped whole under nan_policy group, kept but for the NaN under sample)
    rewards = torch.tensor([[0.1, 0.5, 0.9], [1.0, 1.0, 1.0], [0.2, float("nan"), 0.6]])
    ro = _rollout(3, 3)
    assert Experience(ro, rewards, decide(rewards)).trainable == 3
    assert Experience(ro, rewards, decide(rewards, nan_policy="sample")).trainable == 5
    assert Experience(ro, rewards, decide(rewards, rule="none", nan_policy="sample")).trainable == 8


def test_without_a_rollout_nothing_trains_whatever_the_decision_says():
    rewards = torch.tensor([[0.1, 0.5, 0.9]])
    exp = Experience(None, rewards, decide(rewards))
    assert int(exp.decision.train_mask.sum()) == 3 and exp.trainable == 0
