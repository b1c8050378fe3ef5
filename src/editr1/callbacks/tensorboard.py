"""Writing images and text to the run's TensorBoard loggers (rank 0 only)."""

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
