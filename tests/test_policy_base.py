"""Tests for the shared policy interface (editr1.policies.base): Condition indexing, image
preprocessing, dtype names and the behaviour every EditPolicy inherits (eval mode, adapters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from editr1.dtypes import DTYPES, resolve_dtype
from editr1.images import to_tensor_images
from editr1.policies.base import Condition, EditPolicy
from editr1.policies.lora import LoraSettings


# ------------------------------------------------------------------------------- Condition
def _condition() -> Condition:
    return Condition(
        tensors={"a": torch.arange(3.0)[:, None].repeat(1, 4), "b": torch.arange(6).view(3, 2)},
        shared={"ids": torch.tensor([7, 8, 9])},
    )


def test_condition_len_and_getitem():
    c = _condition()
    assert len(c) == 3
    assert torch.equal(c["ids"], torch.tensor([7, 8, 9]))
    assert torch.equal(c["b"], torch.arange(6).view(3, 2))
    with pytest.raises(KeyError):
        c["missing"]


@pytest.mark.parametrize("index", [[2, 0, 0, 1], torch.tensor([2, 0, 0, 1]), (2, 0, 0, 1)])
def test_condition_select_repeats_rows(index):
    c = _condition()
    s = c.select(index)
    assert len(s) == 4
    assert torch.equal(s["a"][:, 0], torch.tensor([2.0, 0.0, 0.0, 1.0]))
    assert torch.equal(s["b"], torch.tensor([[4, 5], [0, 1], [0, 1], [2, 3]]))
    assert torch.equal(s["ids"], c["ids"])  # shared entries are not indexed
    assert torch.equal(c["a"][:, 0], torch.arange(3.0))  # the original is untouched


def test_condition_to():
    c = _condition().to("cpu")
    assert c["a"].device.type == "cpu" and c["ids"].device.type == "cpu"
    assert torch.equal(c["ids"], torch.tensor([7, 8, 9]))


# ------------------------------------------------------------------------------- images
def test_to_tensor_images_modes_and_sizes():
    imgs = [
        Image.new("RGBA", (10, 30), (255, 0, 0, 255)),
        Image.new("L", (100, 100), 128),
        Image.new("CMYK", (16, 16), (0, 0, 0, 0)),
        torch.full((3, 8, 12), 0.25),
    ]
    out = to_tensor_images(imgs, 16, 24)
    assert out.shape == (4, 3, 16, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 16, 24), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[1], torch.full((3, 16, 24), 128 / 255), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[2], torch.ones(3, 16, 24), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[3], torch.full((3, 16, 24), 0.25), atol=1e-3, rtol=0)


def test_to_tensor_images_same_size_is_exact_and_in_range():
    a = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    out = to_tensor_images([Image.fromarray(a)], 16, 24)
    assert torch.equal(out[0], torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    up = to_tensor_images([Image.fromarray(a)], 40, 40)  # bicubic overshoot is clamped
    assert up.min() >= 0 and up.max() <= 1


def test_to_tensor_images_centre_crop_keeps_aspect():
    a = np.zeros((40, 20, 3), dtype=np.uint8)  # tall: black top / white middle / black bottom
    a[6:34] = 255  # the centre crop (rows 10..30) is white with a margin for the antialiasing filter
    out = to_tensor_images([Image.fromarray(a)], 10, 10)  # scale 0.5 → 20x10, centre 10 rows
    assert out.shape == (1, 3, 10, 10)
    assert out.min() > 0.95


def test_to_tensor_images_errors():
    with pytest.raises(ValueError):
        to_tensor_images([], 8, 8)
    with pytest.raises(ValueError):
        to_tensor_images([torch.rand(4, 8, 8)], 8, 8)
    with pytest.raises(TypeError):
        to_tensor_images(["image.png"], 8, 8)


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="torch_dtype") as err:
        resolve_dtype("fp32")
    assert all(name in str(err.value) for name in DTYPES)  # the message lists the choices


def test_shared_helpers_have_one_home():
    from editr1 import asset_paths, dtypes, images
    from editr1.policies import base, flux_kontext, qwen_image_edit
    from editr1.rewards import mllm

    assert not hasattr(base, "DTYPES") and not hasattr(base, "resolve_dtype")  # the one table is editr1.dtypes
    assert flux_kontext.resolve_dtype is qwen_image_edit.resolve_dtype is mllm.resolve_dtype is dtypes.resolve_dtype
    assert base.to_tensor_images is images.to_tensor_images and base.resolve_asset is asset_paths.resolve_asset


# ------------------------------------------------------------------------------- EditPolicy
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.to_q(x))


class _DummyPolicy(EditPolicy):
    def __init__(self, height: int = 8, width: int = 8) -> None:
        super().__init__(height, width)
        torch.manual_seed(0)
        self.transformer = _Block()
        self.requires_grad_(False)
        self.eval()

    def encode(self, images, prompts):
        return Condition({"images": images})

    def velocity(self, x_t, t, cond):
        return self.transformer(x_t)

    def encode_images(self, images):
        return images.flatten(1)

    def decode(self, latents):
        return latents

    def latent_shape(self):
        return (4,)

    def sigmas(self, num_steps):
        return torch.linspace(1, 0, num_steps + 1)


def test_policy_validates_resolution():
    with pytest.raises(ValueError):
        _DummyPolicy(0, 8)
    with pytest.raises(ValueError):
        _DummyPolicy(8, -1)


def test_policy_never_enters_train_mode():
    p = _DummyPolicy()
    p.transformer.train()  # even a component switched on by hand is reset
    assert p.train() is p
    assert not p.training and not p.transformer.training and not p.transformer.drop.training
    x = torch.randn(2, 4)
    assert torch.equal(p.velocity(x, None, None), p.velocity(x, None, None))  # dropout off


def test_policy_preprocess_and_device():
    p = _DummyPolicy(8, 12)
    out = p.preprocess([Image.new("RGB", (30, 30), (0, 255, 0))])
    assert out.shape == (1, 3, 8, 12) and out.device == p.device == torch.device("cpu")


def test_policy_adapters():
    p = _DummyPolicy()
    x = torch.randn(3, 4)
    base = p.velocity(x, None, None)
    p.add_adapters(LoraSettings(rank=2, alpha=2, target_modules=["to_q"]), ["default", "old"])
    params = p.trainable_parameters()
    assert params and all(q.requires_grad for q in params)
    assert sum(q.numel() for q in params) == 2 * (4 * 2)  # lora_A (2x4) + lora_B (4x2)
    with torch.no_grad():
        for q in params:
            q.add_(0.5)
    moved = p.velocity(x, None, None)
    assert not torch.allclose(moved, base)
    with p.adapter(None):
        torch.testing.assert_close(p.velocity(x, None, None), base)
    with p.adapter("old"):
        torch.testing.assert_close(p.velocity(x, None, None), base)  # old still zero-init (B = 0)
    torch.testing.assert_close(p.velocity(x, None, None), moved)
    assert all(q.requires_grad for q in p.trainable_parameters())


def test_a_policy_without_example_condition_says_so():
    with pytest.raises(NotImplementedError, match="_DummyPolicy does not describe its condition"):
        _DummyPolicy().example_condition(2)
