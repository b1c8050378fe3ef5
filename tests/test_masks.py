"""Edit masks in the data: JSONL rows and WebDataset shards with a ``"mask"`` (good ones carried to the batch,
bad ones skipped and counted by reason), ``make-shards`` copying them, and masks scaled like the images and
reaching the reward's inputs in a training step."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from editr1.data.datamodule import collate_prompts
from editr1.data.jsonl import JsonlEditDataset, read_metadata
from editr1.data.shards import ShardEditDataset, write_shards
from editr1.images import to_tensor_masks
from editr1.training.rollout import chunk_inputs


def _folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (16, 12), (200, 50, 90)).save(root / "images" / "a.png")
    left = Image.new("L", (16, 12), 0)
    left.paste(255, (0, 0, 8, 12))  # white = the region to edit: the left half
    left.save(root / "masks" / "left.png")
    Image.new("L", (8, 8), 255).save(root / "masks" / "small.png")  # not the image's size
    (root / "masks" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [
        {"prompt": "with a mask", "image": "images/a.png", "mask": "masks/left.png"},
        {"prompt": "without a mask", "image": "images/a.png"},
        {"prompt": "a missing mask", "image": "images/a.png", "mask": "masks/nope.png"},
        {"prompt": "a mask outside", "image": "images/a.png", "mask": "../outside.png"},
        {"prompt": "a mask that is a number", "image": "images/a.png", "mask": 3},
        {"prompt": "a small mask", "image": "images/a.png", "mask": "masks/small.png"},
        {"prompt": "a broken mask", "image": "images/a.png", "mask": "masks/broken.png"},
    ]
    (root / "train_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_jsonl_rows_with_good_and_bad_masks(tmp_path):
    root = _folder(tmp_path / "d")
    records, skipped = read_metadata(root)
    assert skipped == {"missing_mask_file": 1, "mask_outside_folder": 1, "bad_mask": 1}
    ds = JsonlEditDataset(root)
    items = [ds[i] for i in range(len(ds))]
    reasons = Counter(it["skipped"] for it in items if "skipped" in it)
    assert reasons == {"mask_size_mismatch": 1, "mask_unreadable_image": 1}  # read lazily, like the images
    good = [it for it in items if "skipped" not in it]
    assert [it["mask"] is not None for it in good] == [True, False]
    assert good[0]["mask"].mode == "L" and good[0]["mask"].size == (16, 12)
    batch = collate_prompts(items)
    assert batch["mask"][0] is good[0]["mask"] and batch["mask"][1] is None  # a row without one: None
    assert batch["skipped"] == {"mask_size_mismatch": 1, "mask_unreadable_image": 1}
    assert collate_prompts(items[1:2])["mask"] is None  # no row with a mask: no masks


def test_make_shards_copies_masks_and_counts_bad_ones(tmp_path):
    root = _folder(tmp_path / "d")
    out = write_shards(root, str(tmp_path / "s" / "e-%04d.tar"))
    assert out["samples"] == 2
    assert out["skipped"] == {
        "missing_mask_file": 1,
        "mask_outside_folder": 1,
        "bad_mask": 1,
        "mask_size_mismatch": 1,
        "mask_unreadable_image": 1,
    }
    items = list(ShardEditDataset(out["shards"], repeat=False, shuffle=False))
    assert [it["prompt"] for it in items] == ["with a mask", "without a mask"]
    assert items[0]["mask"].mode == "L" and items[0]["mask"].getpixel((0, 0)) == 255 and items[1]["mask"] is None
    assert items[0]["mask"].getpixel((15, 0)) == 0


def test_a_shard_samples_bad_mask_is_counted(tmp_path):
    import io
    import tarfile

    def png(size, mode="RGB"):
        buf = io.BytesIO()
        Image.new(mode, size, 0).save(buf, "PNG")
        return buf.getvalue()

    members = {
        "a.json": json.dumps({"prompt": "x"}).encode(),
        "a.src.png": png((8, 8)),
        "a.mask.png": png((4, 4), "L"),
        "b.json": json.dumps({"prompt": "y"}).encode(),
        "b.src.png": png((8, 8)),
        "b.mask.png": b"not an image",
        "c.json": json.dumps({"prompt": "z"}).encode(),
        "c.src.png": png((8, 8)),
        "c.mask.png": png((8, 8), "L"),
    }
    with tarfile.open(tmp_path / "m.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = list(ShardEditDataset(str(tmp_path / "m.tar"), repeat=False))
    assert [it.get("skipped") for it in items] == ["mask_size_mismatch", "mask_unreadable_image", None]
    assert items[2]["mask"].size == (8, 8)


def test_masks_are_scaled_like_the_images_and_reach_the_reward_inputs():
    mask = Image.new("L", (16, 8), 0)
    mask.paste(255, (0, 0, 4, 8))  # the left quarter
    # 16x8 → cover 8x8: scaled to 16x8 (unchanged), centre-cropped to columns 4..11: the mask's column 4 onwards
    got = to_tensor_masks([mask, None], 8, 8)
    assert got.shape == (2, 1, 8, 8) and got[1].eq(1).all()  # a row without a mask: everything may change
    assert got[0, 0, 0].tolist() == [0.0] * 8
    half = Image.new("L", (16, 16), 0)
    half.paste(255, (0, 0, 8, 16))
    scaled = to_tensor_masks([half], 4, 4)[0, 0]  # scaled down, then 1 where at least one half
    assert scaled.tolist() == [[1.0, 1.0, 0.0, 0.0]] * 4
    batch = {"prompt": ["p", "q"], "requirement": ["", ""], "references": [[], []], "mask": [half, None]}
    make = chunk_inputs(batch, torch.zeros(2, 3, 4, 4), None, group_size=2)
    inputs = make(torch.tensor([1, 2, 3]), torch.zeros(3, 3, 4, 4))
    assert inputs.masks.shape == (3, 1, 4, 4) and inputs.instructions == ["p", "q", "q"]
    assert inputs.masks[0, 0].tolist() == [[1.0, 1.0, 0.0, 0.0]] * 4 and inputs.masks[1:].eq(1).all()
    assert (
        chunk_inputs(dict(batch, mask=None), torch.zeros(2, 3, 4, 4), None, 2)(
            torch.tensor([0]), torch.zeros(1, 3, 4, 4)
        ).masks
        is None
    )
    with pytest.raises(ValueError, match="masks must be"):
        type(inputs)(inputs.sources, inputs.edits, inputs.instructions, inputs.requirements, masks=torch.ones(3, 4, 4))


def test_a_training_step_hands_the_rows_masks_to_the_reward(tmp_path):
    from conftest import small_module, small_trainer
    from editr1.callbacks import FilterSettings, RewardCallback
    from editr1.data import EditDataModule
    from editr1.rewards import RewardModel
    from editr1.rewards.combined import CombinedReward
    from editr1.rewards.preservation import PreservationReward

    class Seen(RewardModel):
        def __init__(self) -> None:
            self.masks: list = []

        def score(self, inputs):
            self.masks.append(inputs.masks)
            return torch.full((inputs.edits.shape[0],), 0.5)

    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 50, 90)).save(root / "images" / "a.png")
    left = Image.new("L", (16, 16), 0)
    left.paste(255, (0, 0, 8, 16))
    left.save(root / "images" / "left.png")
    rows = [
        {"prompt": "masked", "image": "images/a.png", "mask": "images/left.png"},
        {"prompt": "not masked", "image": "images/a.png"},
    ]
    (root / "train_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    seen = Seen()
    reward = CombinedReward({"seen": seen, "keep": PreservationReward(outside_mask=True)}, combine="advantage_sum")
    cb = RewardCallback(model=reward, filter=FilterSettings(rule="none"), log_images_every_n_steps=0)
    data = EditDataModule(path=str(root), batch_size=2, shuffle=False)
    small_trainer([cb], max_steps=1).fit(small_module(), datamodule=data)
    masks = torch.cat(seen.masks)  # 2 prompts x K = 4 edits at the policy's 32 x 32
    assert masks.shape == (8, 1, 32, 32)
    assert masks[:4, 0, :, :16].eq(1).all() and masks[:4, 0, :, 16:].eq(0).all()  # the left half, scaled up
    assert masks[4:].eq(1).all()  # the row without a mask: all ones
    assert reward.models["keep"].stats() == {"whole_image_rows": 4.0}


def test_validation_edits_are_scored_with_their_rows_masks():
    from editr1.callbacks.reward_eval import _masks

    half = Image.new("L", (8, 8), 0)
    half.paste(255, (0, 0, 4, 8))
    batch = {"mask": [None, half, None]}
    got = _masks(batch, [1, 2], torch.zeros(2, 3, 4, 4))  # the kept (not padding) rows, at the edits' size
    assert got.shape == (2, 1, 4, 4) and got[0, 0].tolist() == [[1.0, 1.0, 0.0, 0.0]] * 4 and got[1].eq(1).all()
    assert _masks({"mask": None}, [0], torch.zeros(1, 3, 4, 4)) is None and _masks(None, [0], torch.zeros(1)) is None
