"""Tests for the verifiable scene reward (editr1.rewards.scenes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from editr1.data.scenes import TASKS, SceneConfig, make_example
from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.scenes import SceneReward, scene_reward


def to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def gray(values) -> torch.Tensor:
    """(1, 3, H, W) image whose channels all equal ``values`` (an H x W nested list)."""
    return torch.tensor(values, dtype=torch.float32)[None, None].repeat(1, 3, 1, 1)


def hand_example():
    # Only pixel (0, 0) should change (black -> white).
    source = gray([[0.0, 0.0], [0.0, 0.0]])
    target = gray([[1.0, 0.0], [0.0, 0.0]])
    edit = gray([[0.9, 0.05], [0.0, 0.5]])
    edit[0, :, 0, 0] = torch.tensor([0.7, 1.0, 1.0])  # channel errors 0.3, 0, 0 -> e = 0.1 -> s = 0.6
    # s: changed pixel 0.6; kept pixels 0.8 (e=0.05), 1.0, 0.0 (e=0.5 > tolerance) -> mean 0.6
    return edit, target, source


def test_hand_computed_value():
    edit, target, source = hand_example()
    r = scene_reward(edit, target, source)
    assert r.shape == (1,) and r.dtype == torch.float32
    assert r.item() == pytest.approx(0.5 * 0.6 + 0.5 * (0.8 + 1.0 + 0.0) / 3, abs=1e-6)
    # tolerance 0.5: s = 0.8 on the changed pixel; kept 0.9, 1.0, 0.0
    r = scene_reward(edit, target, source, tolerance=0.5)
    assert r.item() == pytest.approx(0.5 * 0.8 + 0.5 * 1.9 / 3, abs=1e-6)
    # change_threshold above the change: nothing counts as changed -> plain mean over all 4 pixels
    r = scene_reward(edit, target, source, change_threshold=1.0)
    assert r.item() == pytest.approx((0.6 + 0.8 + 1.0 + 0.0) / 4, abs=1e-6)


def test_region_weighting_4x4():
    # One changed pixel out of 16; getting only it right is worth 0.5, only the rest right 0.5.
    source = torch.zeros(2, 3, 4, 4)
    target = source.clone()
    target[:, :, 1, 2] = 1.0
    edits = torch.stack([target[0], source[0]])
    edits[0, :, 0, 0] = 1.0  # right change, one of 15 kept pixels wrong
    r = scene_reward(edits, target, source)
    assert r[0].item() == pytest.approx(0.5 + 0.5 * 14 / 15, abs=1e-6)
    assert r[1].item() == pytest.approx(0.5, abs=1e-6)


def test_empty_and_full_change_masks():
    source = gray([[0.2, 0.2], [0.2, 0.2]])
    edit = gray([[0.2, 0.3], [0.2, 0.45]])  # s = 1, 0.6, 1, 0
    assert scene_reward(edit, source, source).item() == pytest.approx(2.6 / 4, abs=1e-6)
    target = gray([[1.0, 1.0], [1.0, 1.0]])
    edit = gray([[1.0, 0.9], [0.5, 1.0]])  # every pixel changes; s = 1, 0.6, 0, 1
    assert scene_reward(edit, target, source).item() == pytest.approx(2.6 / 4, abs=1e-6)


def test_nan_edit_gives_nan_for_that_sample_only():
    edit, target, source = hand_example()
    edits = torch.cat([edit, edit, edit])
    edits[1, 2, 1, 1] = float("nan")  # a kept pixel
    edits[2, 0, 0, 0] = float("nan")  # the changed pixel
    r = scene_reward(edits, target.repeat(3, 1, 1, 1), source.repeat(3, 1, 1, 1))
    assert not math.isnan(r[0].item()) and r[0].item() == pytest.approx(0.6, abs=1e-6)
    assert math.isnan(r[1].item()) and math.isnan(r[2].item())


def test_rewards_stay_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    x = [torch.rand(8, 3, 6, 6, generator=g) for _ in range(3)]
    r = scene_reward(x[0] * 3 - 1, x[1], x[2])  # out-of-range edits are still scored in [0, 1]
    assert r.shape == (8,) and ((r >= 0) & (r <= 1)).all()


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4)),  # batch
        ((1, 3, 4, 4), (1, 3, 4, 5), (1, 3, 4, 4)),  # width
        ((1, 3, 4, 4), (1, 3, 4, 4), (1, 3, 8, 8)),  # source size
        ((1, 4, 4, 4), (1, 4, 4, 4), (1, 4, 4, 4)),  # channels
        ((3, 4, 4), (3, 4, 4), (3, 4, 4)),  # no batch dimension
    ],
)
def test_shape_errors(shapes):
    with pytest.raises(ValueError, match="shape"):
        scene_reward(*(torch.zeros(s) for s in shapes))


def test_other_input_errors():
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="float"):
        scene_reward(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), x, x)
    with pytest.raises(ValueError, match="tolerance"):
        scene_reward(x, x, x, tolerance=0)
    with pytest.raises(ValueError, match="finite"):
        scene_reward(x, x * float("nan"), x)


@pytest.mark.parametrize("task", TASKS)
def test_identity_half_and_target_full_on_scenes(task):
    config = SceneConfig(tasks=[task])
    examples = [make_example(seed, config) for seed in range(12)]
    sources = torch.stack([to_tensor(e["image"]) for e in examples])
    targets = torch.stack([to_tensor(e["target"]) for e in examples])
    assert torch.allclose(scene_reward(sources, targets, sources), torch.full((12,), 0.5))
    assert torch.allclose(scene_reward(targets, targets, sources), torch.ones(12))
    # half the changes made: strictly between
    blend = sources.clone()
    blend[..., : blend.shape[-1] // 2] = targets[..., : blend.shape[-1] // 2]
    r = scene_reward(blend, targets, sources)
    assert ((r >= 0.5) & (r <= 1.0)).all()


def make_inputs(n=3, targets=True, dtype=torch.float32):
    examples = [make_example(seed, SceneConfig()) for seed in range(n)]
    src = torch.stack([to_tensor(e["image"]) for e in examples]).to(dtype)
    tgt = torch.stack([to_tensor(e["target"]) for e in examples]).to(dtype)
    return (
        RewardInputs(
            sources=src,
            edits=tgt.clone(),
            instructions=[e["prompt"] for e in examples],
            requirements=[e["requirement"] for e in examples],
            targets=tgt if targets else None,
        ),
        src,
        tgt,
    )


def test_scene_reward_model():
    model = SceneReward()
    assert isinstance(model, RewardModel) and model.to("cpu") is model
    inputs, src, tgt = make_inputs()
    r = model(inputs)
    assert r.dtype == torch.float32 and r.device.type == "cpu" and r.shape == (3,)
    assert torch.allclose(r, torch.ones(3))
    inputs.edits = src.clone()
    assert torch.allclose(model.score(inputs), torch.full((3,), 0.5))
    inputs.edits = tgt + 0.05  # e = 0.05 everywhere: s = 1 - 0.05 / tolerance
    assert torch.allclose(model.score(inputs), torch.full((3,), 0.8))
    assert torch.allclose(SceneReward(tolerance=0.5).score(inputs), torch.full((3,), 0.9))


def test_scene_reward_model_accepts_other_float_dtypes():
    inputs, _, _ = make_inputs(dtype=torch.float64)
    r = SceneReward()(inputs)
    assert r.dtype == torch.float32 and torch.allclose(r, torch.ones(3))


def test_scene_reward_model_needs_targets():
    inputs, _, _ = make_inputs(targets=False)
    with pytest.raises(ValueError, match="target"):
        SceneReward().score(inputs)
    with pytest.raises(ValueError, match="tolerance"):
        SceneReward(tolerance=-1)
