"""Telling reward hacking from learning: the training reward rising while a held-out "gold" reward falls."""

from __future__ import annotations

import math


def diverging(history: list[tuple[float, float]], n: int, min_delta: float = 0.0) -> bool:
    """``history``: one ``(training reward, gold reward)`` pair per validation, oldest first. True when, over each
    of the last ``n`` validations, the training reward rose and the gold reward fell, each by more than
    ``min_delta`` (strictly; a NaN breaks the streak)."""
    if n < 1 or not min_delta >= 0:
        raise ValueError(f"diverging: n must be >= 1 and min_delta >= 0, got {n}, {min_delta}")
    last = history[-(n + 1) :]
    if len(last) < n + 1 or any(math.isnan(v) for pair in last for v in pair):
        return False
    return all(b[0] > a[0] + min_delta and b[1] < a[1] - min_delta for a, b in zip(last, last[1:]))
