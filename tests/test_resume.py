"""Exact resume: a run SIGKILLed at a step and resumed with ``--ckpt_path last`` ends with the adapters
of an uninterrupted run from the same seed (separate processes, CPU)."""

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
STEPS = 3


def _run(
    tmp: Path, name: str, kill: tuple[int, str] | None = None, resume: bool = False
) -> subprocess.CompletedProcess:
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
        "-c",
        str(CONFIGS / "demo_smoke.yaml"),
        "-c",
        str(cfg),
        f"--trainer.max_steps={STEPS}",
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
def uninterrupted(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    out = _run(tmp, "straight")
    assert out.returncode == 0, out.stderr[-3000:]
    return _final(tmp, "straight")


@pytest.mark.parametrize(
    "kill", [(1, "between_steps"), (1, "mid_backward"), (2, "before_optimizer_step")], ids=lambda k: f"{k[1]}@{k[0]}"
)
def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, uninterrupted, kill):
    first = _run(tmp_path, "killed", kill=kill)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    killed_at = torch.load(tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert killed_at["global_step"] == kill[0]  # the last checkpoint is the step before the kill
    second = _run(tmp_path, "killed", resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (tmp_path / "killed" / "version_1").exists()  # continued in the same run folder
    end = _final(tmp_path, "killed")
    assert end["global_step"] == uninterrupted["global_step"] == STEPS
    a, b = end["state_dict"], uninterrupted["state_dict"]
    assert a.keys() == b.keys() and {k.split(".lora_")[1].split(".")[1] for k in a} == {"default", "old", "ema"}
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"killed {kill[1]} at step {kill[0]}: largest adapter difference after resuming {diff:.3g}")
    assert diff <= 1e-6, diff
    assert end["editr1"]["rollouts_done"] == uninterrupted["editr1"]["rollouts_done"]
    # optimiser moments too
    sa, sb = end["optimizer_states"][0]["state"], uninterrupted["optimizer_states"][0]["state"]
    assert max(float((sa[i]["exp_avg"] - sb[i]["exp_avg"]).abs().max()) for i in sa) <= 1e-6
