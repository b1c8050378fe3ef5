"""Telling reward hacking from learning: the training reward rising while a held-out "gold" reward falls."""

from __future__ import annotations

import math


def diverging(history: list[tuple[float, float]], n: int) -> bool:
    """``history``: one ``(training reward, gold reward)`` pair per validation, oldest first. True when, over each
    of the last ``n`` validations, the training reward rose and the gold reward fell (strictly; a NaN breaks the
    streak)."""
    if n < 1:
        raise ValueError(f"diverging: n must be >= 1, got {n}")
    last = history[-(n + 1) :]
    if len(last) < n + 1 or any(math.isnan(v) for pair in last for v in pair):
        return False
    return all(b[0] > a[0] and b[1] < a[1] for a, b in zip(last, last[1:]))
