"""Exact resume: a run SIGKILLed at a step and resumed with ``--ckpt_path last`` ends with the adapters
of an uninterrupted run from the same seed (separate processes, CPU) — for DiffusionNFT at three points of a
step, and for Flow-GRPO and AWM (``configs/objectives/``) at one each, to keep the suite's time small."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STEPS = {"nft": 3, "flow_grpo": 2, "awm": 2}  # optimiser steps per run (the new objectives: fewer, for time)


def _run(
    tmp: Path, name: str, kill: tuple[int, str] | None = None, resume: bool = False, objective: str = "nft"
) -> subprocess.CompletedProcess:
    steps = STEPS[objective]
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 1},
        }
    ]
    if kill is not None:
        callbacks.append({"class_path": "helpers.kill.KillAt", "init_args": {"step": kill[0], "phase": kill[1]}})
    cfg = tmp / f"{name}-{'resume' if resume else 'start'}.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    args = [
        sys.executable,
        "-m",
        "editr1",
        "fit",
        "-c",
        str(CONFIGS / "demo.yaml"),
        *(["-c", str(CONFIGS / "objectives" / f"{objective}.yaml")] if objective != "nft" else []),
        "-c",
        str(CONFIGS / "demo_smoke.yaml"),
        "-c",
        str(cfg),
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--model.rollout.steps=3",
        "--model.rollout.group_size=2",
        "--model.ema=true",
        "--reward.filter.ban=true",
        f"--trainer.logger.init_args.save_dir={tmp}",
        f"--trainer.logger.init_args.name={name}",
    ]
    if resume:
        args.append("--ckpt_path=last")
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        PYTHONWARNINGS="ignore",
    )
    return subprocess.run(args, cwd=tmp, capture_output=True, text=True, timeout=600, env=env)


def _final(tmp: Path, name: str) -> dict:
    return torch.load(tmp / name / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each objective, made once."""
    runs: dict[str, dict] = {}

    def get(objective: str) -> dict:
        if objective not in runs:
            tmp = tmp_path_factory.mktemp(f"resume-{objective}")
            out = _run(tmp, "straight", objective=objective)
            assert out.returncode == 0, out.stderr[-3000:]
            runs[objective] = _final(tmp, "straight")
        return runs[objective]

    return get


CASES = [
    ("nft", (1, "between_steps")),
    ("nft", (1, "mid_backward")),
    ("nft", (2, "before_optimizer_step")),
    ("flow_grpo", (1, "mid_backward")),  # one backward per trained denoising step
    ("awm", (1, "before_optimizer_step")),
]


@pytest.mark.parametrize(("objective", "kill"), CASES, ids=lambda c: f"{c[1]}@{c[0]}" if isinstance(c, tuple) else c)
def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, uninterrupted, objective, kill):
    uninterrupted = uninterrupted(objective)
    first = _run(tmp_path, "killed", kill=kill, objective=objective)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    killed_at = torch.load(tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert killed_at["global_step"] == kill[0]  # the last checkpoint is the step before the kill
    second = _run(tmp_path, "killed", resume=True, objective=objective)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (tmp_path / "killed" / "version_1").exists()  # continued in the same run folder
    end = _final(tmp_path, "killed")
    assert end["global_step"] == uninterrupted["global_step"] == STEPS[objective]
    a, b = end["state_dict"], uninterrupted["state_dict"]
    assert a.keys() == b.keys() and {k.split(".lora_")[1].split(".")[1] for k in a} == {"default", "old", "ema"}
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{objective} killed {kill[1]} at step {kill[0]}: largest adapter difference after resuming {diff:.3g}")
    assert diff <= 1e-6, diff
    assert end["editr1"]["rollouts_done"] == uninterrupted["editr1"]["rollouts_done"]
    # optimiser moments too
    sa, sb = end["optimizer_states"][0]["state"], uninterrupted["optimizer_states"][0]["state"]
    assert max(float((sa[i]["exp_avg"] - sb[i]["exp_avg"]).abs().max()) for i in sa) <= 1e-6
