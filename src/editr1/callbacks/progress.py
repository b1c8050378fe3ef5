"""A progress bar for step-based runs: optimiser steps out of ``max_steps``, not ``Epoch 0/-2`` over batches, with
the phase a step is in (rollout n/N edits, judging n/N, training) beside it so a long step visibly moves. Where
the output is not a terminal (a log file, a batch job) Rich draws nothing until the end, so the bar prints a
plain line every tenth of the run instead."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import RichProgressBar

SHOWN = ("reward/mean", "loss", "val/reward", "val/gold_reward")  # the plain lines' metrics, when logged


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimiser steps when the run is bounded by ``trainer.max_steps``
    (a batch whose groups were all filtered trains nothing and does not move it). Epoch-bounded runs keep
    Lightning's display. Added by :meth:`editr1.module.EditR1Module.configure_callbacks` in place of the
    default rich bar; a progress bar the config chooses, or ``enable_progress_bar: false``, is left alone."""

    _plain_step: int | None = None  # the step of the last plain line (not a terminal)
    _plain_t0: float | None = None  # when training started, for the plain lines

    def _step_based(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._step_based() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._step_based():
            return super()._get_train_description(current_epoch)
        return f"{'Steps':{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run folder's version number: not a metric of the run
        return metrics

    def set_phase(self, text: str | None) -> None:
        """Show ``text`` after the bar's description (``None``: the description alone) and redraw now."""
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is None:
            return
        base = self._get_train_description(self.trainer.current_epoch)
        self.progress.update(self.train_progress_bar_id, description=f"{base.rstrip()} · {text}" if text else base)
        self.refresh()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._plain_t0 = time.monotonic()  # the plain lines' clock: training time, after the set-up

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.set_phase(None)
        if not self._step_based():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        console = getattr(self, "_console", None)
        if not self.is_disabled and console is not None and not console.is_terminal:
            line = self.plain_line(trainer.global_step, trainer.max_steps, self.get_metrics(trainer, pl_module))
            if line:
                console.print(line, markup=False, highlight=False, soft_wrap=True)

    def plain_line(self, step: int, max_steps: int, metrics: dict) -> str | None:
        """``step 9/90 · 1 min 5 s · reward/mean 0.615 · loss 1.12`` (time since training started) at every tenth
        of the run and its last step, once per step; ``None`` at the other steps."""
        every = max(1, max_steps // 10)
        if step == self._plain_step or (step % every and step != max_steps):
            return None
        self._plain_step = step
        if self._plain_t0 is None:  # called before on_train_start (tests)
            self._plain_t0 = time.monotonic()
        minutes, seconds = divmod(int(time.monotonic() - self._plain_t0), 60)
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k in SHOWN]
        return " · ".join([f"step {step}/{max_steps}", f"{minutes} min {seconds} s", *shown])


def show_phase(trainer, text: str | None) -> None:
    """Tell the run's :class:`StepProgressBar` (if it has one) which phase the current step is in."""
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, StepProgressBar):
            cb.set_phase(text)
