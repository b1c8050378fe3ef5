"""At the end of ``fit``: the trained adapter as a diffusers LoRA in the run folder."""

from __future__ import annotations

import logging
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class ExportLora(Callback):
    """At the end of ``fit``, write the trained adapter as a diffusers LoRA
    (``<run folder>/lora/pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights``).

    Args:
        adapter: ``auto`` (the EMA adapter when the run keeps one, else ``default``), ``default`` or ``ema``.
        dirname: folder inside the run folder.
    """

    def __init__(self, adapter: Literal["auto", "default", "ema"] = "auto", dirname: str = "lora") -> None:
        self.adapter = adapter
        self.dirname = dirname
        self.path: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from pathlib import Path

        from editr1.export import export_module

        adapter = self.adapter
        if adapter == "auto":
            adapter = "ema" if getattr(pl_module, "use_ema", False) else "default"
        root = Path(trainer.log_dir or trainer.default_root_dir)
        path = export_module(pl_module, root / self.dirname, adapter)
        if path is not None:
            self.path = str(path)
            log.info("exported the %s adapter as a diffusers LoRA: %s", adapter, path)
