"""Fuzz: a folder of many generated records, good and bad of every kind, streamed through the training
DataLoader for a whole epoch: no crash, every good record used exactly once, every bad one skipped and
counted under its reason."""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from editr1.data import EditDataModule


def _bomb_png(path: Path) -> None:
    """A valid small PNG whose header claims 200000 x 200000 pixels (a decompression bomb)."""
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 200_000, 200_000)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def _image(kind: str, path: Path, rng: random.Random) -> None:
    if kind == "rgb":
        Image.new("RGB", (12, 10), (rng.randrange(256), 9, 9)).save(path)
    elif kind == "cmyk":
        Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(path.with_suffix(".jpg"))
        path.with_suffix(".jpg").rename(path)
    elif kind == "palette":
        im = Image.new("P", (12, 10), 0)
        im.putpalette([255, 0, 0] * 256)
        im.save(path, transparency=0)
    elif kind == "alpha":
        Image.new("RGBA", (12, 10), (0, 255, 0, 100)).save(path)
    elif kind == "gray16":
        Image.fromarray((np.arange(120, dtype=np.uint16).reshape(10, 12) * 500).astype(np.uint16)).save(path)
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(rng.randrange(99)).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            path
        )
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_an_image":
        path.write_text("this is text, not pixels")
    elif kind == "bomb":
        _bomb_png(path)


GOOD_IMAGES = ["rgb", "cmyk", "palette", "alpha", "gray16"]
BAD_ROWS = {  # kind -> reason it is counted under
    "malformed_json": "malformed_json",
    "not_an_object": "not_an_object",
    "missing_prompt": "missing_prompt",
    "empty_prompt": "empty_prompt",
    "overlong_prompt": "overlong_prompt",
    "missing_image_field": "missing_image_field",
    "missing_file": "missing_image_file",
    "outside": "image_outside_folder",
    "bad_requirement": "bad_requirement",
}
BAD_IMAGES = {"truncated": "unreadable_image", "not_an_image": "unreadable_image", "bomb": "image_too_large"}


def test_fuzzed_folder_trains_on_every_good_record_once(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines, good, expected = [], set(), Counter()
    kinds = GOOD_IMAGES * 8 + list(BAD_ROWS) * 4 + list(BAD_IMAGES) * 4
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        name = f"images/{i}.png"
        row = {"prompt": f"edit {i}", "image": name, "requirement": "r"}
        if kind in GOOD_IMAGES or kind in BAD_IMAGES:
            _image(kind, root / name, rng)
            if kind in GOOD_IMAGES:
                good.add(f"edit {i}")
            else:
                expected[BAD_IMAGES[kind]] += 1
            lines.append(json.dumps(row))
            continue
        _image("rgb", root / name, rng)
        expected[BAD_ROWS[kind]] += 1
        if kind == "malformed_json":
            lines.append(json.dumps(row)[:-3])
        elif kind == "not_an_object":
            lines.append(json.dumps([row]))
        elif kind == "missing_prompt":
            lines.append(json.dumps({k: v for k, v in row.items() if k != "prompt"}))
        elif kind == "empty_prompt":
            lines.append(json.dumps({**row, "prompt": "   "}))
        elif kind == "overlong_prompt":
            lines.append(json.dumps({**row, "prompt": "x" * 5000}))
        elif kind == "missing_image_field":
            lines.append(json.dumps({k: v for k, v in row.items() if k != "image"}))
        elif kind == "missing_file":
            lines.append(json.dumps({**row, "image": "images/nope.png"}))
        elif kind == "outside":
            lines.append(json.dumps({**row, "image": "../../etc/passwd"}))
        elif kind == "bad_requirement":
            lines.append(json.dumps({**row, "requirement": {"a": 1}}))
    lines.insert(7, "")  # blank lines are ignored, not counted
    (root / "train_metadata.jsonl").write_text("\n".join(lines))

    # 40 good rows + 12 rows whose image fails when read = 52 items: batches of 4 cover the epoch exactly
    dm = EditDataModule(path=str(root), batch_size=4, shuffle=True)
    dm.setup("fit")
    seen, skipped = [], Counter(dm.skipped_rows("train"))
    for batch in dm.train_dataloader():
        seen += batch["prompt"]
        skipped.update(batch["skipped"])
        assert all(im.mode == "RGB" for im in batch["image"])
    assert sorted(seen) == sorted(good)  # every good record exactly once
    assert skipped == expected  # every bad one under its reason


def test_rows_rejected_when_read_are_logged_as_skipped_data(tmp_path):
    import shutil

    from conftest import small_module, small_trainer
    from editr1.callbacks import RewardCallback
    from editr1.rewards import SceneReward

    root = tmp_path / "d"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "sample_uniworld", root)
    with (root / "train_metadata.jsonl").open("a") as f:
        f.write("\n{broken\n" + json.dumps({"prompt": "", "image": "images/train-000000.png"}) + "\n")
    dm = EditDataModule(path=str(root), batch_size=2)
    cb = RewardCallback(model=SceneReward(), log_images_every_n_steps=0)
    trainer = small_trainer([cb], max_steps=1)
    trainer.fit(small_module(), datamodule=dm)
    assert cb.counts["data_skipped/malformed_json"] == 1 and cb.counts["data_skipped/empty_prompt"] == 1
    assert float(trainer.callback_metrics["data/skipped"]) == 2
