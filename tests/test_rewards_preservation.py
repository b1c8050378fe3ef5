"""The preservation reward: SSIM of edit and source, checked by hand on flat images, clamped, NaN for bad edits."""

from __future__ import annotations

import math

import pytest
import torch

from editr1.rewards.base import RewardInputs
from editr1.rewards.preservation import PreservationReward, preservation


def test_flat_images_by_hand():
    # flat images: no variance, so SSIM = (2ab + C1) / (a² + b² + C1) with C1 = (0.01 · data range)²
    a, b, c1 = 0.5, 0.25, 0.01**2
    sources = torch.full((2, 3, 16, 16), a)
    edits = torch.stack([torch.full((3, 16, 16), a), torch.full((3, 16, 16), b)])
    got = preservation(sources, edits)
    assert got.tolist() == pytest.approx([1.0, (2 * a * b + c1) / (a * a + b * b + c1)], abs=1e-6)


def test_negative_similarity_is_clamped_and_a_bad_edit_is_nan():
    torch.manual_seed(0)
    src = torch.rand(1, 3, 16, 16)
    edits = torch.cat([1 - src, src.clone()])
    edits[1, 0, 3, 3] = float("nan")
    got = preservation(torch.cat([src, src]), edits)
    assert 0.0 <= float(got[0]) < 0.05 and math.isnan(got[1])


def test_reward_model_and_its_checks():
    src = torch.rand(3, 3, 12, 12)
    reward = PreservationReward()
    assert reward(RewardInputs(src, src.clone(), ["x"] * 3, [""] * 3)).tolist() == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        preservation(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="one \\(N, C, H, W\\) shape"):
        preservation(torch.zeros(1, 3, 12, 12), torch.zeros(2, 3, 12, 12))
    with pytest.raises(ValueError, match="kernel_size odd"):
        PreservationReward(kernel_size=4)
