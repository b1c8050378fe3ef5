"""Image mode handling shared by data loading and policies."""

from __future__ import annotations

from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: 16-bit greyscale scaled to 8 bits, transparency composited on white,
    CMYK / palette / greyscale converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")
