"""Images and text reach every TensorBoard logger of the run, on rank zero only; other loggers are ignored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from editr1.callbacks.tensorboard import add_image, add_text, tensorboards


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
