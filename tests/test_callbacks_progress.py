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
