"""The objective interface: Work's defaults, the registry, and what an objective inherits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from editr1.objectives import (
    OBJECTIVES,
    AWMObjective,
    FlowGRPOObjective,
    NFTObjective,
    Objective,
    SFTObjective,
    Work,
)
from editr1.settings import NFTSettings, SFTSettings


def test_work_defaults_describe_a_process_that_can_idle():
    w = Work(count=3)
    assert (w.count, w.rows, w.can_idle, w.data) == (3, 0, True, None)


def test_registry_maps_config_names_to_classes():
    assert dict(OBJECTIVES) == {
        "nft": NFTObjective,
        "sft": SFTObjective,
        "flow_grpo": FlowGRPOObjective,
        "awm": AWMObjective,
    }
    assert all(cls.name == name for name, cls in OBJECTIVES.items())
    assert all(cls.needs in ("rollouts", "targets") for cls in OBJECTIVES.values())
    assert all(issubclass(cls, Objective) for cls in OBJECTIVES.values())


class Minimal(Objective):
    name = "minimal"
    needs = "targets"
    main_metric = "loss/minimal"

    def prepare(self, module, batch):
        return Work(count=len(batch["prompt"]))

    def micro_batch(self, module, work, positions, idle, total):
        return {"n": 0 if idle else len(positions)}

    def metrics(self, module, work, sums):
        return {"loss/minimal": sums["n"] / work.count}


def test_the_inherited_defaults():
    obj = Minimal(SimpleNamespace(micro_batch_size="6"))
    assert obj.micro_batch_size == 6 and isinstance(obj.micro_batch_size, int)
    assert obj.steps_without_samples is False
    assert obj.progress_bar == "loss" and obj.keep_old is None and obj.rollout_sde is None
    with pytest.raises(NotImplementedError, match="objective 'minimal' is not trained on rewarded rollouts"):
        obj.group_settings()
    work = obj.prepare(None, {"prompt": ["a", "b"]})
    assert obj.metrics(None, work, obj.micro_batch(None, work, [0, 1], False, 2)) == {"loss/minimal": 1.0}


def test_an_objective_must_implement_the_three_methods():
    class Partial(Objective):
        name, needs, main_metric = "partial", "targets", "x"

        def prepare(self, module, batch):
            return Work(0)

    with pytest.raises(TypeError, match="abstract"):
        Partial(SFTSettings())


def test_settings_are_kept_as_given():
    s = NFTSettings(micro_batch_size=3)
    assert NFTObjective(s).settings is s and NFTObjective(s).micro_batch_size == 3
    assert SFTObjective(SFTSettings(micro_batch_size=5)).micro_batch_size == 5
