"""FSDP2Strategy on one CPU process (multi-process runs are in test_distributed.py): its settings, one
data-parallel axis over every process, and checkpoints that hold the adapter weights only."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from editr1.strategies import FSDP2Strategy


def test_settings_and_defaults():
    s = FSDP2Strategy()
    assert isinstance(s, ModelParallelStrategy)
    assert s.shard is True and s._save_distributed_checkpoint is False
    assert s._data_parallel_size == "auto" and s._tensor_parallel_size == 1
    assert s._timeout == timedelta(minutes=30) and s._process_group_backend is None
    r = FSDP2Strategy(
        shard=False, save_distributed_checkpoint=True, process_group_backend="gloo", timeout=timedelta(seconds=9)
    )
    assert r.shard is False and r._save_distributed_checkpoint is True
    assert r._process_group_backend == "gloo" and r._timeout == timedelta(seconds=9)


def test_every_process_is_on_the_data_parallel_axis(monkeypatch):
    calls = []
    monkeypatch.setattr(ModelParallelStrategy, "setup_environment", lambda self: calls.append(self))
    s = FSDP2Strategy()
    s.num_nodes = 2
    s.parallel_devices = [torch.device("cpu")] * 3
    s.setup_environment()
    assert (s._data_parallel_size, s._tensor_parallel_size) == (6, 1) and calls == [s]


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(2, 2)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 1, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(1, 2, bias=False)})


def test_the_checkpoint_holds_the_adapters_only_detached_on_the_cpu():
    module = Tiny()
    s = FSDP2Strategy()
    s._lightning_module = module
    state = s.lightning_module_state_dict()
    assert sorted(state) == ["lora_A.default.weight", "lora_B.default.weight"]
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())
    assert torch.equal(state["lora_A.default.weight"], module.lora_A["default"].weight)


def test_sharded_parameters_are_gathered_whole():
    module = Tiny()
    whole = torch.arange(2.0).view(1, 2)
    module.lora_A["default"].weight.full_tensor = lambda: whole  # what a DTensor offers
    s = FSDP2Strategy()
    s._lightning_module = module
    assert torch.equal(s.lightning_module_state_dict()["lora_A.default.weight"], whole)


def test_distributed_checkpoints_are_lightnings(monkeypatch):
    monkeypatch.setattr(ModelParallelStrategy, "lightning_module_state_dict", lambda self: {"from": "lightning"})
    s = FSDP2Strategy(save_distributed_checkpoint=True)
    s._lightning_module = Tiny()
    assert s.lightning_module_state_dict() == {"from": "lightning"}
    s._save_distributed_checkpoint = False
    assert "from" not in s.lightning_module_state_dict()


@pytest.mark.parametrize(("shard", "calls"), [(True, ["mesh-dp"]), (False, [])])
def test_the_module_shards_its_policy_only_when_the_strategy_says_so(shard, calls):
    from types import SimpleNamespace

    from editr1.module import EditR1Module

    seen: list = []
    fake = SimpleNamespace(
        _trainer=SimpleNamespace(strategy=FSDP2Strategy(shard=shard)),
        _device_mesh={"data_parallel": "mesh-dp"},
        sharded=False,
        policy=SimpleNamespace(shard=seen.append),
    )
    EditR1Module.configure_model(fake)
    assert seen == calls and fake.sharded is shard
    EditR1Module.configure_model(fake)  # once only
    assert seen == calls
