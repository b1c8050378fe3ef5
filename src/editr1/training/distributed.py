"""What processes of one run agree on: sums and maxima, gathered rows and lists, summed gradients.

One module for the reward stage and the module alike. Every function is a no-op (or the identity) on one
process, so single-process runs never touch ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def reduce(value: float, op: str = "sum", *, world: int, device: torch.device | str = "cpu") -> float:
    """``value`` summed (``op="sum"``) or maxed (``"max"``) over ``world`` processes; itself on one."""
    if world == 1:
        return float(value)
    import torch.distributed as dist

    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t.item())


def any_process(flag: bool, *, world: int, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on some process (one collective decision every process takes alike)."""
    return reduce(float(bool(flag)), "max", world=world, device=device) > 0


def gather_lists(items: Iterable, *, world: int) -> list:
    """Every process's ``items``, concatenated in process order (the order of :func:`gather_rows`)."""
    items = list(items)
    if world == 1 or not initialized():
        return items
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def gather_objects(obj, *, world: int) -> list:
    """Every process's ``obj`` (one entry per process)."""
    if world == 1 or not initialized():
        return [obj]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def gather_rows(rows: torch.Tensor, *, world: int, rank: int, device: torch.device | str) -> tuple[torch.Tensor, int]:
    """All processes' ``(R_p, K)`` rows stacked process by process, and this process's first row in them.

    Processes may hold different numbers of rows (banned or unreadable prompts, possibly none): short ones
    are padded with NaN for the collective and trimmed after.
    """
    if world == 1:
        return rows, 0
    import torch.distributed as dist

    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=device)
    counts_t = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts_t, count)
    counts = [int(c) for c in counts_t]
    width = max(max(counts), 1)
    padded = torch.full((width, rows.shape[1]), float("nan"), device=device, dtype=rows.dtype)
    padded[: rows.shape[0]] = rows.to(device)
    everything = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(everything, padded)
    return torch.cat([everything[w][: counts[w]] for w in range(world)]), sum(counts[:rank])


def sum_gradients(params: Iterable[torch.Tensor], *, world: int) -> None:
    """Replicated multi-process training: sum the gradients over processes (losses are normalised by the
    global sample count). A parameter without a gradient takes part with zeros."""
    if world == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
