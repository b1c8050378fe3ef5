"""Generic image helpers shared by data loading, policies, rewards, the reward server and visualisation.

* modes: :func:`to_rgb` (any PIL mode → RGB);
* PIL ↔ tensor: :func:`image_to_tensor`, :func:`tensor_to_image`, :func:`to_tensor_images` (a batch at a
  fixed size, cover-scaled and centre-cropped), :func:`to_tensor_masks` (greyscale edit masks alike);
* sizes: :func:`limit_pixels` (downscale to a pixel budget), :func:`thumbnail` (a small tensor preview);
* encoding: :func:`data_url` (an image as a base64 ``data:`` URL), :func:`data_url_bytes` (the bytes of
  one), :func:`decode_image` (a file or encoded bytes → image, refusing more than a pixel limit).

What is domain policy (which pixel limit, what a failure is called) stays with the caller.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image


# ---------------------------------------------------------------------------------------------- modes
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


# ---------------------------------------------------------------------------------------------- PIL <-> tensor
def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image of any mode → ``(3, H, W)`` float in [0, 1] (through :func:`to_rgb`)."""
    return pil_to_tensor(to_rgb(img)).float() / 255.0


def tensor_to_image(t: torch.Tensor, clamp: bool = True) -> Image.Image:
    """A ``(3, H, W)`` tensor in [0, 1] (any dtype, any device) → an RGB PIL image. ``clamp`` clips values
    outside [0, 1] first; without it they wrap around, as torchvision's ``to_pil_image`` does."""
    t = t.float()
    if clamp:
        t = t.clamp(0, 1)
    return to_pil_image(t.cpu())


def to_tensor_images(images: Sequence[Image.Image | torch.Tensor], height: int, width: int) -> torch.Tensor:
    """PIL images (any mode, any size) or (3, h, w) tensors in [0, 1] → ``(N, 3, height, width)`` float
    in [0, 1]: scaled to cover the target size, then centre-cropped (aspect ratio kept)."""
    out = []
    for img in images:
        if isinstance(img, Image.Image):
            t = image_to_tensor(img)
        elif isinstance(img, torch.Tensor):
            if img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(f"image tensors must have shape (3, H, W), got {tuple(img.shape)}")
            t = img.float()
        else:
            raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")
        out.append(cover_crop(t, height, width))
    if not out:
        raise ValueError("no images given")
    return torch.stack(out)


def to_tensor_masks(masks: Sequence[Image.Image | None], height: int, width: int) -> torch.Tensor:
    """Greyscale edit masks (white = the region to edit; any PIL mode, read as its luminance) → ``(N, 1, height,
    width)`` of 0.0 / 1.0: scaled and cropped as :func:`to_tensor_images` scales and crops the images they
    belong to, then 1 where the scaled value is at least one half. ``None`` (a row without a mask) is all ones:
    the whole image may change."""
    out = []
    for mask in masks:
        if mask is None:
            out.append(torch.ones(1, height, width))
            continue
        if not isinstance(mask, Image.Image):
            raise TypeError(f"expected a PIL mask or None, got {type(mask).__name__}")
        t = pil_to_tensor(to_rgb(mask).convert("L")).float() / 255.0
        out.append((cover_crop(t, height, width) >= 0.5).float())
    if not out:
        raise ValueError("no masks given")
    return torch.stack(out)


def cover_crop(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``(C, h, w)`` tensor scaled (bicubic, antialiased) to cover ``height x width``, then centre-cropped
    to it and clamped to [0, 1]; returned unchanged when it already has that size."""
    _, h, w = t.shape
    if (h, w) == (height, width):
        return t
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    t = F.interpolate(t[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (nh - height) // 2, (nw - width) // 2
    return t[:, top : top + height, left : left + width].clamp(0, 1)


# ---------------------------------------------------------------------------------------------- sizes
def limit_pixels(img: Image.Image, max_pixels: int | None) -> Image.Image:
    """Downscale (aspect kept) so that width·height ≤ max_pixels."""
    if max_pixels is None or img.width * img.height <= max_pixels:
        return img
    scale = (max_pixels / (img.width * img.height)) ** 0.5
    w, h = max(1, int(img.width * scale)), max(1, int(img.height * scale))
    # an extreme aspect ratio: a side held at 1 pixel leaves the other at most max_pixels long
    w, h = min(w, max(1, max_pixels // h)), min(h, max(1, max_pixels // w))
    return img.resize((w, h), Image.Resampling.BICUBIC)


def thumbnail(img: Image.Image | torch.Tensor, size: int = 128) -> torch.Tensor:
    """A preview of a PIL image or a ``(3, H, W)`` tensor in [0, 1]: fitted inside ``size x size`` (bicubic,
    aspect kept, never enlarged), as a ``(3, h, w)`` float tensor in [0, 1]."""
    if isinstance(img, torch.Tensor):
        img = tensor_to_image(img)
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    return pil_to_tensor(img.convert("RGB")).float() / 255


# ---------------------------------------------------------------------------------------------- encoding
def data_url(img: Image.Image, fmt: str = "png") -> str:
    """The image encoded as ``png`` or ``jpeg`` (PIL's default quality) in a base64 ``data:`` URL."""
    buf = io.BytesIO()
    mime = "jpeg" if fmt.lower() in ("jpg", "jpeg") else fmt.lower()
    img.save(buf, format=mime.upper())
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def data_url_bytes(url: str) -> bytes:
    """The encoded bytes a base64 ``data:`` URL carries; a ValueError saying what is wrong otherwise
    (never fetches anything)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ValueError("only base64 data: URLs are accepted for images (no remote fetching)")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ValueError("image data URLs must be base64-encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image data URL is not valid base64") from None


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed (the message says how many)."""


def decode_image(
    source: str | Path | bytes, max_pixels: int, convert: Callable[[Image.Image], Image.Image] = to_rgb
) -> Image.Image:
    """Decode a file or encoded bytes and return ``convert`` of it (default :func:`to_rgb`).

    The size is read from the header and more than ``max_pixels`` is refused before decoding, as is
    anything PIL's decompression-bomb guard flags: both raise :class:`ImageTooLarge`. Other failures
    propagate as PIL raises them (``FileNotFoundError``, ``OSError`` for unreadable data, ...).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
                if img.width * img.height > max_pixels:
                    raise ImageTooLarge(f"image of {img.width}x{img.height} exceeds {max_pixels} pixels")
                img.load()
                return convert(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("image exceeds the pixel limit") from None
