"""A checkpoint when a run is interrupted (Ctrl-C, SIGTERM): nothing the run learned is lost."""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from editr1.training.state import emergency_checkpoint

log = logging.getLogger(__name__)


class RunGuard(Callback):
    """On ``KeyboardInterrupt`` (Ctrl-C) or Lightning's SIGTERM exception during ``fit``, save
    ``<run>/checkpoints/stopped-interrupted-step<N>.ckpt`` and say so (resume with ``--ckpt_path``). Added
    by :meth:`editr1.module.EditR1Module.configure_callbacks`, so every run has it. With several processes
    the interrupted processes may not reach a common barrier; there the periodic checkpoints are what
    remains, and the message says so.
    """

    def __init__(self) -> None:
        self.saved: str | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if trainer.state.fn != TrainerFn.FITTING or not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        if trainer.world_size > 1:
            print(
                f"editr1: {what} at step {trainer.global_step}; several processes: no checkpoint written now "
                "(resume from the last periodic checkpoint)",
                flush=True,
            )
            return
        self.saved = emergency_checkpoint(trainer, "interrupted")
        print(
            f"editr1: {what} at step {trainer.global_step}: saved {self.saved} (resume with --ckpt_path {self.saved})",
            flush=True,
        )
