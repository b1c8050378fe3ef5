"""Writing images and text to the run's TensorBoard loggers (rank 0 only), and keeping step scalars fresh."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import TensorBoardLogger


def tensorboards(trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def add_image(trainer, tag: str, image: torch.Tensor, step: int) -> None:
    if trainer.is_global_zero:
        for tb in tensorboards(trainer):
            tb.add_image(tag, image, step)


def add_text(trainer, tag: str, text: str, step: int) -> None:
    if trainer.is_global_zero:
        for tb in tensorboards(trainer):
            tb.add_text(tag, text, step)


def log_step(trainer) -> int:
    """The step Lightning writes training scalars at (its count of training batches, kept in checkpoints), so
    images and text written during training line up with the scalars of the same batch, also after a resume."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def forget_step_metrics(trainer) -> None:
    """Drop the step values every metric holds from earlier batches, before a batch logs its own.

    Lightning writes every step metric it holds at each logging step, so a step that trained nothing (all groups
    filtered) would repeat the previous step's ``loss/policy`` and ``grad_norm``. Called first thing in a
    training batch. Touches Lightning's result collection (no public API does this); if its layout changes the
    old behaviour (repeated values) comes back and ``tests/test_callbacks_tensorboard.py`` fails.
    """
    results = getattr(trainer, "_results", None)
    for item in (results or {}).values():
        if getattr(item, "meta", None) is not None and item.meta.on_step and hasattr(item, "_forward_cache"):
            item._forward_cache = None
