"""Fuzz: a folder of many generated records, good and bad of every kind, streamed through the training
DataLoader for a whole epoch: no crash, every good record used exactly once, every bad one skipped and
counted under its reason."""

from __future__ import annotations

import io
import json
import os
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
    elif kind == "exif":  # a phone photo stored sideways: EXIF orientation 6 turns it upright, 10 wide
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", (12, 10), (rng.randrange(256), 9, 9)).save(path, "JPEG", exif=exif)


GOOD_IMAGES = ["rgb", "cmyk", "palette", "alpha", "gray16", "exif"]
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
    "nul_path": "image_path_nul_byte",
    "long_path": "image_path_too_long",
    "symlink_loop": "image_symlink_loop",
}
BAD_IMAGES = {"truncated": "unreadable_image", "not_an_image": "unreadable_image", "bomb": "image_too_large"}


def test_fuzzed_folder_trains_on_every_good_record_once(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines, good, expected, sideways = [], set(), Counter(), set()
    kinds = GOOD_IMAGES * 8 + list(BAD_ROWS) * 4 + list(BAD_IMAGES) * 4
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        name = f"images/{i}.png"
        row = {"prompt": f"edit {i}", "image": name, "requirement": "r"}
        if kind in GOOD_IMAGES or kind in BAD_IMAGES:
            _image(kind, root / name, rng)
            if kind in GOOD_IMAGES:
                good.add(f"edit {i}")
                if kind == "exif":
                    sideways.add(f"edit {i}")
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
        elif kind == "nul_path":
            lines.append(json.dumps({**row, "image": name + "\x00"}))
        elif kind == "long_path":
            lines.append(json.dumps({**row, "image": "images/" + "n" * 300 + ".png"}))
        elif kind == "symlink_loop":
            os.symlink(f"{i}.loop.png", root / f"images/{i}.loop.png")
            lines.append(json.dumps({**row, "image": f"images/{i}.loop.png"}))
    lines.insert(7, "")  # blank lines are ignored, not counted
    # a byte-order mark (Windows editors write one) must not cost the first row
    (root / "train_metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())

    # 48 good rows + 12 rows whose image fails when read = 60 items: batches of 4 cover the epoch exactly
    dm = EditDataModule(path=str(root), batch_size=4, shuffle=True)
    dm.setup("fit")
    seen, skipped = [], Counter(dm.skipped_rows("train"))
    for batch in dm.train_dataloader():
        seen += batch["prompt"]
        skipped.update(batch["skipped"])
        assert all(im.mode == "RGB" for im in batch["image"])
        sizes = {p: im.size for p, im in zip(batch["prompt"], batch["image"])}
        assert all(size == ((10, 12) if p in sideways else (12, 10)) for p, size in sizes.items()), sizes
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


# ------------------------------------------------------------------------------------------ evaluation loaders
def _phone_jpeg() -> bytes:
    """12 wide x 10 tall as stored, EXIF orientation 6: 10 wide x 12 tall upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 9, 9)).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_imgedit_loader_counts_unusable_paths_and_turns_phone_photos_upright(tmp_path):
    from editr1.data.benchmarks import ImgEditDataset

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "phone.jpg").write_bytes(_phone_jpeg())
    os.symlink("loop.png", tmp_path / "img" / "loop.png")
    ids = {
        "ok": "img/ok.png",
        "phone": "img/phone.jpg",
        "nul": "img/ok.png\x00",
        "long": "img/" + "n" * 300 + ".png",
        "loop": "img/loop.png",
        "absent": "img/absent.png",
        "outside": "../x.png",
    }
    meta = {k: {"id": v, "prompt": f"edit {k}", "edit_type": "add"} for k, v in ids.items()}
    # a byte-order mark before the JSON is read past
    (tmp_path / "basic_edit.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(meta).encode())
    ds = ImgEditDataset(tmp_path / "basic_edit.json")
    items = {it["key"]: it for it in (ds[i] for i in range(len(ds)))}
    assert items["ok"]["image"].size == (8, 8) and items["phone"]["image"].size == (10, 12)
    assert {k: it["skipped"] for k, it in items.items() if "skipped" in it} == {
        "nul": "image_path_nul_byte",
        "long": "image_path_too_long",
        "loop": "image_symlink_loop",
        "absent": "missing_image_file",
        "outside": "image_outside_root",
    }
    assert all(it["task"] == "add" for it in items.values())  # counted as missing in their category


def test_image_folder_lists_links_it_cannot_follow_as_skipped_and_gedit_bytes_are_upright(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from editr1.data.benchmarks import GEditDataset, ImageFolderDataset

    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "phone.jpg").write_bytes(_phone_jpeg())
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("absent.png", folder / "dangling.png")
    (folder / "sub.png").mkdir()  # a folder is not an image
    ds = ImageFolderDataset(folder, "make it red")
    items = {it["key"]: it for it in (ds[i] for i in range(len(ds)))}
    assert sorted(items) == ["a", "dangling", "loop", "phone"]
    assert items["phone"]["image"].size == (10, 12)
    assert items["loop"]["skipped"] == "image_symlink_loop" and items["dangling"]["skipped"] == "missing_image_file"

    row = {"key": ["k"], "task_type": ["t"], "instruction": ["brighten"], "instruction_language": ["en"]}
    table = pa.table({**row, "input_image": [{"bytes": _phone_jpeg()}], "Intersection_exist": [False]})
    pq.write_table(table, tmp_path / "g.parquet")
    assert GEditDataset(tmp_path / "g.parquet")[0]["image"].size == (10, 12)
