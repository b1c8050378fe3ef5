"""Aspect-ratio buckets: training at several shapes of about one area, one shape per batch.

* :func:`make_buckets` — one ``(height, width)`` per aspect ratio, each side a multiple of the model's spatial
  multiple (VAE factor × patch size), the area close to a target (as diffusers' pipelines and kohya's
  bucketing size images);
* :func:`nearest_bucket` — the bucket closest to an image in log aspect ratio;
* :func:`image_size` — an image file's upright size from its header alone (no decoding);
* :func:`bucket_batches` — a seeded order of prompts cut into batches that each hold one bucket;
* :class:`BucketSampler` — the training sampler: every rank gets whole batches, all ranks the same bucket
  at each step; with one bucket it is exactly the plain sampler.

Ratios are written ``"W:H"`` (width : height): ``"16:9"`` is landscape, ``"9:16"`` portrait.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)

DEFAULT_RATIOS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16")
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


MAX_RATIO = 16.0  # the widest bucket (and 1/16 the tallest)


def parse_ratio(ratio: str | float | int) -> float:
    """``"W:H"`` (or a number, width / height) → width / height, at most 16:1 either way; a clear error for
    anything else. YAML 1.1 reads an unquoted ``16:9`` as the base-60 number 969: such numbers are refused
    with that hint (quote the ratio)."""
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        value = float(ratio)
        if value > MAX_RATIO and float(value).is_integer():
            n = int(value)
            raise ValueError(
                f"bucket ratio {n} is a number over {MAX_RATIO:g}: YAML reads an unquoted {n // 60}:{n % 60} as "
                f"{n}; quote it ('{n // 60}:{n % 60}')"
            )
    elif isinstance(ratio, str) and ratio.count(":") == 1:
        try:
            w, h = (float(x) for x in ratio.split(":"))
        except ValueError:
            raise ValueError(f"bucket ratio {ratio!r} is not W:H with two numbers") from None
        value = w / h if w > 0 and h > 0 else -1.0
    else:
        raise ValueError(f"bucket ratio {ratio!r} is not W:H (e.g. '16:9') or a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bucket ratio {ratio!r} must be positive")
    if not 1 / MAX_RATIO <= value <= MAX_RATIO:
        raise ValueError(f"bucket ratio {ratio!r} is beyond {MAX_RATIO:g}:1 either way")
    return value


def bucket_shape(area: int, multiple: int, ratio: float) -> tuple[int, int]:
    """``(height, width)`` of about ``area`` pixels at ``ratio`` = width / height, each side rounded to the
    nearest multiple of ``multiple`` (at least one multiple)."""
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple)


def make_buckets(area: int, multiple: int, ratios: Sequence[str | float] = DEFAULT_RATIOS) -> list[tuple[int, int]]:
    """One ``(height, width)`` per ratio (:func:`bucket_shape`), in the order given; ratios that round to a
    shape already listed (tiny areas) give it once."""
    if area <= 0 or multiple <= 0:
        raise ValueError(f"bucket area and multiple must be positive, got area {area}, multiple {multiple}")
    if not ratios:
        raise ValueError("bucket ratios must not be empty")
    out: list[tuple[int, int]] = []
    for r in ratios:
        shape = bucket_shape(area, multiple, parse_ratio(r))
        if shape not in out:
            out.append(shape)
    return out


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``height x width`` in log ratio (the first on a tie)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not buckets:
        raise ValueError("no buckets")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - target))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file as it is shown upright (EXIF orientation applied), read from its
    header without decoding the pixels. PIL's errors propagate (``OSError`` for unreadable files)."""
    with Image.open(path) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a broken EXIF block: the loader ignores it too
            orientation = None
    return (w, h) if orientation in _TRANSPOSED else (h, w)


def bucket_batches(order: Sequence[int], bucket_of: Sequence[int], size: int) -> list[list[int]]:
    """``order`` (dataset indices) cut into batches of ``size`` indices of one bucket each: indices are dealt to
    their bucket's open batch in order, a batch is emitted when it is full; what is left in each bucket at the
    end is dropped. With one bucket: the consecutive chunks of ``order``."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    open_: dict[int, list[int]] = {}
    out: list[list[int]] = []
    for i in order:
        batch = open_.setdefault(bucket_of[i], [])
        batch.append(i)
        if len(batch) == size:
            out.append(batch)
            open_[bucket_of[i]] = []
    return out


class BucketSampler(DistributedSampler):
    """Training order with aspect-ratio buckets, in the DataLoader's flat index stream.

    The epoch's order is DistributedSampler's (``randperm`` seeded by ``seed + epoch``); it is cut into global
    batches of ``batch_size × world`` prompts of one bucket (:func:`bucket_batches`) and rank r takes every
    world-th prompt of each, so every rank gets whole batches, as many as the others, and all ranks are at the
    same bucket at each step. With one bucket the stream is exactly DistributedSampler's (the data behave as
    without buckets). ``resume(epoch, skip)`` skips the first ``skip`` indices of that epoch's stream."""

    def __init__(
        self,
        dataset: Dataset,
        bucket_of: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if len(bucket_of) != len(dataset):
            raise ValueError(f"{len(bucket_of)} bucket assignments for {len(dataset)} prompts")
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.resume_epoch: int | None = None
        self.resume_skip = 0
        self.counts = Counter(self.bucket_of)
        group = batch_size * num_replicas
        self.batches = sum(n // group for n in self.counts.values())  # full batches per epoch, whatever the order
        if len(self.counts) > 1 and not self.batches:
            raise ValueError(
                f"no bucket holds a batch of {group} prompts (data.batch_size {batch_size} x {num_replicas} "
                f"processes); prompts per bucket: {dict(self.counts)}"
            )

    def resume(self, epoch: int, skip: int) -> None:
        self.resume_epoch, self.resume_skip = epoch, skip

    def epoch_order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(len(self.dataset), generator=g).tolist()
        return list(range(len(self.dataset)))

    def __iter__(self):
        if len(self.counts) == 1:
            indices = list(super().__iter__())
        else:
            batches = bucket_batches(self.epoch_order(), self.bucket_of, self.batch_size * self.num_replicas)
            indices = [i for b in batches for i in b[self.rank :: self.num_replicas]]
        if self.resume_epoch is not None and self.epoch == self.resume_epoch:
            indices = indices[self.resume_skip :]
        return iter(indices)

    def __len__(self) -> int:
        return super().__len__() if len(self.counts) == 1 else self.batches * self.batch_size


class BucketedView(Dataset):
    """A dataset whose items carry ``"size"``: the ``(height, width)`` of their bucket (skipped items too, so
    a batch of only unreadable rows still has its step's shape)."""

    def __init__(self, dataset: Dataset, sizes: Sequence[tuple[int, int]]) -> None:
        self.dataset, self.sizes = dataset, list(sizes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "size": self.sizes[index]}


def assign_buckets(
    sizes: Sequence[tuple[int, int] | None], buckets: Sequence[tuple[int, int]]
) -> tuple[list[tuple[int, int]], list[int]]:
    """Each prompt's bucket shape and index from its image's ``(height, width)``; ``None`` (a header that could
    not be read: the loader skips and counts that row later) goes to the most common bucket, so it never makes
    a bucket of its own."""
    known = [nearest_bucket(*s, buckets) for s in sizes if s is not None]
    fallback = Counter(known).most_common(1)[0][0] if known else buckets[0]
    shapes = [fallback if s is None else nearest_bucket(*s, buckets) for s in sizes]
    index = {b: n for n, b in enumerate(buckets)}
    return shapes, [index[s] for s in shapes]
