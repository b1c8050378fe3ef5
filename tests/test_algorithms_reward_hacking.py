"""The gold-reward alarm's rule by hand: training reward up and gold down at each of the last n validations."""

from __future__ import annotations

import pytest

from editr1.algorithms.reward_hacking import diverging


def test_training_up_and_gold_down_n_times_in_a_row():
    history = [(0.5, 0.6), (0.6, 0.55), (0.7, 0.5)]
    assert diverging(history, 2) and not diverging(history, 3)  # three changes needed, two seen
    assert not diverging([(0.5, 0.6), (0.6, 0.55), (0.7, 0.56)], 2)  # gold recovered at the last one
    assert not diverging([(0.5, 0.6), (0.5, 0.55), (0.7, 0.5)], 2)  # the training reward stalled once
    assert diverging([(0.9, 0.1), (0.5, 0.6), (0.6, 0.5)], 1)  # only the last n count
    assert not diverging([(0.5, 0.6), (float("nan"), 0.5), (0.7, 0.4)], 2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        diverging(history, 0)


def test_changes_within_min_delta_do_not_count():
    history = [(0.611, 0.846), (0.6112, 0.836), (0.6115, 0.823)]  # the judge flat, the gold falling
    assert diverging(history, 2) and not diverging(history, 2, min_delta=0.001)
    # rises of 0.1 and falls of 0.05 clear 0.04, not 0.05 (strictly more than min_delta)
    assert diverging([(0.5, 0.6), (0.6, 0.55), (0.7, 0.5)], 2, min_delta=0.04)
    assert not diverging([(0.5, 0.6), (0.6, 0.55), (0.7, 0.5)], 2, min_delta=0.05)
    with pytest.raises(ValueError, match="min_delta >= 0"):
        diverging(history, 2, min_delta=-0.1)
