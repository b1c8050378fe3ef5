"""Images, text and scalars reach every logger of the run (TensorBoard, wandb-like, MLflow-like, folder loggers)
on rank zero only, on Lightning's step axis; TensorBoard gets a dashboard with reward and loss first."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from editr1.callbacks.tensorboard import (
    DASHBOARD,
    add_image,
    add_scalars,
    add_text,
    dashboard_layout,
    tensorboards,
    write_dashboard,
)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add_image(self, tag, image, step):
        self.calls.append(("image", tag, image, step))

    def add_text(self, tag, text, step):
        self.calls.append(("text", tag, text, step))


class RecordingTB(TensorBoardLogger):
    """A real TensorBoardLogger (for the isinstance check) whose writer records instead of writing."""

    def __init__(self, save_dir) -> None:
        super().__init__(save_dir)
        self.recorder = Recorder()

    @property
    def experiment(self):
        return self.recorder


@pytest.fixture
def loggers(tmp_path):
    return [RecordingTB(tmp_path / "a"), CSVLogger(tmp_path / "csv"), RecordingTB(tmp_path / "b")]


def test_tensorboards_are_the_writers_of_the_tensorboard_loggers_only(loggers):
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=True)
    assert tensorboards(trainer) == [loggers[0].recorder, loggers[2].recorder]
    assert tensorboards(SimpleNamespace(loggers=[])) == []


def test_rank_zero_writes_to_every_tensorboard(loggers):
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=True)
    image = torch.rand(3, 4, 4)
    add_image(trainer, "rollouts/source_edits", image, 7)
    add_text(trainer, "rollouts/instructions", "0. make it red", 7)
    for lg in (loggers[0], loggers[2]):
        assert lg.recorder.calls == [
            ("image", "rollouts/source_edits", image, 7),
            ("text", "rollouts/instructions", "0. make it red", 7),
        ]


def test_other_ranks_write_nothing(loggers):
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=False)
    add_image(trainer, "x", torch.rand(3, 2, 2), 1)
    add_text(trainer, "y", "text", 1)
    assert loggers[0].recorder.calls == [] and loggers[2].recorder.calls == []


def test_a_real_tensorboard_logger_gets_an_event_file(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True)
    add_image(trainer, "eval/heldout/before", torch.rand(3, 8, 8), 0)
    add_text(trainer, "notes", "hello", 0)
    logger.experiment.flush()
    assert list((tmp_path / "run" / "version_0").glob("events.out.tfevents.*"))


def test_images_use_the_step_axis_of_the_scalars():
    from types import SimpleNamespace

    from editr1.callbacks.tensorboard import log_step

    trainer = SimpleNamespace(
        global_step=3, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=5))
    )
    assert log_step(trainer) == 5  # a batch that trained nothing still moves Lightning's scalar axis
    assert log_step(SimpleNamespace(global_step=3)) == 3


class WandbLike(CSVLogger):
    """A logger with wandb's ``log_image``/``log_text`` (Lightning's ``WandbLogger`` signatures)."""

    def __init__(self, save_dir) -> None:
        super().__init__(save_dir)
        self.calls: list[tuple] = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append(("image", key, images, step))

    def log_text(self, key, columns=None, data=None, step=None, **kwargs):
        self.calls.append(("text", key, columns, data, step))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", metrics, step))


class MLFlowLogger(CSVLogger):
    """Looks like Lightning's MLFlowLogger to the dispatcher: a ``run_id`` and a client as ``experiment``."""

    run_id = "run-1"

    def __init__(self, save_dir) -> None:
        super().__init__(save_dir)
        self.client = SimpleNamespace(calls=[])
        self.client.log_image = lambda run_id, image, key, step: self.client.calls.append(("image", run_id, key, step))
        self.client.log_text = lambda run_id, text, path: self.client.calls.append(("text", run_id, text, path))

    @property
    def experiment(self):
        return self.client


def test_images_and_text_reach_loggers_other_than_tensorboard(tmp_path):
    wandb, mlflow, csv = WandbLike(tmp_path / "w"), MLFlowLogger(tmp_path / "m"), CSVLogger(tmp_path / "c")
    trainer = SimpleNamespace(loggers=[wandb, mlflow, csv], is_global_zero=True)
    image = torch.zeros(3, 4, 6)
    image[0] = 1.0  # red, float in [0, 1]
    add_image(trainer, "rollouts/source_edits", image, 7)
    add_text(trainer, "rollouts/instructions", "0. make it red", 7)

    (kind, key, images, step), text = wandb.calls
    assert (kind, key, step) == ("image", "rollouts/source_edits", 7)
    assert images[0].size == (6, 4) and images[0].getpixel((0, 0)) == (255, 0, 0)
    assert text == ("text", "rollouts/instructions", ["step", "text"], [[7, "0. make it red"]], 7)
    assert mlflow.client.calls == [
        ("image", "run-1", "rollouts_source_edits", 7),
        ("text", "run-1", "0. make it red", "text/rollouts/instructions/0000007.md"),
    ]
    from PIL import Image

    media = Path(csv.log_dir) / "media"
    png = Image.open(media / "rollouts" / "source_edits" / "0000007.png")
    assert png.size == (6, 4) and png.getpixel((5, 3)) == (255, 0, 0)
    assert (media / "rollouts" / "instructions" / "0000007.md").read_text() == "0. make it red\n"


def test_a_tag_cannot_write_outside_the_media_folder(tmp_path):
    csv = CSVLogger(tmp_path / "c")
    add_text(SimpleNamespace(loggers=[csv], is_global_zero=True), "../../evil/x y", "t", 1)
    written = list(tmp_path.rglob("*.md"))
    assert written == [Path(csv.log_dir) / "media" / "evil" / "x_y" / "0000001.md"]


def test_scalars_go_through_every_loggers_log_metrics_on_rank_zero(tmp_path):
    wandb = WandbLike(tmp_path / "w")
    add_scalars(SimpleNamespace(loggers=[wandb], is_global_zero=True), {"eval/heldout/before": 0.5}, 3)
    add_scalars(SimpleNamespace(loggers=[wandb], is_global_zero=False), {"eval/heldout/before": 0.9}, 3)
    assert wandb.calls == [("metrics", {"eval/heldout/before": 0.5}, 3)]


def test_the_dashboard_puts_reward_and_loss_first_and_matches_the_logged_names():
    import re

    layout = dashboard_layout()
    first = next(iter(layout.values()))
    assert list(first)[:2] == ["reward (mean, min, max)", "within-group reward std (what the filter sees)"]
    patterns = [re.compile(p) for charts in layout.values() for _, tags in charts.values() for p in tags]
    for name in (
        "reward/mean",
        "reward_std",
        "loss",
        "loss/policy",
        "grad_norm",
        "learning_rate",
        "time/step_s",
        "samples_per_s",
        "memory/peak_gib",
        "eval/heldout/after",
        "filter/frac_groups_dropped",
    ):
        assert any(p.match(name) for p in patterns), name
    assert not any(p.match("loss_scale") for p in patterns)  # anchored
    assert list(layout) == list(DASHBOARD)


def test_the_dashboard_is_in_a_real_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="run")
    write_dashboard(SimpleNamespace(loggers=[logger], is_global_zero=True))
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"))
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
