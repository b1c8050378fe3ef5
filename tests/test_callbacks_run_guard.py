"""RunGuard on fake trainers: Ctrl-C or SIGTERM during fit saves a checkpoint on one process and says where;
other exceptions, other stages and multi-process runs write nothing (test_module.py interrupts a real fit)."""

from __future__ import annotations

import pytest
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from editr1.callbacks.run_guard import RunGuard


class FakeTrainer:
    def __init__(self, tmp_path, fn=TrainerFn.FITTING, world_size=1, step=7) -> None:
        self.state = type("State", (), {"fn": fn})()
        self.world_size, self.global_step = world_size, step
        self.log_dir, self.default_root_dir = str(tmp_path / "run"), str(tmp_path)
        self.saved: list[str] = []

    def save_checkpoint(self, path):
        self.saved.append(path)


@pytest.mark.parametrize(("exception", "what"), [(KeyboardInterrupt(), "Ctrl-C"), (SIGTERMException(), "SIGTERM")])
def test_an_interrupted_fit_saves_a_checkpoint_and_says_how_to_resume(tmp_path, capsys, exception, what):
    trainer, guard = FakeTrainer(tmp_path), RunGuard()
    guard.on_exception(trainer, None, exception)
    path = str(tmp_path / "run" / "checkpoints" / "stopped-interrupted-step7.ckpt")
    assert trainer.saved == [path] and guard.saved == path
    assert capsys.readouterr().out == f"editr1: {what} at step 7: saved {path} (resume with --ckpt_path {path})\n"


@pytest.mark.parametrize(
    ("fn", "exception"),
    [
        (TrainerFn.FITTING, RuntimeError("a bug")),
        (TrainerFn.FITTING, SystemExit(1)),
        (TrainerFn.VALIDATING, KeyboardInterrupt()),
        (TrainerFn.PREDICTING, SIGTERMException()),
    ],
)
def test_other_exceptions_and_stages_write_nothing(tmp_path, capsys, fn, exception):
    trainer, guard = FakeTrainer(tmp_path, fn=fn), RunGuard()
    guard.on_exception(trainer, None, exception)
    assert trainer.saved == [] and guard.saved is None and capsys.readouterr().out == ""


def test_several_processes_only_say_where_to_resume_from(tmp_path, capsys):
    trainer, guard = FakeTrainer(tmp_path, world_size=2, step=3), RunGuard()
    guard.on_exception(trainer, None, KeyboardInterrupt())
    assert trainer.saved == [] and guard.saved is None
    out = capsys.readouterr().out
    assert out.startswith("editr1: Ctrl-C at step 3; several processes: no checkpoint written now")
    assert "last periodic checkpoint" in out
