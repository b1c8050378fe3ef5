"""WebDataset shards: the converter, bad records, and the split over ranks × workers (real gloo processes)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from editr1.cli import cli_main
from editr1.data import EditDataModule
from editr1.data.datamodule import collate_prompts
from editr1.data.shards import ShardEditDataset, _brace, expand_urls, write_shards


def make_folder(root: Path, n: int, bad_rows: int = 0, targets: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (16, 12), (i * 7 % 256, 50, 90)).save(root / "images" / f"{i}.png")
        row = {"prompt": f"edit number {i}", "image": f"images/{i}.png", "requirement": "keep it", "task": "t"}
        if targets and i % 3 == 0:
            Image.new("RGB", (16, 12), (0, 0, 0)).save(root / "images" / f"{i}_t.png")
            row["target"] = f"images/{i}_t.png"
        rows.append(json.dumps(row))
    rows += ["{not json"] * bad_rows
    (root / "train_metadata.jsonl").write_text("\n".join(rows))
    return root


def read_all(urls, **kw) -> list[dict]:
    return list(ShardEditDataset(urls, repeat=False, **kw))


def test_converter_round_trip(tmp_path, capsys):
    src = make_folder(tmp_path / "d", 10, bad_rows=2, targets=True)
    out = write_shards(src, str(tmp_path / "s" / "e-%04d.tar"), maxcount=4)
    assert out["samples"] == 10 and out["skipped"] == {"malformed_json": 2}
    assert [Path(s).name for s in out["shards"]] == ["e-0000.tar", "e-0001.tar", "e-0002.tar"]
    items = read_all(str(tmp_path / "s" / "e-{0000..0002}.tar"), shuffle=False)
    assert [it["prompt"] for it in items] == [f"edit number {i}" for i in range(10)]
    assert all(it["requirement"] == "keep it" and it["task"] == "t" for it in items)
    assert [it["target"] is not None for it in items] == [i % 3 == 0 for i in range(10)]
    assert items[1]["image"].size == (16, 12) and items[1]["image"].mode == "RGB"
    assert len({it["key"] for it in items}) == 10
    # the command-line converter prints the brace pattern to train with
    cli_main(["make-shards", str(src), str(tmp_path / "t" / "x-%06d.tar"), "--maxcount", "5"])
    printed = capsys.readouterr().out
    assert "wrote 10 samples to 2 shards" in printed and "x-{000000..000001}.tar" in printed


def test_make_shards_command_options_config_and_errors(tmp_path, capsys):
    src = make_folder(tmp_path / "d", 3)
    (src / "train_metadata.jsonl").rename(src / "meta.jsonl")
    # the argparse-era spelling --metadata-file still works
    cli_main(["make-shards", str(src), str(tmp_path / "a" / "e-%02d.tar"), "--metadata-file", "meta.jsonl"])
    assert "wrote 3 samples to 1 shards" in capsys.readouterr().out
    cfg = tmp_path / "shards.yaml"
    cfg.write_text(
        json.dumps(
            {
                "folder": str(src),
                "pattern": str(tmp_path / "b" / "e-%02d.tar"),
                "maxcount": 2,
                "metadata_file": "meta.jsonl",
            }
        )
    )
    cli_main(["make-shards", "--config", str(cfg)])
    assert "wrote 3 samples to 2 shards" in capsys.readouterr().out
    bad = [
        ([str(tmp_path / "nope"), "x-%02d.tar"], "data folder .*nope does not exist"),
        ([str(src), str(tmp_path / "x.tar"), "--metadata_file=meta.jsonl"], "pattern needs a %d-style"),
        ([str(src), "x-%02d.tar", "--maxcount", "0"], "maxcount must be at least 1"),
    ]
    for args, message in bad:
        with pytest.raises(SystemExit, match=f"^editr1 make-shards: error: {message}"):
            cli_main(["make-shards", *args])


def test_brace_and_expand():
    assert _brace("a/e-0000.tar", "a/e-0012.tar", 13) == "a/e-{0000..0012}.tar"
    assert expand_urls("a-{0..2}.tar::b.tar") == ["a-0.tar", "a-1.tar", "a-2.tar", "b.tar"]
    with pytest.raises(ValueError):
        expand_urls([])


def _png(color=(1, 2, 3), size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_records_are_skipped_with_reasons(tmp_path):
    good = json.dumps({"prompt": "make it red"}).encode()
    write_tar(
        tmp_path / "bad.tar",
        {
            "a.json": good,
            "a.src.png": _png(),  # good
            "b.json": b"{nope",
            "b.src.png": _png(),  # malformed json
            "c.json": json.dumps({"prompt": "  "}).encode(),
            "c.src.png": _png(),  # empty prompt
            "d.json": json.dumps({"prompt": "x" * 5000}).encode(),
            "d.src.png": _png(),  # overlong
            "e.json": good,  # no source image
            "f.json": good,
            "f.src.png": b"\x89PNG\r\n\x1a\n garbage",  # corrupt image
            "g.json": good,
            "g.src.png": _png(),
            "g.tgt.png": b"not an image",  # bad target
            "h.src.png": _png(),  # no json
            "i.json": json.dumps({"prompt": "palette"}).encode(),
            "i.src.png": _png(mode="P"),  # palette: converted
        },
    )
    items = read_all(str(tmp_path / "bad.tar"))
    kept = [it["prompt"] for it in items if "skipped" not in it]
    reasons = Counter(it["skipped"] for it in items if "skipped" in it)
    assert kept == ["make it red", "palette"]
    assert reasons == {
        "malformed_json": 1,
        "empty_prompt": 1,
        "overlong_prompt": 1,
        "missing_image_field": 1,
        "unreadable_image": 1,
        "target_unreadable_image": 1,
        "missing_json": 1,
    }
    batch = collate_prompts(items)
    assert batch["prompt"] == kept and sum(batch["skipped"].values()) == 7


def test_truncated_shard_is_counted_and_the_rest_still_read(tmp_path):
    src = make_folder(tmp_path / "d", 6)
    out = write_shards(src, str(tmp_path / "s-%02d.tar"), maxcount=3)
    first = Path(out["shards"][0])
    first.write_bytes(first.read_bytes()[:700])  # cut mid-member
    items = read_all([str(p) for p in out["shards"]], shuffle=False)
    assert [it["prompt"] for it in items if "skipped" not in it][-3:] == [
        "edit number 3",
        "edit number 4",
        "edit number 5",
    ]
    assert any(it.get("skipped") == "unreadable_shard" for it in items)


def test_too_few_shards_for_ranks_times_workers_is_an_error(tmp_path):
    ds = ShardEditDataset(["a.tar", "b.tar", "c.tar"])
    assert ds.shards_for(0, 1, 2, 0, 1) == ds.shards_for(0, 1, 2, 0, 1)
    with pytest.raises(ValueError, match="without duplicates"):
        ds.shards_for(0, 0, 2, 0, 2)


def test_epochs_reorder_shards_the_same_way_on_every_rank():
    ds = ShardEditDataset([f"s{i}.tar" for i in range(12)], seed=3)
    for epoch in range(3):
        parts = [ds.shards_for(epoch, r, 2, w, 3) for r in range(2) for w in range(3)]
        assert sorted(sum(parts, [])) == sorted(ds.urls)
    assert ds.shards_for(0, 0, 2, 0, 3) != ds.shards_for(1, 0, 2, 0, 3) or ds.shards_for(
        0, 1, 2, 0, 3
    ) != ds.shards_for(1, 1, 2, 0, 3)


def _rank_reads(rank: int, world: int, port: int, urls: str, out: str) -> None:
    os.environ.pop("RANK", None)
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        keys = []
        for epoch in range(2):
            ds = ShardEditDataset(urls, seed=7, repeat=False)
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_prompts)
            keys.append([k for b in loader for k in b["key"]])
        Path(out).write_text(json.dumps(keys))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path):
    src = make_folder(tmp_path / "d", 23)
    out = write_shards(src, str(tmp_path / "s" / "e-%03d.tar"), maxcount=3)  # 8 shards, the last one short
    assert len(out["shards"]) == 8
    urls = str(tmp_path / "s" / "e-{000..007}.tar")
    port = 29500 + os.getpid() % 1000
    files = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_reads, args=(r, 2, port, urls, files[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    per_rank = [json.loads(Path(f).read_text()) for f in files]
    for epoch in range(2):
        seen = per_rank[0][epoch] + per_rank[1][epoch]
        assert len(seen) == 23 and len(set(seen)) == 23  # all of them, none twice
        assert per_rank[0][epoch] and per_rank[1][epoch]
    assert per_rank[0][0] != per_rank[0][1]  # the shard order changes between epochs


def test_datamodule_streams_shards_for_training(tmp_path):
    src = make_folder(tmp_path / "d", 8)
    write_shards(src, str(tmp_path / "s-%02d.tar"), maxcount=2)
    dm = EditDataModule(shards=str(tmp_path / "s-{00..03}.tar"), batch_size=3)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(6)]  # 18 prompts from 8 samples: the stream rolls into the next epochs
    prompts = [p for b in batches for p in b["prompt"]]
    assert len(prompts) == 18 and set(prompts) == {f"edit number {i}" for i in range(8)}
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="not both"):
        EditDataModule(path=str(src), shards="x.tar")


def test_require_targets_skips_samples_without_a_target():
    from editr1.data.shards import decode_sample

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    sample = {"json": json.dumps({"prompt": "make it red"}).encode(), "src.png": buf.getvalue(), "__key__": "k"}
    assert decode_sample(sample)["target"] is None
    assert decode_sample(sample, require_targets=True) == {"skipped": "missing_target"}
    with_tgt = dict(sample, **{"tgt.png": buf.getvalue()})
    assert decode_sample(with_tgt, load_targets=False, require_targets=False)["target"] is None
    assert decode_sample(with_tgt, require_targets=True)["target"].size == (8, 8)


def test_make_shards_skips_and_counts_rows_whose_images_the_folder_reader_would_skip(tmp_path, capsys, monkeypatch):
    from editr1.data import jsonl
    from test_jsonl import assert_upright, exif_jpeg

    src = make_folder(tmp_path / "d", 3)
    images = src / "images"
    (images / "text.png").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "truncated.png")
    (images / "truncated.png").write_bytes((images / "truncated.png").read_bytes()[:600])
    (images / "big.png").write_bytes(_png(size=(40, 40)))  # over the (lowered) pixel limit
    exif_jpeg(images / "phone.jpg")  # good: read back upright
    os.symlink("loop.png", images / "loop.png")
    rows = {
        "unreadable": {"image": "images/text.png"},
        "truncated": {"image": "images/truncated.png"},
        "big": {"image": "images/big.png"},
        "bad target": {"image": "images/0.png", "target": "images/text.png"},
        "big target": {"image": "images/0.png", "target": "images/big.png"},
        "phone": {"image": "images/phone.jpg", "target": "images/phone.jpg"},
        "loop": {"image": "images/loop.png"},
        "nul": {"image": "images/0.png\x00"},
        "long": {"image": "images/" + "x" * 300 + ".png"},
    }
    with (src / "train_metadata.jsonl").open("a") as f:
        f.writelines("\n" + json.dumps({"prompt": p, **r}) for p, r in rows.items())
    monkeypatch.setattr(jsonl, "MAX_IMAGE_PIXELS", 30 * 30)
    expected = {
        "unreadable_image": 2,
        "image_too_large": 1,
        "target_unreadable_image": 1,
        "target_image_too_large": 1,
        "image_symlink_loop": 1,
        "image_path_nul_byte": 1,
        "image_path_too_long": 1,
    }
    cli_main(["make-shards", str(src), str(tmp_path / "s" / "e-%02d.tar"), "--maxcount", "2"])
    printed = capsys.readouterr().out
    assert "wrote 4 samples to 2 shards; skipped 8 rows: {" in printed
    assert all(f"'{reason}': {n}" in printed for reason, n in expected.items()), printed
    assert write_shards(src, str(tmp_path / "again" / "e-%02d.tar"))["skipped"] == expected
    items = read_all(str(tmp_path / "s" / "e-{00..01}.tar"), shuffle=False)
    assert [it["prompt"] for it in items] == ["edit number 0", "edit number 1", "edit number 2", "phone"]
    assert_upright(items[3]["image"])
    assert_upright(items[3]["target"])
    # nothing usable at all: an error, and no empty shard left behind
    (src / "train_metadata.jsonl").write_text(
        "\n".join(json.dumps({"prompt": "x", **rows[k]}) for k in ("big", "loop"))
    )
    with pytest.raises(ValueError, match="no usable row"):
        write_shards(src, str(tmp_path / "none" / "e-%02d.tar"))
    assert not list((tmp_path / "none").glob("*.tar"))
