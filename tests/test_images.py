"""editr1.images beyond what the callers' tests check (to_tensor_images: test_policy_base.py; thumbnail and
the plain round trip: test_visualize.py; data URLs and decode limits: test_reward_server.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from editr1.images import (
    ImageTooLarge,
    cover_crop,
    data_url,
    data_url_bytes,
    decode_image,
    image_to_tensor,
    limit_pixels,
    tensor_to_image,
    to_rgb,
)


def _random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- modes
def test_sixteen_bit_greyscale_is_scaled_to_eight_bits():
    img = Image.fromarray(np.array([[0, 100 * 256, 65535]], dtype=np.uint16))
    assert img.mode == "I;16"
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and [rgb.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (100,) * 3, (255,) * 3]


def test_transparency_is_composited_on_white():
    assert to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128))).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1  # palette entry 1 (blue) is transparent
    rgb = to_rgb(pal)
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------- PIL <-> tensor
def test_tensor_image_round_trip_is_exact_on_the_255_grid():
    img = _random_image(7, 5)
    t = image_to_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and 0 <= t.min() <= t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_image(t)), np.asarray(img))
    # any dtype and 0.5/255 inside a level still lands on that level
    for dtype in (torch.float64, torch.bfloat16):
        back = tensor_to_image((t.double() + 0.2 / 255).to(dtype))
        assert np.abs(np.asarray(back).astype(int) - np.asarray(img)).max() <= 1


def test_without_clamp_out_of_range_values_wrap_as_torchvision_does():
    t = torch.tensor([1.5, -0.5, 0.5]).view(3, 1, 1)
    assert tensor_to_image(t).getpixel((0, 0)) == (255, 0, 127)
    assert tensor_to_image(t, clamp=False).getpixel((0, 0)) == (382 % 256, (-127) % 256, 127)
    inside = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert tensor_to_image(inside, clamp=False).tobytes() == tensor_to_image(inside).tobytes()


def test_cover_crop_returns_the_tensor_itself_at_the_target_size_and_clamps_otherwise():
    t = torch.rand(3, 6, 8) * 3 - 1  # out of range on purpose
    assert cover_crop(t, 6, 8) is t
    out = cover_crop(t, 3, 3)
    assert out.shape == (3, 3, 3) and out.min() >= 0 and out.max() <= 1


# ---------------------------------------------------------------------------------------------- sizes
def test_limit_pixels_keeps_small_images_and_none_budgets_as_they_are():
    img = _random_image(20, 10)
    assert limit_pixels(img, None) is img
    assert limit_pixels(img, 200) is img  # exactly at the budget


@pytest.mark.parametrize(
    ("size", "budget", "expected"), [((640, 480), 640 * 480 // 4, (320, 240)), ((33, 17), 100, (13, 7))]
)
def test_limit_pixels_downscales_within_the_budget_and_keeps_the_aspect(size, budget, expected):
    out = limit_pixels(_random_image(*size), budget)
    assert out.size == expected and out.width * out.height <= budget
    assert abs(out.width / out.height - size[0] / size[1]) < 0.25


def test_limit_pixels_respects_the_budget_even_for_extreme_aspect_ratios():
    out = limit_pixels(Image.new("RGB", (1000, 1)), 10)
    assert out.width * out.height <= 10


# ---------------------------------------------------------------------------------------------- encoding
def test_data_url_decodes_back_to_the_same_pixels():
    img = _random_image(9, 6, seed=3)
    for fmt, mime in (("png", "png"), ("PNG", "png"), ("JPG", "jpeg"), ("jpeg", "jpeg")):
        url = data_url(img, fmt)
        assert url.startswith(f"data:image/{mime};base64,")
        back = decode_image(data_url_bytes(url), 9 * 6)
        assert back.size == (9, 6) and back.mode == "RGB"
        if mime == "png":  # lossless
            assert np.array_equal(np.asarray(back), np.asarray(img))


def test_data_url_bytes_refuses_non_strings():
    for bad in (None, b"data:image/png;base64,AAAA", 3):
        with pytest.raises(ValueError, match="data: URLs"):
            data_url_bytes(bad)


def test_decode_image_reads_paths_bytes_and_bytearrays_and_applies_convert(tmp_path):
    img = _random_image(4, 3, seed=5)
    img.save(tmp_path / "x.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    for source in (tmp_path / "x.png", str(tmp_path / "x.png"), buf.getvalue(), bytearray(buf.getvalue())):
        assert np.array_equal(np.asarray(decode_image(source, 12)), np.asarray(img))
    grey = decode_image(buf.getvalue(), 12, convert=lambda im: im.convert("L"))
    assert grey.mode == "L" and grey.size == (4, 3)
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "absent.png", 12)
    with pytest.raises(OSError):
        decode_image(b"not an image", 12)


def test_decompression_bomb_guard_becomes_image_too_large(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (12, 8)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # PIL warns above 40 pixels and refuses above 80
    with pytest.raises(ImageTooLarge, match="pixel limit"):
        decode_image(buf.getvalue(), 10_000)
    assert issubclass(ImageTooLarge, ValueError)
