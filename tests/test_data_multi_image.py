"""Multi-image rows in the data layer: ``"image"`` as a list in JSONL folders (every path checked, bad
references skipped and counted by reason), group keys over every image, the same rows through
``make-shards`` and back, collation of rows with different numbers of images, and ``data.references:
skip`` for single-image models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from editr1.data.datamodule import EditDataModule, collate_prompts
from editr1.data.jsonl import MAX_IMAGES_PER_ROW, JsonlEditDataset, parse_line, read_metadata
from editr1.data.shards import ShardEditDataset, write_shards

ROWS = [
    {"prompt": "put the cat from picture 2 on the sofa", "image": ["images/sofa.png", "images/cat.png"]},
    {"prompt": "put the cat from picture 2 on the sofa", "image": ["images/sofa.png", "images/dog.png"]},
    {"prompt": "blend pictures 2 and 3 in", "image": ["images/sofa.png", "images/cat.png", "images/dog.png"]},
    {"prompt": "make it red", "image": "images/sofa.png"},
    {"prompt": "one-element list", "image": ["images/cat.png"]},
]
BAD = {
    "missing_reference_file": [{"prompt": "x", "image": ["images/sofa.png", "images/nope.png"]}],
    "reference_outside_folder": [{"prompt": "x", "image": ["images/sofa.png", "../outside.png"]}],
    "missing_reference_field": [
        {"prompt": "x", "image": ["images/sofa.png", 3]},
        {"prompt": "x", "image": ["images/sofa.png", ""]},
    ],
    "missing_image_field": [{"prompt": "x", "image": []}, {"prompt": "x", "image": [None, "images/cat.png"]}],
    "missing_image_file": [{"prompt": "x", "image": ["images/nope.png", "images/cat.png"]}],
    "too_many_images": [{"prompt": "x", "image": ["images/cat.png"] * (MAX_IMAGES_PER_ROW + 1)}],
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for name, color in (("sofa", (200, 0, 0)), ("cat", (0, 200, 0)), ("dog", (0, 0, 200))):
        Image.new("RGB", (8, 6), color).save(root / "images" / f"{name}.png")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    lines = [*ROWS, *(row for rows in BAD.values() for row in rows)]
    lines.append({"prompt": "unreadable reference", "image": ["images/sofa.png", "images/broken.png"]})
    (root / "train_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return root


def test_rows_with_lists_of_images_are_checked_path_by_path(folder):
    records, skipped = read_metadata(folder)
    assert skipped == Counter({reason: len(rows) for reason, rows in BAD.items()})
    root = folder.resolve() / "images"
    assert records[0].image == root / "sofa.png" and records[0].references == (root / "cat.png",)
    assert records[2].references == (root / "cat.png", root / "dog.png")
    assert records[3].references == () and records[4].references == ()  # one path, as a string or a list
    # the same instruction on the same edited image with another reference is another group
    keys = [r.key for r in records]
    assert len(set(keys)) == len(keys)
    assert keys[0] == f"{(root / 'sofa.png').as_posix()}+{(root / 'cat.png').as_posix()}::{ROWS[0]['prompt']}"
    assert keys[3] == f"{(root / 'sofa.png').as_posix()}::make it red"  # single-image keys are as before
    assert parse_line(json.dumps({"prompt": "x", "image": ["images/sofa.png"] * MAX_IMAGES_PER_ROW}), folder)


def test_items_carry_their_references_and_collate_with_different_counts(folder):
    ds = JsonlEditDataset(folder)
    assert ds.multi_image_rows() == 4
    items = [ds[i] for i in range(len(ds))]
    assert items[-1] == {"skipped": "reference_unreadable_image", "key": ds.records[-1].key, "task": ""}
    assert [len(it["references"]) for it in items[:-1]] == [1, 1, 2, 0, 0]
    assert items[2]["references"][1].getpixel((0, 0)) == (0, 0, 200)
    batch = collate_prompts(items)
    assert [len(r) for r in batch["references"]] == [1, 1, 2, 0, 0]
    assert batch["skipped"] == {"reference_unreadable_image": 1} and len(batch["image"]) == 5
    assert collate_prompts([{"image": 1, "prompt": "p", "key": "k"}])["references"] == [[]]  # sources without any


def test_single_image_models_skip_and_count_multi_image_rows(folder):
    dm = EditDataModule(path=str(folder), references="skip")
    ds = dm.dataset("train")
    assert len(ds) == 2 and all(not r.references for r in ds.records)
    assert dm.skipped_rows("train")["multi_image_row"] == 4
    with pytest.raises(ValueError, match="references must be keep or skip"):
        EditDataModule(path=str(folder), references="drop")


def test_make_shards_keeps_every_reference_in_order(folder, tmp_path):
    out = write_shards(folder, str(tmp_path / "s" / "e-%02d.tar"), maxcount=3)
    assert out["samples"] == 5 and out["skipped"] == {
        **{reason: len(rows) for reason, rows in BAD.items()},
        "reference_unreadable_image": 1,
    }
    items = list(ShardEditDataset(out["shards"], shuffle=False, repeat=False))
    assert [len(it["references"]) for it in items] == [1, 1, 2, 0, 0]
    assert [im.getpixel((0, 0)) for im in items[2]["references"]] == [(0, 200, 0), (0, 0, 200)]
    assert len({it["key"] for it in items}) == 5
    skipping = list(ShardEditDataset(out["shards"], shuffle=False, repeat=False, skip_references=True))
    assert [it.get("skipped") for it in skipping] == ["multi_image_row"] * 3 + [None, None]
