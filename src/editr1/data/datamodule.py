"""The LightningDataModule: batches of prompts (source image, instruction, requirement) for rollouts.

One batch = the prompts of one optimisation step on this process; the module samples a group of
edits for each. Sources: a UniWorld-format folder (``path``), WebDataset tar shards (``shards``,
streamed and split across ranks and workers) or the synthetic scenes (``scenes``, used when
neither is given). With ``buckets`` every training batch holds one aspect-ratio bucket and carries its
shape as ``batch["size"]`` (:mod:`editr1.data.buckets`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from editr1.data.benchmarks import GEditDataset, ImageFolderDataset, ImgEditDataset
from editr1.data.buckets import DEFAULT_RATIOS, BucketedView, BucketSampler, assign_buckets, make_buckets
from editr1.data.jsonl import JsonlEditDataset
from editr1.data.scenes import SceneConfig, SceneDataset
from editr1.data.shards import ShardEditDataset

log = logging.getLogger(__name__)

FIELDS = ("image", "prompt", "requirement", "target", "task", "key", "meta", "mask")


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way: after a resume it skips the prompts the
    interrupted run already consumed in that epoch (its length stays the epoch's, as Lightning's
    restored progress counters expect)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_epoch: int | None = None
        self.resume_skip = 0

    def resume(self, epoch: int, skip: int) -> None:
        self.resume_epoch, self.resume_skip = epoch, skip

    def __iter__(self):
        indices = list(super().__iter__())
        if self.resume_epoch is not None and self.epoch == self.resume_epoch:
            indices = indices[self.resume_skip :]
        return iter(indices)


def collate_prompts(items: list[dict]) -> dict:
    """Lists per field (images and edit masks stay PIL: the policy resizes them to its resolution; ``mask`` is
    ``None`` when no row has one, else a list with ``None`` for the rows without). Items marked
    ``{"skipped": reason}`` are dropped and counted under ``batch["skipped"]``; those that say which
    sample they were (``key``, ``task``, evaluation sets) are listed under ``batch["missing"]``."""
    skipped: Counter = Counter()
    missing = []
    good = []
    for item in items:
        if "skipped" in item:
            skipped[item["skipped"]] += 1
            if "key" in item and not (item.get("meta") or {}).get("padding"):
                missing.append(
                    {
                        "key": item["key"],
                        "task": item.get("task", ""),
                        "meta": item.get("meta") or {},
                        "reason": item["skipped"],
                    }
                )
        else:
            good.append(item)
    batch: dict = {f: [item.get(f) for item in good] for f in FIELDS}
    # each row's reference images (picture 2, 3, …), a list per row whatever its length (none: empty)
    batch["references"] = [list(item.get("references") or []) for item in good]
    if any(t is None for t in batch["target"]):
        with_target = sum(t is not None for t in batch["target"])
        if with_target:  # a batch mixes rows with and without a target: it carries none (counted)
            skipped["targets_dropped_mixed_batch"] += with_target
        batch["target"] = None
    if all(m is None for m in batch["mask"]):  # edit masks: a list with None for rows without one, or None
        batch["mask"] = None
    batch["skipped"] = dict(skipped)
    batch["missing"] = missing
    sizes = {tuple(item["size"]) for item in items if item.get("size") is not None}
    if len(sizes) > 1:
        raise ValueError(f"a batch mixes bucket shapes {sorted(sizes)}: the sampler must give one bucket a batch")
    batch["size"] = sizes.pop() if sizes else None  # (height, width) of the batch's bucket; None: the model's own
    return batch


class EvalSampler(DistributedSampler):
    """Evaluation order split over processes without dropping anything: every rank gets the same number
    of indices (sharded models need equal forward counts), the ones past the end of the dataset are
    repeats that :class:`PaddedView` marks as padding, so nothing is judged twice."""

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        indices = list(range(self.total_size))  # i >= len(dataset): padding (PaddedView wraps it around)
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class PaddedView(Dataset):
    """A dataset whose indices past its end return the item ``i mod len`` marked ``meta.padding``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        item = self.dataset[index % n]
        if index >= n:
            item = dict(item)
            item["meta"] = dict(item.get("meta") or {}, padding=True)
        return item


class EditDataModule(L.LightningDataModule):
    """Prompts for Edit-R1.

    Callbacks and scripts read the data through :meth:`dataset` (a split's dataset, built on first use) and
    :meth:`skipped_rows` (the rows a split's source rejected when it was read, by reason), never through the
    module's private state.

    Args:
        path: a UniWorld-format training folder (``images/`` + ``train_metadata.jsonl``). When set,
            the synthetic scenes are not used.
        shards: WebDataset tar shards for training (a brace pattern such as
            ``/data/edits-{000000..000127}.tar``, a list, or URLs webdataset understands; write them
            with ``editr1 make-shards``). Streamed endlessly, epoch after epoch.
        seed: seed of the per-epoch order of training prompts (and of shards); ``None`` = the run's
            ``seed_everything`` value (0 when unset).
        scenes: the synthetic scene generator, used when neither ``path`` nor ``shards`` is set.
        batch_size: prompts (= groups) per optimisation step on each process.
        num_workers: DataLoader worker processes.
        train_size: synthetic training prompts per epoch (seeds ``[0, train_size)`` of the ``train`` split).
        val_path: a folder in the training format for validation; for scenes, ``val_size`` prompts of
            the ``heldout`` split (a separate random stream, never used in training).
        val_size: synthetic validation prompts.
        test_path: the evaluation set of ``editr1 test`` in ``test_format``; defaults to the validation set.
        test_format: ``jsonl`` (a folder in the training format), ``imgedit`` (``basic_edit.json`` or its
            folder) or ``gedit`` (GEdit-Bench parquet file(s) or their folder).
        test_images: ImgEdit's original-image root (default: the folder of ``basic_edit.json``).
        test_languages: GEdit-Bench instruction languages to keep (``en``, ``cn``).
        predict_path: for ``editr1 predict``: a folder in the training format, or, with
            ``predict_instruction``, a folder of images; defaults to the validation set.
        predict_instruction: edit every image of ``predict_path`` with this one instruction.
        metadata_file: name of the JSONL file inside each folder.
        targets: target images of the training data: ``auto`` (a JSONL folder's targets are used when every
            row has one, ignored with a warning when only some do; shards: a batch mixing samples with and
            without one carries none, counted), ``require`` (only rows/samples with a target, the others
            skipped and counted — for ``model.objective: sft`` on partly-targeted data) or ``ignore``.
        shuffle: shuffle training prompts each epoch.
        references: rows with reference images (``"image"`` a list of several paths): ``keep`` (for models
            that edit from several images; a model that takes one refuses them with an error) or ``skip``
            (drop them, counted as ``multi_image_row``: train a single-image model on mixed data).
        buckets: train in aspect-ratio buckets: each training prompt goes to the bucket nearest its edited image's
            aspect ratio (sizes read from the image headers; for shards, from the decoded image), every batch
            holds one bucket and is trained at its shape (images, references and targets scaled to cover it and
            centre-cropped). Off: every image is cover-cropped to the model's resolution. Validation, test and
            predict always run at the model's resolution.
        bucket_area: pixels of every bucket; ``None`` = the model's resolution (height × width).
        bucket_ratios: the buckets' aspect ratios as ``"W:H"`` (width : height; quote them in YAML, which reads an
            unquoted 16:9 as a base-60 number) or numbers (width / height), one bucket each.
        bucket_multiple: each bucket side is a multiple of this; ``None`` = the model's spatial multiple (VAE
            downsampling × patch size, ``policy.spatial_multiple``).
    """

    def __init__(
        self,
        path: str | None = None,
        shards: str | list[str] | None = None,
        seed: int | None = None,
        scenes: SceneConfig | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        train_size: int = 100_000,
        val_path: str | None = None,
        val_size: int = 16,
        test_path: str | None = None,
        test_format: Literal["jsonl", "imgedit", "gedit"] = "jsonl",
        test_images: str | None = None,
        test_languages: list[str] = ["en"],  # noqa: B006 - jsonargparse shows list defaults; never mutated
        predict_path: str | None = None,
        predict_instruction: str | None = None,
        metadata_file: str = "train_metadata.jsonl",
        shuffle: bool = True,
        targets: Literal["auto", "require", "ignore"] = "auto",
        references: Literal["keep", "skip"] = "keep",
        buckets: bool = False,
        bucket_area: int | None = None,
        bucket_ratios: list[str | float] = list(DEFAULT_RATIOS),  # noqa: B006 - jsonargparse shows list defaults; never mutated
        bucket_multiple: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if path is not None and shards is not None:
            raise ValueError("give the training data as path (a folder) or shards, not both")
        if path is None and shards is None and scenes is None:
            scenes = SceneConfig()
        from editr1.asset_paths import resolve_asset  # "asset:<name>": a folder shipped with editr1

        path, val_path, test_path, test_images, predict_path = (
            resolve_asset(p) if isinstance(p, str) else p
            for p in (path, val_path, test_path, test_images, predict_path)
        )
        self.path = path
        self.shards = shards
        self.seed = seed
        self.scenes = scenes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_size = train_size
        self.val_path = val_path
        self.val_size = val_size
        if targets not in ("auto", "require", "ignore"):
            raise ValueError(f"targets must be auto, require or ignore, got {targets!r}")
        self.targets = targets
        if references not in ("keep", "skip"):
            raise ValueError(f"references must be keep or skip, got {references!r}")
        self.references = references
        if test_format not in ("jsonl", "imgedit", "gedit"):
            raise ValueError(f"test_format must be jsonl, imgedit or gedit, got {test_format!r}")
        if test_format != "jsonl" and test_path is None:
            raise ValueError(f"test_format {test_format!r} needs test_path (the benchmark's files)")
        if predict_instruction is not None and predict_path is None:
            raise ValueError("predict_instruction needs predict_path (a folder of images)")
        self.test_path = test_path
        self.test_format = test_format
        self.test_images = test_images
        self.test_languages = list(test_languages)
        self.predict_path = predict_path
        self.predict_instruction = predict_instruction
        self.metadata_file = metadata_file
        self.shuffle = shuffle
        if bucket_area is not None and bucket_area <= 0 or bucket_multiple is not None and bucket_multiple <= 0:
            raise ValueError(f"bucket_area and bucket_multiple must be positive, got {bucket_area}, {bucket_multiple}")
        self.buckets = buckets
        self.bucket_area = bucket_area
        self.bucket_ratios = list(bucket_ratios)
        self.bucket_multiple = bucket_multiple
        make_buckets(bucket_area or 1024, bucket_multiple or 16, self.bucket_ratios)  # bad ratios fail here
        self._datasets: dict[str, Dataset] = {}
        self._resume: dict | None = None  # data position from a checkpoint

    # Build datasets eagerly on first use so a bad folder fails before any training step.
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset("train")
            self.dataset("val")
        elif stage == "validate":
            self.dataset("val")
        elif stage == "test":
            self.dataset("test")
        elif stage == "predict":
            self.dataset("predict")

    def dataset(self, split: Literal["train", "val", "test", "predict"]) -> Dataset | None:
        """The dataset of ``split``, built on the first call (a bad folder raises then) and the same object
        afterwards. ``test`` and ``predict`` without a path of their own are the validation set; ``None`` when
        the split has no data (``val`` for real training data without ``val_path``)."""
        if split in self._datasets:
            return self._datasets[split]
        folders = {"train": self.path, "val": self.val_path, "test": self.test_path, "predict": self.predict_path}
        if split not in folders:
            raise ValueError(f"split must be train, val, test or predict, got {split!r}")
        folder = folders[split]
        if split in ("test", "predict") and folder is None:
            return self.dataset("val")
        ds: Dataset | None
        if split == "train" and self.shards is not None:
            ds = ShardEditDataset(
                self.shards,
                shuffle=self.shuffle,
                seed=self._order_seed(),
                repeat=True,
                load_targets=self.targets != "ignore",
                require_targets=self.targets == "require",
                skip_references=self.references == "skip",
            )
            log.info("train data: %d shards", len(ds.urls))
        elif split == "test" and self.test_format == "imgedit":
            ds = ImgEditDataset(folder, self.test_images)
            log.info("test data: %d ImgEdit samples from %s", len(ds), folder)
        elif split == "test" and self.test_format == "gedit":
            ds = GEditDataset(folder, self.test_languages)
            log.info("test data: %d GEdit-Bench samples (%s) from %s", len(ds), ",".join(self.test_languages), folder)
        elif split == "predict" and self.predict_instruction is not None:
            ds = ImageFolderDataset(folder, self.predict_instruction)
            log.info("predict data: %d images from %s", len(ds), folder)
        elif folder is not None:
            ds = JsonlEditDataset(
                folder,
                self.metadata_file,
                load_targets=self.targets != "ignore",
                require_targets=split == "train" and self.targets == "require",
                skip_references=self.references == "skip",
            )
            have, rows = ds.targets_present()
            if self.targets == "auto" and 0 < have < rows:
                ds.load_targets = False
                log.warning(
                    "%s: %d of %d rows have a target; targets are not used (data.targets: require trains "
                    "only on the rows that have one)",
                    folder,
                    have,
                    rows,
                )
            log.info("%s data: %d prompts from %s", split, len(ds), folder)
        elif self.path is not None or self.shards is not None:
            ds = None  # real training data without a validation folder: no validation
        elif split == "train":
            ds = SceneDataset(self.scenes, "train", start=0, length=self.train_size)
        else:
            ds = SceneDataset(self.scenes, "heldout", start=0, length=self.val_size)
        self._datasets[split] = ds
        return ds

    def skipped_rows(self, split: Literal["train", "val", "test", "predict"]) -> dict[str, int]:
        """The rows the data source of ``split`` rejected when it was read, by reason (``malformed_json``,
        ``missing_image_file``, ``missing_target``, …), as :meth:`dataset` builds it; ``{}`` when none were,
        when the split has no data, or for sources that read nothing up front (shards, scenes: their bad
        samples are counted per batch, under ``batch["skipped"]``)."""
        rows = getattr(self.dataset(split), "skipped_rows", None)
        return {str(reason): int(n) for reason, n in rows.items()} if rows else {}

    def multi_image_rows(self, split: Literal["train", "val", "test", "predict"]) -> int:
        """Rows of ``split`` with reference images, for sources read up front (JSONL folders); 0 otherwise."""
        count = getattr(self.dataset(split), "multi_image_rows", None)
        return int(count()) if callable(count) else 0

    # ------------------------------------------------------------------ data position in checkpoints
    def state_dict(self) -> dict:
        """Where the training stream is: the epoch and the batches this process consumed in it (saved
        after a training batch, which counts as consumed), and the batches read from a shard stream."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        batches = progress.current.processed
        total = progress.total.processed
        return {
            "epoch": self.trainer.current_epoch,
            "batches": batches,
            "stream_batches": total,
            "seed": self._order_seed(),
            "batch_size": self.batch_size,
            "buckets": self._bucket_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("batch_size") != self.batch_size or state.get("seed") != self._order_seed():
            raise ValueError(
                f"cannot resume the data position: the checkpoint was taken with data.batch_size "
                f"{state.get('batch_size')} and prompt-order seed {state.get('seed')}, this run has "
                f"{self.batch_size} and {self._order_seed()}"
            )
        saved = state.get("buckets")
        if saved != self._bucket_state():
            raise ValueError(
                f"cannot resume the data position: the checkpoint was taken with training buckets {saved}, this run "
                f"has {self._bucket_state()} (data.buckets, bucket_area, bucket_ratios, bucket_multiple)"
            )
        self._resume = dict(state)

    def _bucket_state(self) -> list[list[int]] | None:
        """The training buckets as saved in checkpoints (lists: the same after any serialisation); None: off."""
        return [list(b) for b in self.bucket_shapes()] if self.buckets else None

    def _order_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def bucket_shapes(self) -> list[tuple[int, int]]:
        """The training buckets (``data.buckets``): ``bucket_area`` and ``bucket_multiple``, or the attached
        model's resolution and spatial multiple where they are ``None``."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        policy = getattr(module, "policy", None)
        area = self.bucket_area or (policy.height * policy.width if policy is not None else None)
        multiple = self.bucket_multiple or (policy.spatial_multiple if policy is not None else None)
        if area is None or multiple is None:
            raise ValueError("data.buckets without a model attached needs data.bucket_area and data.bucket_multiple")
        return make_buckets(area, multiple, self.bucket_ratios)

    def _bucketed(self, ds: Dataset, world: int, rank: int) -> tuple[Dataset, BucketSampler]:
        sizes = getattr(ds, "image_sizes", None)
        if sizes is None:
            raise ValueError(f"data.buckets: {type(ds).__name__} does not give its image sizes")
        buckets = self.bucket_shapes()
        shapes, index = assign_buckets(sizes(), buckets)
        sampler = BucketSampler(
            ds, index, self.batch_size, num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self._order_seed()
        )
        log.info(
            "train buckets (height x width: prompts): %s; %d batches an epoch",
            ", ".join(f"{b[0]}x{b[1]}: {sampler.counts.get(n, 0)}" for n, b in enumerate(buckets)),
            len(sampler) // self.batch_size,
        )
        return BucketedView(ds, shapes), sampler

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        ds = self.dataset(split)
        if ds is None:
            return []
        if isinstance(ds, ShardEditDataset):  # ranks and workers split the shards themselves
            if self.trainer is not None:
                ds.bind(self.trainer.global_rank, self.trainer.world_size)
            if split == "train" and self._resume is not None:
                ds.resume(self._resume["stream_batches"], self.batch_size)
            if split == "train" and self.buckets:  # the stream yields whole batches of one bucket
                ds.bucket(self.bucket_shapes(), self.batch_size)
            return DataLoader(
                ds,
                batch_size=None if ds.buckets else self.batch_size,
                num_workers=self.num_workers,
                collate_fn=collate_prompts,
                persistent_workers=self.num_workers > 0,
            )
        sampler = None
        if split == "train":
            # Our own DistributedSampler (world size 1 included): the same seeded permutation whatever the
            # number of processes, rank r taking every world-th prompt, so a global batch holds the same
            # prompts on 1 rank or many. Lightning keeps a DistributedSampler it is given.
            world = self.trainer.world_size if self.trainer is not None else 1
            rank = self.trainer.global_rank if self.trainer is not None else 0
            if self.buckets:
                ds, sampler = self._bucketed(ds, world, rank)
            else:
                sampler = ResumableSampler(
                    ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=self._order_seed(), drop_last=True
                )
            if self._resume is not None:
                sampler.resume(self._resume["epoch"], self._resume["batches"] * self.batch_size)
            shuffle = False
        elif self.trainer is not None and self.trainer.world_size > 1:
            # evaluation over several processes: nothing dropped, nothing judged twice
            ds = PaddedView(ds)
            sampler = EvalSampler(ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank)
            shuffle = False
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
            drop_last=split == "train" and len(ds) >= self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("predict", False)
