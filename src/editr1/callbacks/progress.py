"""A progress bar for step-based runs: optimiser steps out of ``max_steps``, not ``Epoch 0/-2`` over batches, with
the phase a step is in (rollout n/N edits, judging n/N, training) beside it so a long step visibly moves."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimiser steps when the run is bounded by ``trainer.max_steps``
    (a batch whose groups were all filtered trains nothing and does not move it). Epoch-bounded runs keep
    Lightning's display. Added by :meth:`editr1.module.EditR1Module.configure_callbacks` in place of the
    default rich bar; a progress bar the config chooses, or ``enable_progress_bar: false``, is left alone."""

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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.set_phase(None)
        if not self._step_based():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def show_phase(trainer, text: str | None) -> None:
    """Tell the run's :class:`StepProgressBar` (if it has one) which phase the current step is in."""
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, StepProgressBar):
            cb.set_phase(text)
