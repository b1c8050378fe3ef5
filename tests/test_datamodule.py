"""EditDataModule: sources, splits, collation and bad-input handling."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from editr1.data import EditDataModule, SceneConfig
from editr1.data.datamodule import collate_prompts


def make_folder(root, rows, images=("a.png", "b.png")):
    (root / "images").mkdir(parents=True)
    for name in images:
        Image.new("RGB", (40, 24), (10, 200, 30)).save(root / "images" / name)
    (root / "train_metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    return root


def test_scenes_are_the_default_source_and_validation_is_held_out():
    dm = EditDataModule(batch_size=3, train_size=9, val_size=5)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert len(train["prompt"]) == 3 and len(val["prompt"]) == 3
    assert all(k.startswith("scene-train-") for k in train["key"])
    assert all(k.startswith("scene-heldout-") for k in val["key"])
    assert isinstance(train["image"][0], Image.Image) and train["target"] is not None
    assert len(dm.val_dataloader().dataset) == 5


def test_folder_source_skips_bad_rows_and_counts_them(tmp_path):
    root = make_folder(
        tmp_path / "d",
        [
            {"prompt": "make it red", "image": "images/a.png", "requirement": "keep the rest"},
            {"prompt": "make it blue", "image": "images/b.png"},
            "{not json",
            {"prompt": "", "image": "images/a.png"},
            {"prompt": "x", "image": "images/missing.png"},
        ],
    )
    dm = EditDataModule(path=str(root), batch_size=2, shuffle=False)
    dm.setup("fit")
    ds = dm.train_dataloader().dataset
    assert len(ds) == 2
    assert dict(ds.skipped_rows) == {"malformed_json": 1, "empty_prompt": 1, "missing_image_file": 1}
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt"] == ["make it red", "make it blue"]
    assert batch["requirement"] == ["keep the rest", ""]
    assert batch["target"] is None
    assert dm.val_dataloader() == []  # no validation folder given: no validation


def test_unusable_folder_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError):
        EditDataModule(path=str(tmp_path / "nope")).setup("fit")
    root = make_folder(tmp_path / "bad", ["{", {"prompt": "x"}])
    with pytest.raises(ValueError, match="no usable row"):
        EditDataModule(path=str(root)).setup("fit")


def test_collate_drops_and_counts_unreadable_items():
    good = {"image": Image.new("RGB", (4, 4)), "prompt": "p", "requirement": "", "target": None, "task": "", "key": "k"}
    batch = collate_prompts([good, {"skipped": "unreadable_image"}, {"skipped": "unreadable_image"}])
    assert batch["prompt"] == ["p"]
    assert batch["skipped"] == {"unreadable_image": 2}
    mixed = collate_prompts([good, dict(good, target=Image.new("RGB", (4, 4)))])  # no crash mid-run: no targets
    assert mixed["target"] is None and mixed["skipped"] == {"targets_dropped_mixed_batch": 1}


def test_targets_auto_require_ignore_on_a_partly_targeted_folder(tmp_path):
    img = tmp_path / "f" / "images"
    img.mkdir(parents=True)
    for name in ("a", "b", "t"):
        Image.new("RGB", (8, 8), (40, 80, 120)).save(img / f"{name}.png")
    rows = [
        {"prompt": "make it red", "image": "images/a.png", "target": "images/t.png"},
        {"prompt": "make it blue", "image": "images/b.png"},
    ]
    (tmp_path / "f" / "train_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    auto = EditDataModule(path=str(tmp_path / "f"))
    auto.setup("fit")
    assert len(auto._datasets["train"]) == 2 and auto._datasets["train"][0]["target"] is None  # ignored: only some
    req = EditDataModule(path=str(tmp_path / "f"), targets="require", batch_size=1)
    req.setup("fit")
    ds = req._datasets["train"]
    assert len(ds) == 1 and ds[0]["target"] is not None and ds.skipped_rows["missing_target"] == 1
    ign = EditDataModule(path=str(tmp_path / "f"), targets="ignore")
    ign.setup("fit")
    assert ign._datasets["train"][0]["target"] is None
    with pytest.raises(ValueError, match="targets"):
        EditDataModule(targets="some")


def test_test_and_predict_default_to_validation_set():
    dm = EditDataModule(scenes=SceneConfig(), val_size=3)
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 3
    dm.setup("predict")
    assert dm.predict_dataloader().dataset is dm.test_dataloader().dataset


def test_dataset_accessor_builds_each_split_once(tmp_path):
    dm = EditDataModule(scenes=SceneConfig(), train_size=4, val_size=3)
    train = dm.dataset("train")
    assert len(train) == 4 and dm.dataset("train") is train  # built on first use, then the same object
    assert dm.dataset("test") is dm.dataset("val") and dm.dataset("predict") is dm.dataset("val")  # no paths: val
    assert dm.train_dataloader().dataset is train
    with pytest.raises(ValueError, match="split"):
        dm.dataset("holdout")
    root = make_folder(tmp_path / "d", [{"prompt": "make it red", "image": "images/a.png"}])
    real = EditDataModule(path=str(root))
    assert real.dataset("val") is None and real.skipped_rows("val") == {}  # real data, no val_path: no validation
    with pytest.raises(FileNotFoundError):  # a bad folder fails when its split is first asked for
        EditDataModule(path=str(tmp_path / "nope")).dataset("train")


def test_skipped_rows_accessor_reports_rows_rejected_when_read(tmp_path):
    rows = [
        {"prompt": "make it red", "image": "images/a.png"},
        "{not json",
        {"prompt": "", "image": "images/a.png"},
        {"prompt": "x", "image": "images/missing.png"},
        {"prompt": "y", "image": "images/gone.png"},
    ]
    root = make_folder(tmp_path / "d", rows)
    dm = EditDataModule(path=str(root), test_path=str(root))
    dm.setup("fit")
    skipped = dm.skipped_rows("train")
    assert skipped == {"malformed_json": 1, "empty_prompt": 1, "missing_image_file": 2} and type(skipped) is dict
    assert skipped == dict(dm._datasets["train"].skipped_rows)  # what RewardCallback.on_train_start counts
    assert dm.skipped_rows("test") == skipped  # built on demand (not set up for test): the same folder, read again
    skipped["malformed_json"] = 99  # a copy: the dataset's own count is untouched
    assert dm.skipped_rows("train")["malformed_json"] == 1
    img = tmp_path / "t" / "images"
    img.mkdir(parents=True)
    for name in ("a", "b", "t"):
        Image.new("RGB", (8, 8)).save(img / f"{name}.png")
    (tmp_path / "t" / "train_metadata.jsonl").write_text(
        json.dumps({"prompt": "p", "image": "images/a.png", "target": "images/t.png"})
        + "\n"
        + json.dumps({"prompt": "q", "image": "images/b.png"})
        + "\n"
    )
    assert EditDataModule(path=str(tmp_path / "t"), targets="require").skipped_rows("train") == {"missing_target": 1}
    assert EditDataModule(path=str(tmp_path / "t")).skipped_rows("train") == {}  # none rejected: empty
    assert EditDataModule(scenes=SceneConfig(), train_size=2).skipped_rows("train") == {}  # scenes read nothing


def test_bad_batch_size():
    with pytest.raises(ValueError):
        EditDataModule(batch_size=0)
