"""Real multi-process training on CPU (gloo, 2 processes launched by Lightning): FSDP2-sharded and
replicated data parallelism give the adapters a 1-process run gives from the same seed and the same
global batch, two machines launched by torchrun give those of one machine with two processes, and a rank
whose groups are all filtered does not stall the others."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _fit(
    tmp: Path, name: str, devices: int, per_rank_batch: int, shard: bool | None, *extra: str, nodes: int = 1
) -> Path:
    """A tiny 2-step run; with ``nodes`` > 1, ``nodes`` torchrun agents of ``devices`` processes each on a loopback
    c10d rendezvous stand for that many machines (each its own launcher, as on a cluster)."""
    trainer: dict = {
        "accelerator": "cpu",
        "devices": devices,
        "num_nodes": nodes,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}],
    }
    if shard is not None:
        trainer["strategy"] = {"class_path": "editr1.strategies.FSDP2Strategy", "init_args": {"shard": shard}}
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": trainer}))
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
        f"--data.batch_size={per_rank_batch}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--model.rollout.steps=3",
        f"--trainer.logger.init_args.save_dir={tmp}",
        f"--trainer.logger.init_args.name={name}",
        *extra,
    ]
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
    )
    if nodes == 1:
        out = subprocess.run(args, cwd=tmp, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-4000:]
        return tmp / name / "version_0" / "checkpoints" / "last.ckpt"
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={devices}"]
    launcher += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={name}"]
    agents = [
        subprocess.Popen(
            [*launcher, *args[1:]], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for _ in range(nodes)
    ]
    logs = [a.communicate(timeout=600)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), "\n".join(log[-3000:] for log in logs)
    members = sorted(m for log in logs for m in re.findall(r"GLOBAL_RANK: (\d+), MEMBER: \d+/(\d+)", log))
    assert members == [(str(r), str(nodes * devices)) for r in range(nodes * devices)]  # one world over the agents
    return tmp / name / "version_0" / "checkpoints" / "last.ckpt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapters(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["state_dict"], ck


@pytest.fixture(scope="module")
def two_ranks_sharded(tmp_path_factory) -> Path:
    """One machine, two processes launched by Lightning, FSDP2-sharded (shared by the tests below)."""
    return _fit(tmp_path_factory.mktemp("fsdp"), "fsdp", 2, 2, True)


@pytest.mark.timeout(1200)
def test_two_ranks_sharded_and_replicated_match_one_rank(tmp_path, two_ranks_sharded):
    one, ck1 = _adapters(_fit(tmp_path, "one", 1, 4, None))
    results = {}
    for name, shard in (("fsdp", True), ("replicated", False)):
        ckpt = two_ranks_sharded if shard else _fit(tmp_path, name, 2, 2, shard)
        state, ck = _adapters(ckpt)
        assert ck["global_step"] == ck1["global_step"] == 2
        assert state.keys() == one.keys() and all(state[k].shape == one[k].shape for k in one)  # gathered whole
        b = [k for k in one if "lora_B.default" in k]  # what training moved (B starts at 0)
        diff = torch.cat([(state[k] - one[k]).flatten() for k in b])
        size = torch.cat([one[k].flatten() for k in b])
        results[name] = (float(diff.abs().max()), float(diff.norm() / size.norm()))
    lr = 1e-3  # the demo's learning rate
    assert float(size.abs().max()) > 0.5 * lr  # two Adam steps of ~lr each moved the adapters
    # Same global batch, same seeds: only float summation order differs (ranks sum in another order, FSDP
    # reduce-scatters). Adam's first steps divide by |g|, so a component with a tiny gradient can move a
    # little differently: bound the largest difference by a small fraction of one step, the overall by 1%.
    print("adapter differences vs 1 rank (largest, relative L2):", results)
    for name, (largest, relative) in results.items():
        assert largest < 0.05 * lr and relative < 0.01, (name, results)


def test_advantage_sum_over_two_ranks_matches_one_rank(tmp_path):
    """The components' scores are gathered like the rewards: each component's global std and the filter see the
    whole step, so two replicated ranks train what one rank trains on the same global batch."""
    extra = (
        "-c",
        str(CONFIGS / "reward" / "scene_plus_preservation.yaml"),
        "--reward.model.init_args.combine=advantage_sum",
    )
    one, _ = _adapters(_fit(tmp_path, "one", 1, 4, None, *extra))
    two, ck = _adapters(_fit(tmp_path, "two", 2, 2, False, *extra))
    assert ck["global_step"] == 2
    b = [k for k in one if "lora_B.default" in k]
    diff = torch.cat([(two[k] - one[k]).flatten() for k in b])
    size = torch.cat([one[k].flatten() for k in b])
    assert float(size.abs().max()) > 0 and float(diff.norm() / size.norm()) < 0.01


@pytest.mark.timeout(900)
def test_two_machines_of_one_process_under_torchrun_match_one_machine_of_two(tmp_path, two_ranks_sharded):
    """Two torchrun agents (two "machines", one process each, trainer.num_nodes 2) on a loopback rendezvous: the
    same world of two ranks as one machine with two processes, so the same adapters, bit for bit."""
    nodes, ck = _adapters(_fit(tmp_path, "nodes", 1, 2, True, nodes=2))
    one_machine, ck2 = _adapters(two_ranks_sharded)
    assert ck["global_step"] == ck2["global_step"] == 2 and nodes.keys() == one_machine.keys()
    assert all(torch.equal(nodes[k], one_machine[k]) for k in nodes)
    assert max(float(v.abs().max()) for k, v in nodes.items() if "lora_B.default" in k) > 0  # it trained


@pytest.mark.timeout(900)
def test_a_rank_with_every_group_filtered_does_not_stall_the_step(tmp_path):
    ckpt = _fit(
        tmp_path,
        "skewed",
        2,
        2,
        True,
        "--reward.model.class_path=helpers.rewards.RankOneSaturated",
        "--reward.filter.rule=paper",
    )
    state, ck = _adapters(ckpt)
    assert ck["global_step"] == 2  # both optimiser steps ran, on both ranks (rank 0 trained, rank 1 idled)
    assert max(float(v.abs().max()) for k, v in state.items() if "lora_B.default" in k) > 0


@pytest.mark.timeout(900)
def test_a_rank_whose_whole_batch_is_banned_joins_the_step_instead_of_hanging(tmp_path):
    """Two prompts, one per rank per epoch; rank 1's group is always saturated, so its prompt is banned (on
    both ranks). Next epoch one rank draws the banned prompt and has nothing to roll out while the other
    does: it must still take part in the step's collectives (it used to leave them, and the others waited)."""
    ckpt = _fit(
        tmp_path,
        "banned",
        2,
        1,
        False,
        "--reward.model.class_path=helpers.rewards.RankOneSaturated",
        "--reward.filter.rule=paper",
        "--reward.filter.std_threshold=1e-6",
        "--reward.filter.ban=true",
        "--data.train_size=2",
        "--trainer.max_steps=10",
        "--trainer.max_epochs=3",
    )
    state, ck = _adapters(ckpt)
    reward_state = next(v for k, v in ck["callbacks"].items() if k.startswith("RewardCallback"))
    # epoch 1: two groups; epoch 2: one (the other rank's prompt was banned); epoch 3: one or none
    assert reward_state["counts"]["groups"] in (3, 4)
    assert len(reward_state["banned"]) >= 1 and ck["global_step"] >= 1


@pytest.mark.timeout(900)
def test_sharded_qwen_evaluation_with_uneven_batches_does_not_hang(tmp_path):
    """FSDP2 shards Qwen-Image-Edit's text encoder, which encodes prompt by prompt: with 7 rows over 2 ranks
    (one row unreadable) the ranks' batches hold 2 and 1 prompts, and the short one pads its encoder calls
    (without that, the ranks' collectives went out of step: gloo failed, NCCL would wait forever)."""
    from editr1.data.mini_benchmarks import write_imgedit_mini

    write_imgedit_mini(tmp_path / "bench")
    cfg = tmp_path / "sharded.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 2,
                    "strategy": {"class_path": "editr1.strategies.FSDP2Strategy", "init_args": {"shard": True}},
                }
            }
        )
    )
    args = [
        sys.executable,
        "-m",
        "editr1",
        "test",
        "-c",
        str(CONFIGS / "demo.yaml"),
        "-c",
        str(CONFIGS / "demo_smoke.yaml"),
        "-c",
        str(CONFIGS / "model" / "tiny_qwen_image_edit.yaml"),
        "-c",
        str(CONFIGS / "benchmark" / "imgedit_mini.yaml"),
        "-c",
        str(cfg),
        f"--data.test_path={tmp_path / 'bench'}",
        "--data.batch_size=2",
        "--benchmark.judge=null",
        "--model.policy.init_args.tiny.text_layers=2",  # two encoder layers: each is its own FSDP unit
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.name=q",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "q" / "version_0" / "imgedit"
    assert sorted(p.name for p in run.glob("*.png")) == [f"{k}.png" for k in range(100, 106)]
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert (summary["edits_written"], summary["missing"]) == (6, 1)
