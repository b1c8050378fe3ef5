"""Measured peak memory of a piece of work: on a CUDA device the caching allocator's own counter, on the CPU
torch's profiler (``profile_memory=True``: every allocation and free torch makes, with the running total).

What :mod:`editr1.planning.trace` predicts is checked against these figures (``tests/test_planning_trace.py``,
``benchmarks/gpu_perf.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """The largest amount of CPU memory torch held at once while ``fn`` ran, above what it held before (bytes;
    tensors ``fn`` frees count only while they lived). Read from torch's profiler with ``profile_memory=True``:
    each allocation and free it records carries the allocator's running total."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.total_allocated, f.alloc_size))
    if not events:
        return 0
    events.sort()
    before = events[0][1] - events[0][2]  # the running total just before the first recorded change
    return max(0, max(total for _, total, _ in events) - before)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cuda") -> int:
    """The same on a CUDA device: ``torch.cuda.max_memory_allocated`` over ``fn``, above what was allocated before."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """:func:`cuda_peak_bytes` on a CUDA device, :func:`cpu_peak_bytes` otherwise."""
    return cuda_peak_bytes(fn, device) if torch.device(device).type == "cuda" else cpu_peak_bytes(fn)
