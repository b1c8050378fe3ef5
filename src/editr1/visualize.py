"""Image grids with captions for TensorBoard: one row per group, source | K edits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor

from editr1.images import tensor_to_image

CAPTION_PX = 12
MIN_TILE = 96


def captioned_grid(
    rows: list[list[torch.Tensor]], captions: list[list[str]], pad: int = 2, titles: list[str] | None = None
) -> torch.Tensor:
    """``rows[i][j]``: a (3, H, W) image in [0, 1]; ``captions[i][j]`` is drawn under it; ``titles[i]`` (e.g.
    the instruction) over the whole row, cut to the row's width.

    Small images are enlarged (nearest neighbour) to at least 96 px so pixels and text stay legible.
    Returns a (3, H', W') uint8 tensor for ``SummaryWriter.add_image``.
    """
    if not rows or not rows[0]:
        raise ValueError("captioned_grid needs at least one image")
    if len(captions) != len(rows):
        raise ValueError(f"{len(rows)} rows of images but {len(captions)} rows of captions")
    h, w = rows[0][0].shape[-2:]
    scale = max(1, -(-MIN_TILE // max(h, w)))
    th, tw = h * scale, w * scale
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"{len(rows)} rows of images but {len(titles)} titles")
    cols = max(len(r) for r in rows)
    title_h = CAPTION_PX if titles is not None else 0
    cell_h = title_h + th + CAPTION_PX + pad
    width = cols * (tw + pad) + pad
    canvas = Image.new("RGB", (width, len(rows) * cell_h + pad), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (row, caps) in enumerate(zip(rows, captions)):
        if titles is not None and titles[i]:
            draw.text(
                (pad + 1, pad + i * cell_h),
                titles[i][: max(4, (width - 2 * pad) // 6)],
                fill=(255, 220, 120),
                font=font,
            )
        for j, img in enumerate(row):
            tile = F.interpolate(img[None].float().clamp(0, 1), scale_factor=scale, mode="nearest")[0]
            x, y = pad + j * (tw + pad), pad + i * cell_h + title_h
            canvas.paste(tensor_to_image(tile), (x, y))
            if j < len(caps) and caps[j]:
                draw.text((x + 1, y + th), caps[j][: max(4, tw // 6)], fill=(230, 230, 230), font=font)
    return pil_to_tensor(canvas)
