"""The run's own elapsed time, printed at the end of ``fit``: what ``time editr1 fit`` would show."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def process_age(stat: str | None = None, uptime: str | None = None, ticks: int | None = None) -> float | None:
    """Seconds since this process started, from Linux's ``/proc/self/stat`` (field 22: start time in clock ticks
    after boot) and ``/proc/uptime``; ``None`` where they cannot be read. The arguments replace the files' text
    and the clock-tick rate (for tests)."""
    try:
        stat = Path("/proc/self/stat").read_text() if stat is None else stat
        uptime = Path("/proc/uptime").read_text() if uptime is None else uptime
        ticks = os.sysconf("SC_CLK_TCK") if ticks is None else ticks
        fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may contain spaces
        started = int(fields[19]) / ticks  # field 22 of the whole line = the 20th after the name
        return max(0.0, float(uptime.split()[0]) - started)
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        return None


def minutes(seconds: float) -> str:
    """``287.4`` → ``4 min 47 s``; under a minute ``42.0 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s"


class RunClock(Callback):
    """At the end of ``fit`` prints ``editr1 fit: done in 4 min 47 s (wall, since the process started; CPU 9 min
    2 s), 90 steps``. Wall time counts from the process's start where the system says when that was (Linux),
    else from this callback's creation; CPU time is the process's user + system time over all its threads.
    Added by :meth:`editr1.module.EditR1Module.configure_callbacks`, so every run has it."""

    def __init__(self) -> None:
        self.created = time.monotonic()
        self.age_at_creation = process_age()

    def elapsed(self) -> tuple[float, str]:
        """Seconds of wall time and where they count from."""
        since = time.monotonic() - self.created
        if self.age_at_creation is None:
            return since, "since the run was set up"
        return self.age_at_creation + since, "since the process started"

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        wall, since = self.elapsed()
        cpu = time.process_time()
        print(
            f"editr1 fit: done in {minutes(wall)} (wall, {since}; CPU {minutes(cpu)}), {trainer.global_step} steps",
            flush=True,
        )
