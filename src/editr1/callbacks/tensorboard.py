"""Images, text and scalars written by callbacks reach every logger of the run (rank 0 only), on one step axis.

Lightning's logger API has scalars only (``log_metrics``); images and text go to each logger in its own way:
TensorBoard's ``add_image``/``add_text``; a logger with ``log_image``/``log_text`` (Lightning's ``WandbLogger``)
through those; MLflow's client ``log_image``/``log_text``; and any other logger with a folder (``CSVLogger``) as
PNG / Markdown files under ``<log_dir>/media/<tag>/<step>.*``, so nothing a callback shows is lost. TensorBoard also
gets a dashboard layout (the "Custom Scalars" tab) with reward and loss first.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger

log = logging.getLogger(__name__)

# The "Custom Scalars" tab of TensorBoard, in this order: what a user looks at first comes first.
DASHBOARD = {
    "1 reward and loss": {
        "reward (mean, min, max)": ["reward/mean", "reward/min", "reward/max"],
        "within-group reward std (what the filter sees)": ["reward_std"],
        "loss": ["loss", "loss/.*"],
        "held-out reward": ["val/reward", "eval/.*/(before|after)"],
    },
    "2 filter and advantages": {
        "groups dropped": ["filter/frac_groups_dropped", "frac_reward_zero_std"],
        "advantage": ["advantage/abs_mean", "advantage/frac_clipped"],
        "steps skipped": ["filter/steps_skipped", "train/nonfinite_skipped"],
    },
    "3 optimisation": {
        "gradient norm": ["grad_norm"],
        "learning rate": ["learning_rate"],
        "policy": ["nft/.*", "policy/.*"],
    },
    "4 speed and memory": {
        "seconds": ["time/.*"],
        "samples per second": ["samples_per_s"],
        "peak memory (GiB)": ["memory/.*"],
    },
    "5 reward model and data": {
        "reward model": ["reward_model/.*", "reward/nan", "reward/failed_as_zero"],
        "components of a combined reward": ["rewards/.*/mean"],
        "skipped rows": ["data/skipped"],
    },
    "6 rollout images (reward hacking)": {
        "brightness, saturation, contrast": ["images/brightness", "images/saturation", "images/contrast"],
        "near-black / near-white pixels": ["images/frac_near_black", "images/frac_near_white"],
        "edit to source distance": ["images/edit_distance"],
    },
}


def dashboard_layout() -> dict:
    """:data:`DASHBOARD` in the form ``SummaryWriter.add_custom_scalars`` takes (each chart a multiline plot of
    the tags matching its regular expressions, anchored so ``loss`` does not also match ``loss_x``)."""
    return {
        category: {title: ["Multiline", [f"^{t}$" for t in tags]] for title, tags in charts.items()}
        for category, charts in DASHBOARD.items()
    }


def tensorboards(trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def write_dashboard(trainer) -> None:
    if trainer.is_global_zero:
        for tb in tensorboards(trainer):
            tb.add_custom_scalars(dashboard_layout())


def _is_mlflow(logger) -> bool:
    return type(logger).__name__ == "MLFlowLogger" and hasattr(logger, "run_id")


def _media_path(logger, tag: str, step: int, suffix: str) -> Path | None:
    folder = getattr(logger, "log_dir", None)
    if not folder:
        return None
    safe = "/".join(re.sub(r"[^A-Za-z0-9_.-]", "_", part) for part in tag.split("/") if part not in ("", ".", ".."))
    path = Path(folder) / "media" / safe / f"{step:07d}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _pil(image: torch.Tensor):
    from PIL import Image

    x = image.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def add_image(trainer, tag: str, image: torch.Tensor, step: int) -> None:
    """``image``: (3, H, W), uint8 or float in [0, 1]."""
    if not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.experiment.add_image(tag, image, step)
        elif callable(getattr(lg, "log_image", None)):
            lg.log_image(key=tag, images=[_pil(image)], step=step)
        elif _is_mlflow(lg):
            lg.experiment.log_image(lg.run_id, _pil(image), key=tag.replace("/", "_"), step=step)
        elif (path := _media_path(lg, tag, step, ".png")) is not None:
            _pil(image).save(path)


def add_text(trainer, tag: str, text: str, step: int) -> None:
    if not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.experiment.add_text(tag, text, step)
        elif callable(getattr(lg, "log_text", None)):
            lg.log_text(key=tag, columns=["step", "text"], data=[[step, text]], step=step)
        elif _is_mlflow(lg):
            lg.experiment.log_text(lg.run_id, text, f"text/{tag}/{step:07d}.md")
        elif (path := _media_path(lg, tag, step, ".md")) is not None:
            path.write_text(text + "\n")


def add_scalars(trainer, metrics: dict[str, float], step: int) -> None:
    """Scalars logged outside a LightningModule hook's ``self.log`` (e.g. at train start/end), through each
    logger's ``log_metrics`` at ``step``."""
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_step(trainer) -> int:
    """The step Lightning writes training and validation scalars at (its count of training batches, kept in
    checkpoints; a batch that trained nothing moves it too), so images, text and scalars a callback writes line
    up with the scalars of the same batch, also after a resume. Use this, not ``global_step``, for anything
    logged."""
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
