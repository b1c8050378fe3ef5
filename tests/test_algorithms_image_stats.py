"""Rollout image statistics by hand (half-black/half-white and pure colour images), NaN edits left out, and the
bounds of reward.image_limits."""

from __future__ import annotations

import math

import pytest
import torch

from editr1.algorithms.image_stats import STATS, check_limits, image_stats, out_of_bounds


def test_statistics_by_hand():
    half = torch.zeros(1, 3, 4, 4)
    half[..., 2:] = 1.0  # left half black, right half white: grey, Y 0 or 1
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0  # Y = 0.299 everywhere, fully saturated
    got = image_stats(torch.cat([half, red]), torch.zeros(2, 3, 4, 4))
    assert got["brightness"] == pytest.approx((0.5 + 0.299) / 2)
    assert got["saturation"] == pytest.approx((0 + 1) / 2)  # grey pixels have S = 0 (black: max = 0 → 0)
    assert got["contrast"] == pytest.approx((0.5 + 0.0) / 2)  # std of Y within each image
    assert got["frac_near_black"] == pytest.approx(8 / 32) and got["frac_near_white"] == pytest.approx(8 / 32)
    assert got["edit_distance"] == pytest.approx((0.5 + 1 / 3) / 2)  # mean |edit − source| over all values


def test_non_finite_edits_are_left_out():
    edits = torch.stack([torch.full((3, 2, 2), 0.2), torch.full((3, 2, 2), float("nan"))])
    got = image_stats(edits, torch.zeros(2, 3, 2, 2))
    assert got["brightness"] == pytest.approx(0.2) and got["edit_distance"] == pytest.approx(0.2)
    assert all(math.isnan(v) for v in image_stats(edits[1:], torch.zeros(1, 3, 2, 2)).values())
    with pytest.raises(ValueError, match="one \\(N, 3, H, W\\) shape"):
        image_stats(edits, torch.zeros(1, 3, 2, 2))


def test_bounds():
    limits = check_limits({"frac_near_black": [None, 0.5], "edit_distance": [0.01, None]})
    stats = dict.fromkeys(STATS, 0.3) | {"frac_near_black": 0.75, "edit_distance": 0.001}
    assert out_of_bounds(stats, limits) == ["frac_near_black 0.75 > 0.5", "edit_distance 0.001 < 0.01"]
    assert out_of_bounds(dict.fromkeys(STATS, float("nan")), limits) == []  # nothing measured, nothing broken
    with pytest.raises(ValueError, match="unknown statistic 'brightnes'; known: brightness"):
        check_limits({"brightnes": [0, 1]})
    with pytest.raises(ValueError, match="low 0.9 > high 0.1"):
        check_limits({"brightness": [0.9, 0.1]})
    with pytest.raises(ValueError, match=r"give \[low, high\]"):
        check_limits({"brightness": [0.9]})
