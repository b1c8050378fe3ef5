"""Instruction–image pairs streamed from WebDataset tar shards, and the converter that writes them.

A sample is the files of one key in a shard::

    0000042.json      {"prompt": "...", "requirement": "...", "task": "..."}
    0000042.src.png   the source image (any format PIL reads)
    0000042.tgt.png   optional target image (supervised objective)
    0000042.ref1.png  optional reference images (picture 2, 3, …: ref1, ref2, … in order)
    0000042.mask.png  optional edit mask (greyscale, the source's size, white = the region to edit)

Shards are given the way webdataset takes them: a brace pattern (``/data/edits-{000000..000127}.tar``),
a list, URLs (``https://…``, ``s3://…`` through ``pipe:`` commands). Each epoch the shard list is put
in a seeded order (the same on every process), dealt to ranks (``rank::world_size``), then to
DataLoader workers (``worker::num_workers``): every sample is read exactly once per epoch across all
processes and workers, provided there are at least as many shards as ranks × workers (fewer is an
error, not silent duplication). Bad records get the same treatment as in JSONL folders: skipped and
counted by reason; an unreadable shard is counted as ``unreadable_shard``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from editr1.data.jsonl import MAX_IMAGES_PER_ROW, check_prompt, load_image, load_mask, read_metadata

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")


def expand_urls(urls: str | list[str]) -> list[str]:
    """A brace pattern, a ``::``-separated string or a list of them → the list of shard URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            out.extend(wds.shardlists.expand_urls(part))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


def _field(sample: dict, role: str) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        value = sample.get(f"{role}.{ext}")
        if value is not None:
            return value
    return None


def decode_sample(
    sample: dict, load_targets: bool = True, require_targets: bool = False, skip_references: bool = False
) -> dict:
    """One raw webdataset sample (bytes per extension) → a prompt item, or ``{"skipped": reason}``
    (``missing_target`` when ``require_targets`` and the sample has no ``tgt``; ``multi_image_row`` when
    ``skip_references`` and it has a ``ref1``)."""
    raw = sample.get("json")
    if raw is None:
        return {"skipped": "missing_json"}
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"skipped": "malformed_json"}
    if not isinstance(obj, dict):
        return {"skipped": "not_an_object"}
    prompt, reason = check_prompt(obj.get("prompt"))
    if reason:
        return {"skipped": reason}
    requirement = obj.get("requirement") or ""
    if not isinstance(requirement, str):
        return {"skipped": "bad_requirement"}
    src = _field(sample, "src")
    if src is None:
        return {"skipped": "missing_image_field"}
    image = load_image(src)
    if isinstance(image, str):
        return {"skipped": image}
    if skip_references and _field(sample, "ref1") is not None:
        return {"skipped": "multi_image_row"}
    references = []
    for n in range(1, MAX_IMAGES_PER_ROW):
        ref = _field(sample, f"ref{n}")
        if ref is None:
            break
        ref = load_image(ref)
        if isinstance(ref, str):
            return {"skipped": "reference_" + ref}
        references.append(ref)
    target = None
    tgt = _field(sample, "tgt")
    if require_targets and tgt is None:
        return {"skipped": "missing_target"}
    if load_targets and tgt is not None:
        target = load_image(tgt)
        if isinstance(target, str):
            return {"skipped": "target_" + target}
    mask = _field(sample, "mask")
    if mask is not None:
        mask = load_mask(mask, image)
        if isinstance(mask, str):
            return {"skipped": mask}
    shard = Path(str(sample.get("__url__", ""))).name
    return {
        "image": image,
        "prompt": prompt,
        "requirement": requirement.strip(),
        "target": target,
        "task": str(obj.get("task") or ""),
        "key": f"{shard}/{sample.get('__key__')}::{prompt}",  # one sample: every image it holds
        "references": references,
        "mask": mask,
    }


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: the initialised process group, else RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world_size, _, _ = pytorch_worker_info()
    return rank, world_size


class ShardEditDataset(IterableDataset):
    """Streams prompt items from tar shards, split across ranks and DataLoader workers.

    Args:
        urls: shards (see :func:`expand_urls`).
        shuffle: put the shards in a new seeded order each epoch (samples within a shard keep their order).
        seed: seed of the shard order.
        repeat: start the next epoch when one ends (training); ``False`` reads one epoch.
        load_targets: decode ``tgt`` images when present.
        require_targets: skip (and count) samples without a ``tgt`` image.
        skip_references: skip (and count) samples with reference images (``ref1``, …).
    """

    def __init__(
        self,
        urls: str | list[str],
        shuffle: bool = True,
        seed: int = 0,
        repeat: bool = True,
        load_targets: bool = True,
        require_targets: bool = False,
        skip_references: bool = False,
    ) -> None:
        self.urls = expand_urls(urls)
        self.skip_references = skip_references
        self.shuffle = shuffle
        self.seed = seed
        self.repeat = repeat
        self.load_targets = load_targets or require_targets
        self.require_targets = require_targets
        self.epoch = 0
        self.rank, self.world_size = process_rank()
        self.skip_batches, self.batch_size = 0, 1
        self.buckets: list[tuple[int, int]] | None = None

    def bucket(self, buckets: list[tuple[int, int]], batch_size: int) -> None:
        """Yield whole batches (lists of ``batch_size`` usable items of one aspect-ratio bucket, each with its
        ``"size"``) instead of items: samples wait in their bucket (nearest in log aspect ratio to the decoded
        source image) until it holds a batch; skipped samples ride along with the next batch, counted there."""
        self.buckets, self.batch_size = list(buckets), batch_size

    def resume(self, batches: int, batch_size: int) -> None:
        """Continue after ``batches`` batches of ``batch_size`` items that this process already consumed
        (DataLoader workers hand out batches in turn, so worker w skips its share)."""
        self.skip_batches, self.batch_size = batches, batch_size

    def bind(self, rank: int, world_size: int) -> None:
        """Fix the process's place among the ranks (DataLoader workers may not see the process group)."""
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
        """The shards one (rank, worker) reads in ``epoch``."""
        if len(self.urls) < world_size * num_workers:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split over {world_size} ranks x {num_workers} workers "
                "without duplicates: write more, smaller shards or use fewer workers"
            )
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order[rank::world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        _, _, worker, num_workers = pytorch_worker_info()
        rank, world_size = self.rank, self.world_size
        epoch = self.epoch
        mine = max(0, -(-(self.skip_batches - worker) // num_workers))  # batches w, w + W, ... were this worker's
        stream = self._stream(rank, world_size, worker, num_workers, epoch)
        if self.buckets is not None:  # the same stream, cut the same way: skipping whole batches is exact
            for n, batch in enumerate(self._bucket_batches(stream)):
                if n >= mine:
                    yield batch
            return
        skip = mine * self.batch_size
        for item in stream:
            if skip:
                skip -= 1
                continue
            yield item

    def _stream(self, rank: int, world_size: int, worker: int, num_workers: int, epoch: int) -> Iterator[dict]:
        while True:
            errors: list[str] = []

            def handler(exn: Exception, errors: list[str] = errors) -> bool:
                errors.append(f"{type(exn).__name__}: {exn}")
                return True  # keep going with the next shard

            shards = self.shards_for(epoch, rank, world_size, worker, num_workers)
            samples = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=handler))
            for sample in samples:
                yield from self._drain(errors)
                yield decode_sample(sample, self.load_targets, self.require_targets, self.skip_references)
            yield from self._drain(errors)
            if not self.repeat:
                return
            epoch += 1

    def _bucket_batches(self, stream: Iterator[dict]) -> Iterator[list[dict]]:
        from editr1.data.buckets import nearest_bucket

        waiting: dict[tuple[int, int], list[dict]] = {}
        skipped: list[dict] = []
        for item in stream:
            if "skipped" in item:
                skipped.append(item)
                continue
            shape = nearest_bucket(item["image"].height, item["image"].width, self.buckets)
            batch = waiting.setdefault(shape, [])
            batch.append({**item, "size": shape})
            if len(batch) == self.batch_size:
                yield batch + skipped
                waiting[shape], skipped = [], []

    @staticmethod
    def _drain(errors: list[str]) -> Iterator[dict]:
        while errors:
            log.warning("skipping the rest of a shard: %s", errors.pop(0))
            yield {"skipped": "unreadable_shard"}


def write_shards(
    folder: str | Path, pattern: str, maxcount: int = 1000, metadata_file: str = "train_metadata.jsonl"
) -> dict:
    """Convert a UniWorld-format folder into tar shards (``pattern`` like ``out/edits-%06d.tar``).

    Image bytes are copied as they are (no re-encoding), after the folder reader's checks: rows it skips,
    and rows whose image, reference, target or mask it could not decode (or that exceed its pixel limit, or a
    mask not of the image's size), are counted. A row's ``"mask"`` becomes the sample's ``mask.<ext>``.
    Returns ``{"samples": n, "shards": [paths], "skipped": {reason: count}}``; no usable row is an error.
    """
    if "%" not in pattern:
        raise ValueError(f"pattern needs a %d-style shard number, e.g. out/edits-%06d.tar; got {pattern!r}")
    records, skipped = read_metadata(folder, metadata_file)
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    sink, samples = None, 0  # the writer is opened at the first usable row: no empty shard when there is none
    try:
        for i, rec in enumerate(records):
            sample = _sample(rec, f"{i:09d}")
            if isinstance(sample, str):
                skipped[sample] += 1
                continue
            if sink is None:
                sink = wds.ShardWriter(pattern, maxcount=maxcount, verbose=0)
            sink.write(sample)
            samples += 1
            if sink.fname and (not written or written[-1] != sink.fname):
                written.append(sink.fname)
    finally:
        if sink is not None:
            sink.close()
    if not samples:
        raise ValueError(f"{folder}: no usable row to write (skipped: {dict(skipped)})")
    return {"samples": samples, "shards": written, "skipped": dict(skipped)}


def _sample(rec, key: str) -> dict | str:
    """The shard sample of one record, or why it is skipped (the reasons the folder reader gives)."""
    src = _checked_bytes(rec.image)
    if isinstance(src, str):
        return src
    if rec.mask is not None:
        mask = _checked_mask(rec.mask, src)
        if isinstance(mask, str):
            return mask
    sample = {
        "__key__": key,
        "json": json.dumps({"prompt": rec.prompt, "requirement": rec.requirement, "task": rec.task}).encode(),
        f"src.{_ext(rec.image)}": src,
    }
    for n, path in enumerate(rec.references, 1):
        ref = _checked_bytes(path)
        if isinstance(ref, str):
            return "reference_" + ref
        sample[f"ref{n}.{_ext(path)}"] = ref
    if rec.target is not None:
        tgt = _checked_bytes(rec.target)
        if isinstance(tgt, str):
            return "target_" + tgt
        sample[f"tgt.{_ext(rec.target)}"] = tgt
    if rec.mask is not None:
        sample[f"mask.{_ext(rec.mask)}"] = mask
    return sample


def _checked_mask(path: Path, source: bytes) -> bytes | str:
    """The mask file's bytes if :func:`~editr1.data.jsonl.load_mask` accepts them for ``source`` (the image's
    bytes), else its reason."""
    data = _checked_bytes(path)
    if isinstance(data, str):
        return "mask_" + data
    mask = load_mask(data, load_image(source))
    return mask if isinstance(mask, str) else data


def _checked_bytes(path: Path) -> bytes | str:
    """The file's bytes if :func:`~editr1.data.jsonl.load_image` decodes them within its limits, else its reason."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing_image_file"
    except OSError:
        return "unreadable_image"
    image = load_image(data)
    return image if isinstance(image, str) else data


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in IMAGE_EXTENSIONS else "png"


def make_shards(folder: str, pattern: str, maxcount: int = 1000, metadata_file: str = "train_metadata.jsonl") -> dict:
    """Convert a UniWorld-format folder into WebDataset tar shards and print the ``--data.shards`` pattern
    to train with. Image bytes are copied as they are; rows the folder reader skips (bad rows, images it
    cannot decode or that exceed its pixel limit) are counted and the counts printed.

    Args:
        folder: a UniWorld-format folder (images/ + train_metadata.jsonl).
        pattern: output shards with a %d-style shard number, e.g. shards/edits-%06d.tar.
        maxcount: samples per shard.
        metadata_file: the folder's metadata file.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be at least 1, got {maxcount}")
    out = write_shards(folder, pattern, maxcount, metadata_file)
    skipped = sum(out["skipped"].values())
    print(
        f"wrote {out['samples']} samples to {len(out['shards'])} shards"
        + (f"; skipped {skipped} rows: {out['skipped']}" if skipped else "")
    )
    if out["shards"]:
        first, last = out["shards"][0], out["shards"][-1]
        print(f"train with: --data.shards '{_brace(first, last, len(out['shards']))}'")
    return out


def make_shards_main(args: list[str]) -> None:
    """``editr1 make-shards FOLDER PATTERN [--maxcount N] [--metadata_file NAME]`` (:func:`make_shards`)."""
    from editr1.cli import function_cli

    function_cli(make_shards, args, "editr1 make-shards", user_errors=(OSError, ValueError))


def _brace(first: str, last: str, n: int) -> str:
    if n == 1:
        return first
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    while i > 0 and first[i - 1].isdigit():
        i -= 1
    j = i
    while j < len(first) and first[j].isdigit():
        j += 1
    return f"{first[:i]}{{{first[i:j]}..{last[i:j]}}}{first[j:]}"
