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
