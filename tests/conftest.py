"""Shared fixtures: tiny models built in code, small trainers, no downloads, CPU only."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MKL may otherwise pick its thread count per call, which changes float summation order between runs on a
# busy machine; the exact-equality tests need the same order every time (set before torch loads MKL;
# the multi-process tests' children inherit it).
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# Under pytest-xdist (``-n 2``, setup.cfg) each of the two workers takes one core.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def tiny_policy(resolution: int = 32, seed: int = 0):
    from editr1.policies import FluxKontextPolicy, TinyFlux

    return FluxKontextPolicy(resolution=resolution, max_sequence_length=16, tiny=TinyFlux(seed=seed))


def small_module(policy=None, **overrides):
    """An EditR1Module at test size: K = 4, 4 rollout steps, rank-4 LoRA."""
    from editr1.module import EditR1Module
    from editr1.policies.lora import LoraSettings
    from editr1.settings import EvalSettings, NFTSettings, OldPolicySettings, RolloutSettings

    kwargs = dict(
        lora=LoraSettings(rank=4, alpha=8.0),
        rollout=RolloutSettings(group_size=4, steps=4, batch_size=16),
        nft=NFTSettings(micro_batch_size=8),
        old_policy=OldPolicySettings(rate=0.2, cap=0.5),
        evaluation=EvalSettings(steps=4, batch_size=8),
        seed=1234,
    )
    kwargs.update(overrides)
    return EditR1Module(policy=policy or tiny_policy(), **kwargs)


def small_trainer(callbacks, max_steps: int = 2, **kwargs):
    import lightning as L

    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


@pytest.fixture
def scenes_data():
    from editr1.data import EditDataModule, SceneConfig

    return EditDataModule(scenes=SceneConfig(size=32), batch_size=2, train_size=64, val_size=4)
