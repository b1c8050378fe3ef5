"""Measured peaks (editr1.planning.measure) of allocations worked by hand."""

from __future__ import annotations

import torch

from editr1.planning.measure import cpu_peak_bytes, peak_bytes

MB = 1_000_000


def test_cpu_peak_counts_what_lives_at_once():
    def work():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB: 6 MB held
        del a  # 2 MB held
        c = torch.empty(2000, 1000)  # 8 MB: 10 MB held, the peak
        return b, c

    assert cpu_peak_bytes(work) == 10 * MB


def test_tensors_that_existed_before_do_not_count():
    before = torch.empty(4000, 1000)  # 16 MB, allocated outside

    def work():
        del_me = before[:10].clone()  # 40 kB
        return del_me

    assert cpu_peak_bytes(work) == 40_000
    assert cpu_peak_bytes(lambda: None) == 0


def test_peak_bytes_uses_the_cpu_profiler_off_cuda():
    assert peak_bytes(lambda: torch.empty(250, 1000), "cpu") == MB
