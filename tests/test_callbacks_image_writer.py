"""editr1 predict's writer: file names that never collide, one PNG per real edit, padding rows skipped."""

from __future__ import annotations

import json
import re
import zlib
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from editr1.callbacks.image_writer import ImageWriter, safe_name


def test_safe_name_is_the_readable_part_and_the_keys_crc():
    assert safe_name("scene-000012") == f"scene-000012-{zlib.crc32(b'scene-000012'):08x}"
    assert safe_name("a b/c:d") == f"a_b_c_d-{zlib.crc32(b'a b/c:d'):08x}"


def test_keys_that_read_alike_still_get_their_own_names():
    keys = ["a/b", "a_b", "a b", "a:b", "A/B", "a//b", "ünï", "ïnü", "..", "", ".hidden", "x" * 300, "x" * 301]
    names = [safe_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+-[0-9a-f]{8}", n) for n in names)
    assert all(not n.startswith(".") and len(n) <= 120 + 9 for n in names)
    assert safe_name("..").startswith("edit-") and safe_name("").startswith("edit-")
    assert safe_name("x" * 300) == "x" * 120 + f"-{zlib.crc32(b'x' * 300):08x}"
    assert safe_name("a/b") == safe_name("a/b")  # stable


def _prediction(keys, padding=()):
    g = torch.Generator().manual_seed(0)
    return {
        "keys": keys,
        "prompts": [f"edit {k}" for k in keys],
        "edits": torch.rand(len(keys), 3, 4, 6, generator=g),
        "meta": [{"padding": True} if i in padding else {} for i in range(len(keys))],
    }


def test_each_real_edit_becomes_a_png_and_a_line(tmp_path):
    writer = ImageWriter(str(tmp_path / "out"))
    trainer = SimpleNamespace(global_rank=1, log_dir=None, default_root_dir=str(tmp_path))
    pred = _prediction(["k/1", "k_1", "pad"], padding={2})
    writer.write_on_batch_end(trainer, None, pred, None, None, 0, 0)
    writer.write_on_batch_end(trainer, None, _prediction(["k3"]), None, None, 1, 0)
    out = tmp_path / "out"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(safe_name(k) + ".png" for k in ["k/1", "k_1", "k3"])  # no file for the padding row
    lines = [json.loads(x) for x in (out / "predictions.rank1.jsonl").read_text().splitlines()]
    assert lines == [
        {"key": "k/1", "prompt": "edit k/1", "file": safe_name("k/1") + ".png"},
        {"key": "k_1", "prompt": "edit k_1", "file": safe_name("k_1") + ".png"},
        {"key": "k3", "prompt": "edit k3", "file": safe_name("k3") + ".png"},
    ]
    saved = np.asarray(Image.open(out / (safe_name("k_1") + ".png")))
    assert saved.shape == (4, 6, 3)
    expected = (pred["edits"][1] * 255).to(torch.uint8).permute(1, 2, 0).numpy()  # torchvision's conversion
    assert np.array_equal(saved, expected)
