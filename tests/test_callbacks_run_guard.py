"""RunGuard saves a checkpoint on Ctrl-C or SIGTERM during fit, and only then (the end-to-end case with a real
fit is in tests/test_module.py::test_ctrl_c_and_sigterm_save_a_checkpoint)."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from editr1.callbacks import RunGuard


class FakeTrainer:
    log_dir = None

    def __init__(self, root, fn=TrainerFn.FITTING, world_size=1) -> None:
        self.default_root_dir = str(root)
        self.global_step = 4
        self.world_size = world_size
        self.state = SimpleNamespace(fn=fn)
        self.saved = []

    def save_checkpoint(self, path):
        self.saved.append(path)


def test_interrupts_during_fit_save_a_checkpoint(tmp_path, capsys):
    for exc, name in ((KeyboardInterrupt(), "Ctrl-C"), (SIGTERMException(), "SIGTERM")):
        trainer, guard = FakeTrainer(tmp_path), RunGuard()
        guard.on_exception(trainer, None, exc)
        assert trainer.saved == [str(tmp_path / "checkpoints" / "stopped-interrupted-step4.ckpt")] == [guard.saved]
        assert f"editr1: {name} at step 4: saved" in capsys.readouterr().out


def test_other_errors_other_stages_and_several_processes_save_nothing(tmp_path, capsys):
    cases = [
        (FakeTrainer(tmp_path), ValueError("a bug")),
        (FakeTrainer(tmp_path, fn=TrainerFn.VALIDATING), KeyboardInterrupt()),
        (FakeTrainer(tmp_path, world_size=2), KeyboardInterrupt()),
    ]
    for trainer, exc in cases:
        RunGuard().on_exception(trainer, None, exc)
        assert trainer.saved == []
    assert "several processes: no checkpoint written now" in capsys.readouterr().out
