"""Tests for the captioned image grids logged to TensorBoard (editr1.visualize)."""

from __future__ import annotations

import pytest
import torch

from editr1.visualize import CAPTION_PX, MIN_TILE, captioned_grid

PAD = 2


def _rows(n_rows: int = 2, n_cols: int = 3, size: int = 32) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [[torch.rand(3, size, size, generator=g) for _ in range(n_cols)] for _ in range(n_rows)]


def _tile_origin(i: int, j: int, tile: int) -> tuple[int, int]:
    return PAD + i * (tile + CAPTION_PX + PAD), PAD + j * (tile + PAD)


def test_grid_shape_dtype_and_enlarged_tiles():
    rows = _rows()
    captions = [["source", "edit 1", "edit 2"], ["src", "a", "b"]]
    grid = captioned_grid(rows, captions, pad=PAD)
    tile = 96  # 32 px enlarged ×3 to reach MIN_TILE
    assert tile >= MIN_TILE
    assert grid.dtype == torch.uint8
    assert grid.shape == (3, 2 * (tile + CAPTION_PX + PAD) + PAD, 3 * (tile + PAD) + PAD)
    # each tile is its image, enlarged by nearest neighbour
    for i in range(2):
        for j in range(3):
            y, x = _tile_origin(i, j, tile)
            got = grid[:, y : y + tile, x : x + tile].float() / 255
            expected = rows[i][j].repeat_interleave(3, 1).repeat_interleave(3, 2)
            assert (got - expected).abs().max() <= 1 / 255 + 1e-6


def test_captions_are_drawn_under_tiles():
    rows = _rows()
    plain = captioned_grid(rows, [["", "", ""], ["", "", ""]], pad=PAD)
    captioned = captioned_grid(rows, [["source", "edit", ""], ["", "", "score 4.5"]], pad=PAD)
    assert plain.shape == captioned.shape
    diff = (plain != captioned).any(0)
    assert diff.any()
    tile = 96
    for (i, j), has_text in {(0, 0): True, (0, 1): True, (0, 2): False, (1, 0): False, (1, 2): True}.items():
        y, x = _tile_origin(i, j, tile)
        # images themselves are never overwritten; the caption strip below changes iff captioned
        assert not diff[y : y + tile, x : x + tile].any()
        assert bool(diff[y + tile : y + tile + CAPTION_PX + PAD, x : x + tile].any()) == has_text


def test_large_images_are_not_scaled_and_rows_can_be_ragged():
    g = torch.Generator().manual_seed(1)
    rows = [[torch.rand(3, 100, 120, generator=g)], [torch.rand(3, 100, 120, generator=g)] * 2]
    grid = captioned_grid(rows, [["one"], ["two"]])
    assert grid.shape == (3, 2 * (100 + CAPTION_PX + PAD) + PAD, 2 * (120 + PAD) + PAD)
    got = grid[:, PAD : PAD + 100, PAD : PAD + 120].float() / 255
    assert (got - rows[0][0]).abs().max() <= 1 / 255 + 1e-6


def test_values_are_clamped():
    img = torch.full((3, 32, 32), 2.0)
    img[0] = -1.0
    grid = captioned_grid([[img]], [[""]])
    tile = grid[:, PAD : PAD + 96, PAD : PAD + 96]
    assert torch.all(tile[0] == 0) and torch.all(tile[1:] == 255)


def test_empty_input_raises():
    with pytest.raises(ValueError):
        captioned_grid([], [])
    with pytest.raises(ValueError):
        captioned_grid([[]], [[]])


def test_thumbnail_and_tensor_image_round_trip():
    from PIL import Image

    from editr1.images import image_to_tensor, tensor_to_image, thumbnail

    t = torch.rand(3, 40, 80, generator=torch.Generator().manual_seed(1))
    img = tensor_to_image(t)
    assert img.size == (80, 40) and img.mode == "RGB"
    torch.testing.assert_close(image_to_tensor(img), t, atol=1 / 255, rtol=0)
    assert tensor_to_image(t * 3 - 1).getextrema() == ((0, 255),) * 3  # clamped, not wrapped
    small = thumbnail(t, size=32)  # aspect kept, fitted inside 32 x 32
    assert small.shape == (3, 16, 32) and small.dtype == torch.float32 and 0 <= small.min() <= small.max() <= 1
    assert thumbnail(Image.new("RGBA", (20, 10)), size=128).shape == (3, 10, 20)  # never enlarged


def test_row_titles_add_a_line_over_each_row():
    img = torch.zeros(3, 8, 8)
    plain = captioned_grid([[img, img]], [["a", "b"]])
    titled = captioned_grid([[img, img]], [["a", "b"]], titles=["make the circle red"])
    assert titled.shape[1] == plain.shape[1] + 12 and titled.shape[2] == plain.shape[2]
    assert titled[:, :12].float().sum() > plain[:, :2].float().sum()  # the title was drawn in the new band
    with pytest.raises(ValueError, match="titles"):
        captioned_grid([[img]], [["a"]], titles=["x", "y"])
