"""Deterministic per-sample random streams.

Every random draw of a step (rollout noise, training noise, training timesteps) comes from a
generator seeded by ``derive_seed(base, step, global sample index, stream)``. The numbers a sample
gets therefore do not depend on the micro-batch size, the number of processes or which rank holds
it, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK = (1 << 64) - 1

# Stream ids: one per kind of draw.
ROLLOUT_NOISE = 1
TRAIN_NOISE = 2
TRAIN_TIMESTEPS = 3
EVAL_NOISE = 4
TRAIN_SHUFFLE = 5  # the order of samples in micro-batches (nft.normalize: reference)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK))
    return h & ((1 << 63) - 1)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def per_sample_randn(
    shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal noise, row i drawn from its own ``seeds[i]``."""
    device = torch.device(device)
    rows = [torch.randn(tuple(shape), generator=generator(s, device), device=device, dtype=dtype) for s in seeds]
    if not rows:
        return torch.empty((0, *shape), device=device, dtype=dtype)
    return torch.stack(rows)


def per_sample_rand(count: int, seeds: Sequence[int]) -> torch.Tensor:
    """``(len(seeds), count)`` uniform [0, 1) numbers on the CPU, row i from ``seeds[i]``."""
    rows = [torch.rand(count, generator=generator(s)) for s in seeds]
    return torch.stack(rows) if rows else torch.empty((0, count))
