"""Tests for UniWorld-format folders (editr1.data.jsonl): row validation with counted reasons,
robust image loading, and the map-style dataset."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editr1.data import jsonl
from editr1.data.jsonl import EditRecord, JsonlEditDataset, load_image, parse_line, read_metadata


def _save(path: Path, color=(10, 20, 30), size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _write(folder: Path, lines: list) -> None:
    with (folder / "train_metadata.jsonl").open("w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


GOOD = [
    {"prompt": "make the sky purple", "image": "images/a.png", "requirement": "keep the buildings", "task": "recolor"},
    {"prompt": "  remove the cat  ", "image": "images/b.png"},
    {"prompt": "add a hat", "image": "images/a.png", "target": "images/t.png", "requirement": None, "task": None},
    {"prompt": "make the sky purple", "image": "images/b.png", "requirement": "  tidy  "},
]
BAD = {
    "malformed_json": ['{"prompt": "x", "image": "images/a.png"'],
    "not_an_object": ['["images/a.png", "x"]', '"just a string"'],
    "missing_prompt": [{"image": "images/a.png"}, {"prompt": 3, "image": "images/a.png"}],
    "empty_prompt": [{"prompt": "   ", "image": "images/a.png"}],
    "overlong_prompt": [{"prompt": "x" * (jsonl.MAX_INSTRUCTION_CHARS + 1), "image": "images/a.png"}],
    "missing_image_field": [{"prompt": "x"}, {"prompt": "x", "image": ""}, {"prompt": "x", "image": 5}],
    "missing_image_file": [{"prompt": "x", "image": "images/nope.png"}, {"prompt": "x", "image": "images"}],
    "image_outside_folder": [{"prompt": "x", "image": "../outside.png"}, {"prompt": "x", "image": "/etc/hostname"}],
    "bad_requirement": [{"prompt": "x", "image": "images/a.png", "requirement": ["keep"]}],
    "bad_target": [{"prompt": "x", "image": "images/a.png", "target": 7}],
    "missing_target_file": [
        {"prompt": "x", "image": "images/a.png", "target": "images/nope.png"},
        {"prompt": "x", "image": "images/a.png", "target": "../outside.png"},
    ],
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _save(root / "images" / "a.png", (255, 0, 0))
    _save(root / "images" / "b.png", (0, 255, 0))
    _save(root / "images" / "t.png", (0, 0, 255))
    _save(tmp_path / "outside.png")  # exists, but outside the folder
    lines: list = []
    bad = [line for reason in BAD for line in BAD[reason]]
    for i in range(max(len(GOOD), len(bad))):  # interleave good and bad rows
        if i < len(GOOD):
            lines.append(GOOD[i])
        if i < len(bad):
            lines.append(bad[i])
        lines.append("   ")  # blank lines are ignored, not counted
    _write(root, lines)
    return root


def test_read_metadata_keeps_good_rows_and_counts_reasons(folder):
    records, skipped = read_metadata(folder)
    assert skipped == Counter({reason: len(lines) for reason, lines in BAD.items()})
    assert [r.prompt for r in records] == ["make the sky purple", "remove the cat", "add a hat", "make the sky purple"]
    root = folder.resolve()
    assert records[0] == EditRecord("make the sky purple", root / "images/a.png", "keep the buildings", None, "recolor")
    assert records[1].requirement == "" and records[1].task == "" and records[1].target is None
    assert records[2].target == root / "images/t.png" and records[2].requirement == "" and records[2].task == ""
    assert records[3].requirement == "tidy"
    assert all(r.image.is_absolute() and r.image.is_file() for r in records)


def test_record_key_is_image_and_prompt(folder):
    records, _ = read_metadata(folder)
    assert records[0].key == f"{records[0].image.as_posix()}::make the sky purple"
    # same instruction, different source image → different group key
    assert records[0].prompt == records[3].prompt and records[0].key != records[3].key


def test_parse_line_reasons(folder):
    for reason, lines in BAD.items():
        for line in lines:
            text = line if isinstance(line, str) else json.dumps(line)
            assert parse_line(text, folder) == reason, (reason, line)
    assert isinstance(parse_line(json.dumps(GOOD[0]), folder), EditRecord)
    prompt = "y" * jsonl.MAX_INSTRUCTION_CHARS  # exactly at the limit is fine
    assert isinstance(parse_line(json.dumps({"prompt": prompt, "image": "images/a.png"}), folder), EditRecord)


def test_missing_folder_or_metadata(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path)
    with pytest.raises(FileNotFoundError):
        JsonlEditDataset(tmp_path)


def test_no_valid_row(tmp_path):
    _save(tmp_path / "images" / "a.png")
    _write(tmp_path, ['{"broken', {"prompt": "", "image": "images/a.png"}])
    with pytest.raises(ValueError, match="no usable row"):
        read_metadata(tmp_path)
    _write(tmp_path, [])
    with pytest.raises(ValueError, match="empty"):
        read_metadata(tmp_path)


def test_custom_metadata_filename(folder):
    _write(folder, [GOOD[0]])
    (folder / "train_metadata.jsonl").rename(folder / "other.jsonl")
    records, skipped = read_metadata(folder, filename="other.jsonl")
    assert len(records) == 1 and not skipped


# ------------------------------------------------------------------------------- images
def test_load_image_formats(tmp_path):
    rgb = tmp_path / "rgb.png"
    _save(rgb, (1, 2, 3))
    out = load_image(rgb)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (1, 2, 3)

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)
    out = load_image(cmyk)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0)

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "pal.png", transparency=0)
    out = load_image(tmp_path / "pal.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent index → white background
    assert out.getpixel((1, 1)) == (0, 255, 0)

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 2)))

    gray16 = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    assert out.mode == "RGB"
    a = np.asarray(out)
    assert a[0, 3].tolist() == [3, 3, 3] and a[15, 15].tolist() == [255, 255, 255]  # scaled, not clipped


def test_load_image_failures(tmp_path, monkeypatch):
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    assert load_image(tmp_path / "truncated.png") == "unreadable_image"
    (tmp_path / "text.png").write_text("not an image at all")
    assert load_image(tmp_path / "text.png") == "unreadable_image"
    assert load_image(tmp_path / "absent.png") == "missing_image_file"
    assert isinstance(load_image(tmp_path / "full.png"), Image.Image)
    monkeypatch.setattr(jsonl, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    assert load_image(tmp_path / "full.png") == "image_too_large"
    monkeypatch.setattr(jsonl, "MAX_IMAGE_PIXELS", 64 * 64)
    assert isinstance(load_image(tmp_path / "full.png"), Image.Image)


# ------------------------------------------------------------------------------- dataset
def test_dataset_items(folder):
    ds = JsonlEditDataset(folder)
    assert len(ds) == 4
    assert sum(ds.skipped_rows.values()) == sum(len(v) for v in BAD.values())
    item = ds[0]
    assert set(item) == {"image", "prompt", "requirement", "target", "task", "key", "references", "mask"}
    assert item["references"] == []  # no reference images in this row
    assert item["prompt"] == "make the sky purple" and item["requirement"] == "keep the buildings"
    assert item["task"] == "recolor" and item["target"] is None
    assert item["image"].mode == "RGB" and item["image"].getpixel((0, 0)) == (255, 0, 0)
    assert item["key"] == f"{(folder / 'images/a.png').resolve().as_posix()}::make the sky purple"
    with_target = ds[2]
    assert with_target["target"].getpixel((0, 0)) == (0, 0, 255)
    assert JsonlEditDataset(folder, load_targets=False)[2]["target"] is None


def test_dataset_skips_unreadable_images(folder):
    ds = JsonlEditDataset(folder)
    (folder / "images" / "b.png").write_bytes(b"garbage")
    assert ds[1] == {"skipped": "unreadable_image", "key": ds.records[1].key, "task": ds.records[1].task}  # which row
    (folder / "images" / "a.png").unlink()
    assert ds[0]["skipped"] == "missing_image_file"
    _save(folder / "images" / "a.png")
    (folder / "images" / "t.png").write_bytes(b"garbage")
    assert ds[2] == {"skipped": "target_unreadable_image"}
    assert JsonlEditDataset(folder, load_targets=False)[2]["prompt"] == "add a hat"


# ------------------------------------------------------------------------------- bad paths, BOM, EXIF
def _bad_path_folder(root: Path) -> Path:
    """A folder whose rows name paths that make the OS refuse: a NUL byte, an over-long name, symlink loops."""
    _save(root / "images" / "a.png")
    os.symlink("loop.png", root / "images" / "loop.png")  # points at itself
    os.symlink("pong.png", root / "images" / "ping.png")  # a loop of two
    os.symlink("ping.png", root / "images" / "pong.png")
    long_name = "images/" + "x" * 300 + ".png"
    rows = [
        {"prompt": "good", "image": "images/a.png"},
        {"prompt": "nul", "image": "images/a\x00.png"},
        {"prompt": "long", "image": long_name},
        {"prompt": "long dir", "image": "x" * 300 + "/a.png"},
        {"prompt": "loop", "image": "images/loop.png"},
        {"prompt": "loop2", "image": "images/ping.png"},
        {"prompt": "loop dir", "image": "images/loop.png/a.png"},
        {"prompt": "t nul", "image": "images/a.png", "target": "\x00"},
        {"prompt": "t long", "image": "images/a.png", "target": long_name},
        {"prompt": "t loop", "image": "images/a.png", "target": "images/pong.png"},
    ]
    _write(root, rows)
    return root


BAD_PATHS = {
    "image_path_nul_byte": 1,
    "image_path_too_long": 2,
    "image_symlink_loop": 3,
    "target_path_nul_byte": 1,
    "target_path_too_long": 1,
    "target_symlink_loop": 1,
}


def test_unusable_paths_are_skipped_and_counted_not_raised(tmp_path):
    root = _bad_path_folder(tmp_path / "d")
    records, skipped = read_metadata(root)
    assert [r.prompt for r in records] == ["good"]
    assert skipped == Counter(BAD_PATHS)
    ds = JsonlEditDataset(root)
    assert len(ds) == 1 and ds.skipped_rows == Counter(BAD_PATHS)
    for line in ['{"prompt": "x", "image": "images/a.png\\u0000"}', json.dumps({"prompt": "x", "image": "y" * 5000})]:
        assert isinstance(parse_line(line, root), str)


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path):
    _save(tmp_path / "images" / "a.png")
    rows = [json.dumps({"prompt": f"edit {i}", "image": "images/a.png"}) for i in range(2)]
    (tmp_path / "train_metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())
    records, skipped = read_metadata(tmp_path)
    assert [r.prompt for r in records] == ["edit 0", "edit 1"] and not skipped


def exif_jpeg(path: Path | None = None, orientation: int = 6, size=(32, 16)) -> bytes:
    """A JPEG stored ``size`` wide, left half red and right half blue, whose EXIF says ``orientation``."""
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def assert_upright(img: Image.Image) -> None:
    """What :func:`exif_jpeg` stores, shown as orientation 6 says: turned 90° clockwise, red on top."""
    assert img.size == (16, 32) and img.mode == "RGB"
    top, bottom = img.getpixel((8, 4)), img.getpixel((8, 28))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


def test_load_image_applies_exif_orientation_and_keeps_the_size_guard(tmp_path, monkeypatch):
    data = exif_jpeg(tmp_path / "phone.jpg")
    assert Image.open(tmp_path / "phone.jpg").size == (32, 16)  # as stored
    assert_upright(load_image(tmp_path / "phone.jpg"))
    assert_upright(load_image(data))  # encoded bytes (shards, GEdit parquet) too
    assert load_image(exif_jpeg(orientation=1)).size == (32, 16)
    monkeypatch.setattr(jsonl, "MAX_IMAGE_PIXELS", 32 * 16 - 1)
    assert load_image(tmp_path / "phone.jpg") == "image_too_large"
    assert load_image(data) == "image_too_large"


def test_dataset_items_are_upright(tmp_path):
    exif_jpeg(tmp_path / "images" / "phone.jpg")
    exif_jpeg(tmp_path / "images" / "target.jpg")
    _write(tmp_path, [{"prompt": "brighten", "image": "images/phone.jpg", "target": "images/target.jpg"}])
    item = JsonlEditDataset(tmp_path)[0]
    assert_upright(item["image"])
    assert_upright(item["target"])
