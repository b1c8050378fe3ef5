"""StepProgressBar counts optimiser steps out of max_steps; the module puts it in place of Lightning's default
rich bar only (a bar the config chose, or none, stays)."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from editr1.callbacks.progress import StepProgressBar
from editr1.module import EditR1Module


def test_step_based_runs_count_optimiser_steps():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=90, max_epochs=-1, current_epoch=0)
    assert bar.total_train_batches == 90
    assert bar._get_train_description(0).strip() == "Steps"  # not "Epoch 0/-2"
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=3, current_epoch=1, num_training_batches=7)
    assert bar._get_train_description(1).startswith("Epoch 1/2")


def test_the_module_replaces_only_the_default_rich_bar():
    def added(callbacks):
        fake = SimpleNamespace(_trainer=SimpleNamespace(callbacks=callbacks))
        fake.trainer = fake._trainer
        return [type(c).__name__ for c in EditR1Module.configure_callbacks(fake)]

    assert "StepProgressBar" in added([RichProgressBar()])
    assert "StepProgressBar" not in added([TQDMProgressBar()])  # the config's choice stays
    assert "StepProgressBar" not in added([])  # enable_progress_bar: false
    assert added([]) == ["RunGuard", "RunClock", "ImageWriter"]


def test_a_phase_shows_beside_the_description_of_a_running_bar():
    from rich.progress import Progress

    bar = StepProgressBar()
    bar.set_phase("rollout 0/8 edits")  # before the bar exists: nothing to show, no error
    bar._trainer = SimpleNamespace(max_steps=90, max_epochs=-1, current_epoch=0)
    bar._progress_stopped = False
    bar.progress = Progress()
    bar.train_progress_bar_id = bar.progress.add_task(bar._get_train_description(0), total=90)
    bar.refresh = lambda: None
    bar.set_phase("judging 4/8 edits")
    assert bar.progress.tasks[0].description.endswith("Steps · judging 4/8 edits")
    bar.set_phase(None)
    assert bar.progress.tasks[0].description.strip() == "Steps"


def test_plain_lines_every_tenth_of_the_run_once_per_step():
    bar = StepProgressBar()
    metrics = {"reward/mean": 0.61512, "loss": 1.1234567, "v_num": 3, "time/rollout_s": 2.0}
    lines = {s: bar.plain_line(s, 90, metrics) for s in range(1, 91)}
    printed = [s for s, line in lines.items() if line]
    assert printed == [9, 18, 27, 36, 45, 54, 63, 72, 81, 90]
    assert lines[9].startswith("step 9/90 · 0 min 0 s · ") and lines[9].endswith("reward/mean 0.6151 · loss 1.123")
    assert bar.plain_line(90, 90, metrics) is None  # the same step again (a filtered batch does not move it)
    assert [s for s in range(1, 6) if StepProgressBar().plain_line(s, 5, {})] == [1, 2, 3, 4, 5]


def test_a_run_into_a_log_file_prints_plain_progress_lines():
    """Rich draws nothing into a file until the end; the bar's plain lines are what a batch job's log shows."""
    import io

    from rich.console import Console

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=10, max_epochs=-1, current_epoch=0, global_step=0)
    out = io.StringIO()
    bar._console = Console(file=out, force_terminal=False)
    bar.train_progress_bar_id, bar.progress = 0, None
    bar._update = bar._update_metrics = lambda *a: None
    bar.refresh = lambda: None
    bar.get_metrics = lambda trainer, module: {"reward/mean": 0.5}
    for step in (1, 2):
        bar._trainer.global_step = step
        bar.on_train_batch_end(bar._trainer, None, None, None, step)
    assert out.getvalue().splitlines() == [
        "step 1/10 · 0 min 0 s · reward/mean 0.5",
        "step 2/10 · 0 min 0 s · reward/mean 0.5",
    ]
