"""Several rewards as one: the weighted mean by hand, NaN from any component, per-component statistics and
failure counts, asynchronous components, and a config that composes with the demo."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.combined import CombinedReward, weighted_mean

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


class Fixed(RewardModel):
    """Returns the given scores, in order, one value per edit; optionally from another thread after a delay."""

    def __init__(self, values: list[float], delay: float = 0.0, needs_targets: bool = False) -> None:
        self.values, self.delay, self.needs_targets, self.closed = list(values), delay, needs_targets, False

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        n = inputs.edits.shape[0]
        out, self.values = self.values[:n], self.values[n:]
        return torch.tensor(out)

    def submit(self, inputs: RewardInputs) -> Future:
        if not self.delay:
            return super().submit(inputs)
        future: Future = Future()
        result = self.score(inputs)
        threading.Timer(self.delay, lambda: future.set_result(result)).start()
        return future

    def stats(self):
        return {"requests": 1.0}

    def close(self):
        self.closed = True


def _inputs(n: int) -> RewardInputs:
    return RewardInputs(torch.zeros(n, 3, 4, 4), torch.zeros(n, 3, 4, 4), ["x"] * n, [""] * n)


def test_weighted_mean_by_hand():
    scores = torch.tensor([[0.2, 1.0, NAN], [0.8, 0.0, 0.5]])
    out = weighted_mean(scores, torch.tensor([3.0, 1.0]))
    assert out[:2].tolist() == pytest.approx([(3 * 0.2 + 0.8) / 4, 3 / 4]) and math.isnan(out[2])
    zero_weight_nan = weighted_mean(torch.tensor([[NAN], [0.5]]), torch.tensor([0.0, 1.0]))
    assert math.isnan(zero_weight_nan[0])  # a component that failed fails the sample, whatever its weight
    with pytest.raises(ValueError, match="weights must be >= 0 with a positive sum"):
        weighted_mean(scores, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights must be >= 0 with a positive sum"):
        weighted_mean(scores, torch.tensor([0.0, 0.0]))


def test_components_scores_failures_and_statistics():
    judge, keep = Fixed([0.2, 1.0, NAN, 0.6]), Fixed([0.8, 0.0, 0.5, 1.0], needs_targets=True)
    reward = CombinedReward({"judge": judge, "keep": keep}, weights={"judge": 3.0})
    assert reward.weights == {"judge": 3.0, "keep": 1.0} and reward.needs_targets
    got = reward.score(_inputs(4))
    assert got[[0, 1, 3]].tolist() == pytest.approx([0.35, 0.75, 0.7]) and math.isnan(got[2])
    assert reward.stats() == {"failed/judge": 1.0, "failed/keep": 0.0, "judge/requests": 1.0, "keep/requests": 1.0}
    step = reward.step_stats()
    judged = torch.tensor([0.2, 1.0, 0.6], dtype=torch.float64)  # the judge's finite scores
    assert step["rewards/judge/mean"] == pytest.approx(float(judged.mean()))
    assert step["rewards/judge/std"] == pytest.approx(float(judged.std(unbiased=False)))
    assert step["rewards/keep/mean"] == pytest.approx(0.575)
    assert math.isnan(reward.step_stats()["rewards/judge/mean"])  # reset: nothing judged since
    reward.close()
    assert judge.closed and keep.closed


def test_submit_waits_for_every_component():
    reward = CombinedReward({"slow": Fixed([1.0, 0.0], delay=0.2), "now": Fixed([0.0, 0.0])})
    start = time.perf_counter()
    future = reward.submit(_inputs(2))
    assert time.perf_counter() - start < 0.15  # submitted, not waited on
    assert future.result(timeout=5).tolist() == pytest.approx([0.5, 0.0])


def test_bad_components_are_refused():
    with pytest.raises(ValueError, match="at least one model"):
        CombinedReward({})
    with pytest.raises(TypeError, match="'judge' is a function, not a RewardModel"):
        CombinedReward({"judge": lambda inputs: inputs})
    with pytest.raises(ValueError, match=r"weights for unknown models \['judg'\]"):
        CombinedReward({"judge": Fixed([])}, weights={"judg": 1.0})
    with pytest.raises(ValueError, match="returned 1 scores for 2 edits"):
        CombinedReward({"judge": Fixed([0.5])}).score(_inputs(2))


def test_the_shipped_config_composes_with_the_demo():
    from editr1.cli import cli_main
    from editr1.rewards.preservation import PreservationReward
    from editr1.rewards.scenes import SceneReward

    demo = str(ROOT / "configs" / "demo.yaml")
    cli = cli_main(["-c", demo, "-c", str(ROOT / "configs" / "reward" / "scene_plus_preservation.yaml")], run=False)
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "RewardCallback"]
    assert isinstance(cb.model, CombinedReward) and cb.model.weights == {"scene": 0.8, "preserve": 0.2}
    assert isinstance(cb.model.models["scene"], SceneReward)
    assert isinstance(cb.model.models["preserve"], PreservationReward)


def test_components_are_given_one_by_one_for_advantage_sum():
    reward = CombinedReward({"a": Fixed([0.2, NAN], delay=0.1), "b": Fixed([1.0, 0.5])}, combine="advantage_sum")
    assert reward.combine == "advantage_sum"
    parts = reward.submit_components(_inputs(2)).result(timeout=5)
    assert parts["a"][0] == pytest.approx(0.2) and math.isnan(parts["a"][1]) and parts["b"].tolist() == [1.0, 0.5]
    total = reward.total(parts)
    assert total[0] == pytest.approx(0.6) and math.isnan(total[1])
    step = reward.step_stats()  # the component NaN counts of the step, trl-style names
    assert step["rewards/a/nan"] == 1.0 and step["rewards/b/nan"] == 0.0
    assert reward.stats()["failed/a"] == 1.0
    with pytest.raises(ValueError, match="combine must be one of"):
        CombinedReward({"a": Fixed([])}, combine="sum")
