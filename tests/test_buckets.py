"""Aspect-ratio buckets (:mod:`editr1.data.buckets`) against hand-computed shapes, the bucketed sampler (one bucket
per batch, the same bucket on every rank at a step, exactly DistributedSampler's order with one bucket, exact
resume) and the data module's bucketed batches from JSONL folders and shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DistributedSampler

from editr1.data.buckets import (
    DEFAULT_RATIOS,
    BucketSampler,
    assign_buckets,
    bucket_batches,
    image_size,
    make_buckets,
    nearest_bucket,
    parse_ratio,
)
from editr1.data.datamodule import EditDataModule


def test_buckets_of_512_squared_at_multiples_of_16_by_hand():
    # 4:3: w = sqrt(512² · 4/3) = 591.2 -> 37 · 16 = 592, h = 443.4 -> 28 · 16 = 448; 3:2: 627.1 -> 624, 418.0 -> 416;
    # 16:9: 682.7 -> 688, 384 -> 384
    assert make_buckets(512 * 512, 16, DEFAULT_RATIOS) == [
        (512, 512),
        (448, 592),
        (592, 448),
        (416, 624),
        (624, 416),
        (384, 688),
        (688, 384),
    ]
    # 32² at 16: 4:3 and 3:2 round to 32x32 (listed once); 16:9: w 42.7 -> 48, h 24 -> 32
    assert make_buckets(32 * 32, 16) == [(32, 32), (32, 48), (48, 32)]
    assert make_buckets(1024 * 1024, 32, ["1:1"]) == [(1024, 1024)]
    assert parse_ratio("16:9") == 16 / 9 and parse_ratio(1.5) == 1.5
    for bad in ("16x9", "0:1", "a:b", "1:0", -1, "1:2:3", "17:1", 0.05):
        with pytest.raises(ValueError, match="bucket ratio"):
            parse_ratio(bad)
    with pytest.raises(ValueError, match=r"unquoted 16:9 as 969; quote it \('16:9'\)"):
        parse_ratio(969)  # what YAML makes of an unquoted 16:9
    with pytest.raises(ValueError, match="positive"):
        make_buckets(0, 16)
    with pytest.raises(ValueError, match="empty"):
        make_buckets(1024, 16, [])


def test_nearest_bucket_by_log_aspect_ratio():
    buckets = make_buckets(512 * 512, 16)
    assert nearest_bucket(600, 800, buckets) == (448, 592)  # 4:3
    assert nearest_bucket(1080, 1920, buckets) == (384, 688)  # 16:9
    assert nearest_bucket(1920, 1080, buckets) == (688, 384)
    assert nearest_bucket(100, 100, buckets) == (512, 512)
    # w/h = 1.4: |log 1.4 − log(592/448)| = 0.058 < |log 1.4 − log 1.5| = 0.069
    assert nearest_bucket(500, 700, buckets) == (448, 592)
    assert nearest_bucket(10, 10000, buckets) == (384, 688)  # beyond the widest: the widest
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 5, buckets)
    shapes, index = assign_buckets([(600, 800), None, (100, 100), (50, 50)], buckets)
    assert shapes == [(448, 592), (512, 512), (512, 512), (512, 512)] and index == [1, 0, 0, 0]
    assert assign_buckets([None, (600, 800)], buckets)[0] == [(448, 592)] * 2  # unreadable: the most common bucket


def test_image_size_reads_the_header_upright(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    assert image_size(tmp_path / "a.png") == (30, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: shown 30 wide, 40 high
    Image.new("RGB", (40, 30)).save(tmp_path / "b.jpg", exif=exif)
    assert image_size(tmp_path / "b.jpg") == (40, 30)
    from editr1.data.jsonl import load_image

    assert load_image(tmp_path / "b.jpg").size == (30, 40)  # (w, h) as the loader turns it
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(OSError):
        image_size(tmp_path / "c.png")


def test_bucket_batches_by_hand():
    bucket_of = [0, 1, 0, 0, 1, 1, 0, 1]
    assert bucket_batches(range(8), bucket_of, 2) == [[0, 2], [1, 4], [3, 6], [5, 7]]
    assert bucket_batches([7, 6, 5, 4, 3, 2, 1, 0], bucket_of, 3) == [[7, 5, 4], [6, 3, 2]]  # 1 and 0 left over
    assert bucket_batches(range(5), [0] * 5, 2) == [[0, 1], [2, 3]]


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n,world,batch", [(37, 1, 4), (37, 2, 4), (40, 4, 3), (3, 1, 4)])
def test_one_bucket_is_exactly_distributed_samplers_order(n, world, batch):
    ds = _Sized(n)
    for rank in range(world):
        for epoch in (0, 3):
            for shuffle in (True, False):
                plain = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=5, drop_last=True)
                ours = BucketSampler(ds, [0] * n, batch, world, rank, shuffle=shuffle, seed=5)
                plain.set_epoch(epoch)
                ours.set_epoch(epoch)
                assert list(ours) == list(plain) and len(ours) == len(plain)


def test_several_buckets_whole_batches_the_same_bucket_on_every_rank_and_exact_resume():
    n, world, batch = 60, 2, 3
    bucket_of = [i % 7 % 3 for i in range(n)]  # three buckets of different sizes
    samplers = [BucketSampler(_Sized(n), bucket_of, batch, world, r, seed=1) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    streams = [list(s) for s in samplers]
    assert len({len(x) for x in streams}) == 1 and len(streams[0]) == len(samplers[0])
    steps = len(streams[0]) // batch
    assert steps == sum(c // (batch * world) for c in samplers[0].counts.values())
    seen = set()
    for step in range(steps):
        chunks = [x[step * batch : (step + 1) * batch] for x in streams]
        assert len({bucket_of[i] for c in chunks for i in c}) == 1  # one bucket a step, on every rank
        seen.update(i for c in chunks for i in c)
    assert len(seen) == steps * batch * world  # nothing twice
    other = BucketSampler(_Sized(n), bucket_of, batch, world, 0, seed=1)
    other.set_epoch(3)
    assert list(other) != streams[0]  # a new order each epoch
    resumed = BucketSampler(_Sized(n), bucket_of, batch, world, 0, seed=1)
    resumed.resume(2, 2 * batch)
    resumed.set_epoch(2)
    assert list(resumed) == streams[0][2 * batch :]
    with pytest.raises(ValueError, match="no bucket holds a batch of 8"):
        BucketSampler(_Sized(6), [0, 1, 2, 0, 1, 2], 4, 2, 0)


def _write_folder(root: Path, sizes: dict[str, tuple[int, int]], rows: list) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    (root / "train_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


SIZES = {"wide": (64, 36), "tall": (30, 52), "square": (40, 40), "wide2": (90, 50), "tall2": (18, 32)}


def _rows():
    rows = []
    for name in SIZES:
        for k in range(4):
            rows.append({"prompt": f"edit {k}", "image": [f"images/{name}.png", "images/square.png"][: 1 + k % 2]})
    return rows


def test_datamodule_batches_hold_one_bucket_from_jsonl_and_shards(tmp_path):
    from editr1.data.shards import write_shards

    folder = _write_folder(tmp_path / "data", SIZES, _rows())
    dm = EditDataModule(path=str(folder), batch_size=2, buckets=True, bucket_area=32 * 32, bucket_multiple=16)
    assert dm.bucket_shapes() == [(32, 32), (32, 48), (48, 32)]
    expect = {"wide": (32, 48), "wide2": (32, 48), "tall": (48, 32), "tall2": (48, 32), "square": (32, 32)}
    batches = list(dm.train_dataloader())
    assert len(batches) == 10  # 8 wide, 8 tall, 4 square prompts: every one used, two a batch
    for b in batches:
        names = {Path(k.split("+")[0].split("::")[0]).stem for k in b["key"]}
        assert {expect[n] for n in names} == {b["size"]}
    write_shards(folder, str(tmp_path / "shards" / "s-%06d.tar"), maxcount=100)
    sm = EditDataModule(
        shards=str(tmp_path / "shards" / "s-000000.tar"),
        batch_size=3,
        buckets=True,
        bucket_area=1024,
        bucket_multiple=16,
    )
    it = iter(sm.train_dataloader())
    stream = [next(it) for _ in range(6)]
    for b in stream:
        assert len(b["image"]) == 3
        assert {nearest_bucket(im.height, im.width, sm.bucket_shapes()) for im in b["image"]} == {b["size"]}
    again = EditDataModule(
        shards=str(tmp_path / "shards" / "s-000000.tar"),
        batch_size=3,
        buckets=True,
        bucket_area=1024,
        bucket_multiple=16,
    )
    again._resume = {"stream_batches": 4}
    resumed = next(iter(again.train_dataloader()))
    assert resumed["key"] == stream[4]["key"]  # whole bucketed batches skipped: exact
    with pytest.raises(ValueError, match="bucket_area and data.bucket_multiple"):
        EditDataModule(path=str(folder), buckets=True).bucket_shapes()
    with pytest.raises(ValueError, match="bucket ratio"):
        EditDataModule(path=str(folder), buckets=True, bucket_ratios=["wide"])
    with pytest.raises(ValueError, match="unquoted 1:1 as 61"):
        EditDataModule(path=str(folder), bucket_ratios=[61.0])  # YAML's reading of [1:1]


def test_square_data_with_buckets_on_trains_on_the_same_batches(tmp_path):
    folder = _write_folder(
        tmp_path / "data",
        {"a": (40, 40), "b": (24, 24)},
        [{"prompt": f"p{i}", "image": "images/a.png" if i % 2 else "images/b.png"} for i in range(11)],
    )
    kw = dict(path=str(folder), batch_size=3, seed=7)
    plain = [b["key"] for b in EditDataModule(**kw).train_dataloader()]
    on = list(EditDataModule(**kw, buckets=True, bucket_area=1024, bucket_multiple=16).train_dataloader())
    assert [b["key"] for b in on] == plain and {b["size"] for b in on} == {(32, 32)}
    assert all(b["size"] is None for b in EditDataModule(**kw).train_dataloader())


def test_resuming_with_other_buckets_is_refused(tmp_path):
    folder = _write_folder(tmp_path / "data", {"a": (40, 40)}, [{"prompt": "p", "image": "images/a.png"}])
    state = {"epoch": 0, "batches": 1, "stream_batches": 1, "seed": 0, "batch_size": 4}
    EditDataModule(path=str(folder), seed=0).load_state_dict(state)  # a checkpoint from before buckets existed
    on = EditDataModule(path=str(folder), seed=0, buckets=True, bucket_area=1024, bucket_multiple=16)
    with pytest.raises(ValueError, match="training buckets None, this run has"):
        on.load_state_dict(state)
    on.load_state_dict({**state, "buckets": [[32, 32], [32, 48], [48, 32]]})
    with pytest.raises(ValueError, match="training buckets"):
        EditDataModule(path=str(folder), seed=0).load_state_dict({**state, "buckets": [[32, 32]]})


def test_jsonl_image_sizes_from_headers_none_for_unreadable(tmp_path):
    from editr1.data.jsonl import JsonlEditDataset

    rows = [{"prompt": "a", "image": "images/wide.png"}, {"prompt": "b", "image": "images/broken.png"}]
    folder = _write_folder(tmp_path / "data", {"wide": (64, 36)}, rows)
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    ds = JsonlEditDataset(folder)
    assert ds.image_sizes() == [(36, 64), None]
    assert ds[1] == {"skipped": "unreadable_image", "key": ds.records[1].key, "task": ""}  # counted when loaded


def test_the_demo_scenes_with_buckets_on_are_the_same_batches():
    from editr1.data import SceneConfig

    kw = dict(scenes=SceneConfig(size=32), batch_size=3, train_size=20, seed=2)
    plain = [b["prompt"] for b in EditDataModule(**kw).train_dataloader()]
    on = list(EditDataModule(**kw, buckets=True, bucket_area=32 * 32, bucket_multiple=4).train_dataloader())
    assert [b["prompt"] for b in on] == plain and {b["size"] for b in on} == {(32, 32)}
