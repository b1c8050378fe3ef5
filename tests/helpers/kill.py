"""A callback that SIGKILLs its own process at a chosen point of a chosen step (for the resume tests)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAt(L.Callback):
    """``phase``: ``between_steps`` (start of the batch of optimiser step ``step``, after the previous
    step's checkpoint), ``mid_backward`` (first backward pass of that step, after its rollout and rewards)
    or ``before_optimizer_step`` (all backward passes done, weights not yet updated)."""

    def __init__(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase

    def _maybe(self, trainer: L.Trainer, phase: str) -> None:
        if phase == self.phase and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe(trainer, "between_steps")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._maybe(trainer, "mid_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._maybe(trainer, "before_optimizer_step")
