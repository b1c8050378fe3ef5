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
    # torchmetrics' Gaussian window comes from sigma (2·int(3.5σ + 0.5) + 1): a kernel_size that is not it is refused
    assert PreservationReward().kernel_size == 11 and PreservationReward(sigma=0.8).kernel_size == 7
    with pytest.raises(ValueError, match="window for sigma 1.5 is 11 pixels, not kernel_size 7"):
        PreservationReward(kernel_size=7)
    with pytest.raises(ValueError, match="window for sigma 1.5 is 11 pixels, not kernel_size 7"):
        preservation(src, src, kernel_size=7)


def test_masked_ssim_by_hand():
    # source flat a; edit a in columns 0-15, b in 16-31; the mask (white = edit) covers columns 8-23. Outside it,
    # columns 0-7 see only a within the 11-pixel window (SSIM 1) and columns 24-31 only b (the reflected border
    # too): the flat formula. The masked SSIM is their mean; the unmasked one also counts the mixed windows.
    a, b, c1 = 0.5, 0.25, 0.01**2
    flat = (2 * a * b + c1) / (a * a + b * b + c1)
    source = torch.full((1, 3, 32, 32), a)
    edit = source.clone()
    edit[..., 16:] = b
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24] = 1
    got = preservation(source, edit, masks=mask)
    assert float(got) == pytest.approx((1 + flat) / 2, abs=1e-6)
    whole = preservation(source, edit)
    assert float(whole) != pytest.approx(float(got), abs=1e-3)
    # a mask over every pixel leaves nothing outside it: the whole image's SSIM
    assert float(preservation(source, edit, masks=torch.ones(1, 1, 32, 32))) == pytest.approx(float(whole))
    with pytest.raises(ValueError, match="masks of shape"):
        preservation(source, edit, masks=torch.ones(1, 32, 32))


def test_the_reward_measures_outside_the_mask_only_when_asked():
    a, b = 0.5, 0.25
    source = torch.full((2, 3, 16, 16), a)
    edit = source.clone()
    edit[0, :, :, 8:] = b  # changed only where the mask allows: nothing outside it changed
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, :, 2:] = 1
    masks[1] = 1  # a row without a mask in a batch with masks: all ones
    inputs = RewardInputs(source, edit, ["x"] * 2, [""] * 2, masks=masks)
    outside = PreservationReward(outside_mask=True)
    assert outside(inputs).tolist() == pytest.approx([1.0, 1.0])
    assert outside.stats() == {"whole_image_rows": 1.0}
    assert float(PreservationReward()(inputs)[0]) < 0.9  # by default, the mask is not looked at
