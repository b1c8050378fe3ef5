"""RunClock prints the run's elapsed wall and CPU time at the end of fit (an end-to-end fit prints it too:
tests/test_cli.py::test_demo_config_runs_in_process_into_one_run_folder)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from editr1.callbacks import RunClock
from editr1.callbacks.run_clock import minutes, process_age

# /proc/self/stat of a process named "py thon) x" (a name with a space and a parenthesis), started 1234 ticks
# after boot: the 22nd field of the line is the 20th after the name's closing parenthesis
STAT = "4242 (py thon) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 1 0 0 20 0 3 0 1234 1000 200 0 0 0\n"


def test_process_age_from_proc_text():
    assert process_age(STAT, "20.34 40.00\n", ticks=100) == 20.34 - 12.34
    assert process_age(STAT, "5.00 1.00\n", ticks=100) == 0.0  # never negative
    assert process_age("garbage", "1.0 1.0", ticks=100) is None
    assert process_age(STAT, "", ticks=100) is None
    age = process_age()  # this process: on Linux a plausible age, elsewhere None
    assert age is None or 0.0 < age < 7 * 24 * 3600


def test_minutes():
    assert minutes(42.04) == "42.0 s"
    assert minutes(287.4) == "4 min 47 s"
    assert minutes(3600.0) == "60 min 0 s"


def test_prints_the_elapsed_time_at_the_end_of_fit_on_rank_zero_only(capsys, monkeypatch):
    clock = RunClock()
    clock.created -= 10.0  # as if it was set up 10 s ago
    clock.age_at_creation = 2.0
    monkeypatch.setattr(time, "process_time", lambda: 65.0)
    clock.on_fit_end(SimpleNamespace(is_global_zero=True, global_step=90), None)
    out = capsys.readouterr().out
    assert out.startswith("editr1 fit: done in 12.0 s (wall, since the process started; CPU 1 min 5 s), 90 steps")
    clock.age_at_creation = None  # no /proc: counted from the callback's creation
    assert clock.elapsed()[1] == "since the run was set up" and 10.0 <= clock.elapsed()[0] < 20.0
    clock.on_fit_end(SimpleNamespace(is_global_zero=False, global_step=90), None)
    assert capsys.readouterr().out == ""
