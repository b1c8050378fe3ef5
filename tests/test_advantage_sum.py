"""A combined reward by ``combine: advantage_sum`` through the reward stage: on a fake module (components kept,
NaN counted per component, failures zeroed per component) and in one real training step of the tiny policy,
whose optimality probabilities are the hand-computed sum of the components' advantages."""

from __future__ import annotations

import pytest
import torch

from conftest import small_module, small_trainer
from editr1.callbacks import FilterSettings, RewardCallback
from editr1.rewards import RewardInputs, RewardModel, SceneReward
from editr1.rewards.combined import CombinedReward
from editr1.rewards.preservation import PreservationReward
from test_callbacks_reward import VALUES, Brightness, FakeModule, FakeTrainer, _batch
from test_module import Recorder


class Half(RewardModel):
    def score(self, inputs: RewardInputs) -> torch.Tensor:
        return torch.full((inputs.edits.shape[0],), 0.5)


def test_the_components_reach_the_decision_and_are_counted():
    reward = CombinedReward({"bright": Brightness(), "half": Half()}, {"bright": 3.0}, combine="advantage_sum")
    module, batch = FakeModule(VALUES), _batch(["a", "c"])
    cb = RewardCallback(reward, filter=FilterSettings(rule="none"), log_images_every_n_steps=0)
    cb.on_train_batch_start(FakeTrainer(), module, batch, 0)
    exp = batch["experience"]
    nan = float("nan")
    bright = torch.tensor([[0.1, 0.5, 0.9], [0.2, nan, 0.4]])
    torch.testing.assert_close(exp.components["bright"], bright, equal_nan=True)
    torch.testing.assert_close(exp.rewards, (3 * bright + 0.5) / 4, equal_nan=True)  # the weighted mean
    # "half" is constant: its advantages are 0, so A = 3·A_bright with bright's std over its finite scores
    finite = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.4], dtype=torch.float64)
    std = float(finite.std(unbiased=False)) + 1e-4
    a = 3 * torch.tensor([[-0.4, 0.0, 0.4], [-0.1, nan, 0.1]], dtype=torch.float64) / std
    torch.testing.assert_close(exp.decision.r, a.clamp(-5, 5) / 10 + 0.5, equal_nan=True)
    assert exp.decision.dropped_nan.tolist() == [False, True]
    assert module.logged["rewards/bright/nan"] == 1.0 and module.logged["rewards/half/nan"] == 0.0
    assert module.logged["reward/nan"] == 1.0


def test_on_failure_zero_zeroes_each_component():
    reward = CombinedReward({"bright": Brightness(), "half": Half()}, combine="advantage_sum")
    module, batch = FakeModule(VALUES), _batch(["c"])
    cb = RewardCallback(reward, on_failure="zero", filter=FilterSettings(rule="none"), log_images_every_n_steps=0)
    cb.on_train_batch_start(FakeTrainer(), module, batch, 0)
    exp = batch["experience"]
    assert exp.components["bright"][0].tolist() == pytest.approx([0.2, 0.0, 0.4])
    assert exp.rewards[0].tolist() == pytest.approx([0.35, 0.25, 0.45])
    assert cb.counts["rewards_failed_as_zero"] == 1


def test_a_training_step_trains_on_the_sum_of_the_components_advantages(scenes_data):
    reward = CombinedReward(
        {"scene": SceneReward(), "keep": PreservationReward()}, {"scene": 0.8, "keep": 0.2}, combine="advantage_sum"
    )
    cb = RewardCallback(model=reward, filter=FilterSettings(rule="none"), log_images_every_n_steps=0)
    rec = Recorder()
    trainer = small_trainer([cb, rec], max_steps=1)
    trainer.fit(small_module(), datamodule=scenes_data)
    (exp,) = rec.steps
    assert set(exp.components) == {"scene", "keep"} and exp.rewards.shape == (2, 4)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for name, w in (("scene", 0.8), ("keep", 0.2)):
        s = exp.components[name].double()
        expected += w * (s - s.mean(dim=1, keepdim=True)) / (s.std(unbiased=False) + 1e-4)  # global std (nft)
    torch.testing.assert_close(exp.decision.r, expected.clamp(-5, 5) / 10 + 0.5)
    torch.testing.assert_close(exp.rewards, 0.8 * exp.components["scene"] + 0.2 * exp.components["keep"])
    assert float(trainer.callback_metrics["nft/trained_samples"]) == 8
    assert "rewards/keep/mean" in trainer.callback_metrics and "rewards/scene/nan" in trainer.callback_metrics
