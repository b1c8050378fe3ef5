"""The reward interface: RewardInputs checks its lengths and slices consistently; RewardModel's defaults
(a synchronous submit whose Future carries the result or the exception, empty stats, no-op close/to)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from editr1.rewards.base import RewardInputs, RewardModel


def _inputs(n: int = 4, targets: bool = True, source_ids: bool = True) -> RewardInputs:
    return RewardInputs(
        sources=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2),
        edits=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2) + 10,
        instructions=[f"i{j}" for j in range(n)],
        requirements=[f"r{j}" for j in range(n)],
        targets=torch.zeros(n, 3, 2, 2) + torch.arange(n).view(n, 1, 1, 1) + 20 if targets else None,
        source_ids=[j // 2 for j in range(n)] if source_ids else None,
    )


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"sources": torch.zeros(3, 3, 2, 2)}, "4 edits but 3 sources"),
        ({"instructions": ["a"] * 5}, "5 instructions"),
        ({"requirements": []}, "0 requirements"),
        ({"targets": torch.zeros(2, 3, 2, 2)}, "4 edits but 2 targets"),
        ({"source_ids": [0, 1, 2]}, "4 edits but 3 source ids"),
    ],
)
def test_lengths_must_match_the_edits(change, words):
    fields = dict(vars(_inputs()))
    fields.update(change)
    with pytest.raises(ValueError, match=words):
        RewardInputs(**fields)


def test_optional_fields_may_be_left_out():
    x = RewardInputs(torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 1, 1), ["a", "b"], ["", ""])
    assert x.targets is None and x.source_ids is None
    empty = RewardInputs(torch.zeros(0, 3, 1, 1), torch.zeros(0, 3, 1, 1), [], [])
    assert empty.edits.shape[0] == 0


def test_select_slices_every_field_alike():
    x = _inputs(6).select(2, 5)
    assert x.instructions == ["i2", "i3", "i4"] and x.requirements == ["r2", "r3", "r4"]
    assert x.source_ids == [1, 1, 2]
    assert x.sources[:, 0, 0, 0].tolist() == [2.0, 3.0, 4.0]
    assert x.edits[:, 0, 0, 0].tolist() == [12.0, 13.0, 14.0]
    assert x.targets[:, 0, 0, 0].tolist() == [22.0, 23.0, 24.0]
    bare = _inputs(6, targets=False, source_ids=False).select(4, 10)  # past the end: clipped like a slice
    assert bare.targets is None and bare.source_ids is None and bare.instructions == ["i4", "i5"]
    assert _inputs(6).select(3, 3).edits.shape[0] == 0


class Brightness(RewardModel):
    """Mean edit brightness, clipped to [0, 1]; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        self.calls += 1
        return inputs.edits.mean(dim=(1, 2, 3)).clamp(0, 1)


class Broken(RewardModel):
    def score(self, inputs: RewardInputs) -> torch.Tensor:
        raise ConnectionError("judge unreachable")


def test_call_is_score():
    x = RewardInputs(
        torch.zeros(2, 3, 1, 1), torch.tensor([0.25, 2.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1), ["", ""], ["", ""]
    )
    m = Brightness()
    assert m(x).tolist() == [0.25, 1.0] and m.calls == 1


def test_submit_scores_at_once_and_returns_a_done_future():
    m = Brightness()
    x = RewardInputs(torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 0.5), ["a"], [""])
    fut = m.submit(x)
    assert isinstance(fut, Future) and fut.done() and m.calls == 1  # in the caller's thread, before returning
    assert fut.result().tolist() == [0.5]


def test_submit_carries_the_exception_to_whoever_asks_for_the_result():
    fut = Broken().submit(_inputs(2))  # does not raise here
    assert fut.done() and isinstance(fut.exception(), ConnectionError)
    with pytest.raises(ConnectionError, match="judge unreachable"):
        fut.result()


def test_defaults_stats_close_and_to():
    m = Brightness()
    assert m.stats() == {} and m.step_stats() == {}
    assert m.close() is None
    assert m.to("cpu") is m and m.to(torch.device("cpu")) is m


def test_score_is_abstract():
    with pytest.raises(TypeError):
        RewardModel()
