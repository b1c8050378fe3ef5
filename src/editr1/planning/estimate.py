"""Per-device memory of an Edit-R1 run, from the sizes of its parts: pure arithmetic, no torch.

:func:`per_device` splits the persistent state (frozen weights, LoRA adapters, gradients, optimiser states) over
the processes the way :class:`editr1.strategies.FSDP2Strategy` does: with ``shard: true`` FSDP2 shards the
transformer and text encoders (the VAE stays whole) and the LoRA weights with them, and gathers one unit (a block,
or a root's remaining parameters) at a time, the next one prefetched; with ``shard: false`` every process holds
everything. :func:`largest_micro_batch` adds the peak of a step's phases (a training micro-batch, a rollout chunk)
to it and searches the micro-batch that still fits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

GiB = 2**30
# bytes of optimiser state per trained parameter: AdamW's two float32 moments; bitsandbytes' 8-bit AdamW keeps
# them in one byte each (plus block-wise scales, under 1 %)
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}
LORA_BYTES = 4  # LoRA weights and their gradients stay float32 whatever the base's dtype

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ti?b?|gi?b?|mi?b?|ki?b?|b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """``80GB``, ``80GiB``, ``141G``, ``24000MB`` → bytes. GB and GiB both mean 2³⁰ (a GPU sold as "80 GB" holds
    80 GiB); a bare number is GiB."""
    if isinstance(text, (int, float)):
        return int(text * GiB)
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB, 141GiB, 24000MB)")
    unit = m.group(2).lower()[:1]
    scale = {"t": 2**40, "g": GiB, "m": 2**20, "k": 2**10, "b": 1, "": GiB}[unit]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class Parallel:
    """Processes and how they share the model."""

    devices: int = 1  # processes per machine
    num_nodes: int = 1  # machines
    shard: bool = False  # FSDP2 shards the frozen base and the LoRA weights

    def __post_init__(self) -> None:
        if self.devices < 1 or self.num_nodes < 1:
            raise ValueError(f"devices and num_nodes must be >= 1, got {self.devices}, {self.num_nodes}")

    @property
    def world(self) -> int:
        return self.devices * self.num_nodes

    @property
    def sharded(self) -> bool:
        return self.shard and self.world > 1


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts and bytes of a built model.

    Attributes:
        components: frozen component → (parameters, bytes).
        sharded: the components FSDP2 shards.
        largest_unit: bytes of the largest FSDP2 unit (gathered whole while it runs).
        lora: parameters of one adapter.
        adapters: the adapters kept (default, old, and ema when kept).
    """

    components: dict[str, tuple[int, int]]
    sharded: tuple[str, ...]
    largest_unit: int
    lora: int
    adapters: tuple[str, ...] = ("default", "old")

    @property
    def frozen_parameters(self) -> int:
        return sum(n for n, _ in self.components.values())


@dataclass(frozen=True)
class Persistent:
    """What a process holds for the whole run (bytes)."""

    weights: int  # frozen weights, with the FSDP2 units gathered at once
    lora: int  # every adapter
    grads: int  # the trained adapter's gradients
    optimizer: int  # optimiser states of the trained adapter
    parts: dict[str, int] = field(default_factory=dict)  # weights by component (this process's share)

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.grads + self.optimizer


def per_device(sizes: ModelSizes, parallel: Parallel, optimizer: str = "adamw") -> Persistent:
    """The persistent state of one process."""
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BYTES)}, got {optimizer!r}")
    world = parallel.world if parallel.sharded else 1
    parts = {name: math.ceil(b / world) if name in sizes.sharded else b for name, (_, b) in sizes.components.items()}
    gathered = 2 * sizes.largest_unit if parallel.sharded else 0  # the running unit and the prefetched next one
    lora = math.ceil(sizes.lora / world)
    return Persistent(
        weights=sum(parts.values()) + gathered,
        lora=lora * LORA_BYTES * len(sizes.adapters),
        grads=lora * LORA_BYTES,
        optimizer=lora * OPTIMIZER_BYTES[optimizer],
        parts=parts,
    )


def linear(at_one: int, at_m: int, m: int) -> Callable[[int], int]:
    """The straight line through (1, ``at_one``) and (``m``, ``at_m``) (activations grow linearly in the batch);
    through the origin when ``m`` is 1."""
    if m <= 1:
        return lambda b: int(at_one * b)
    slope = (at_m - at_one) / (m - 1)
    return lambda b: int(at_one + slope * (b - 1))


@dataclass(frozen=True)
class Peak:
    """A process's peak: persistent state, the step's rollout data, and the larger phase."""

    persistent: int
    rollout_data: int
    training: int  # activations of one training micro-batch
    rollout: int  # working memory of one rollout chunk

    @property
    def total(self) -> int:
        return self.persistent + self.rollout_data + max(self.training, self.rollout)


def largest_micro_batch(
    fits_in: int, persistent: int, rollout_data: int, rollout: int, training: Callable[[int], int], most: int
) -> int:
    """The largest micro-batch (at most ``most``, the samples of a step) whose peak fits in ``fits_in`` bytes; 0
    when not even one sample fits."""
    best = 0
    for b in range(1, max(most, 1) + 1):
        if Peak(persistent, rollout_data, training(b), rollout).total > fits_in:
            break
        best = b
    return best
