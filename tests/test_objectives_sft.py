"""SFTObjective with a fake policy (no model): what it declares, the errors of prepare, per-row timesteps that
follow the row's key, and a flow-matching loss whose gradient does not depend on the micro-batching."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from editr1.objectives.sft import SFTObjective
from editr1.policies.base import Condition
from editr1.settings import SFTSettings


class FakePolicy:
    """Sources and targets are (3, 2, 2) tensors; latents their first four numbers; v = θ·x_t + cond."""

    height = width = 2
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.theta = torch.nn.Parameter(torch.tensor(0.5))
        self.encoded: list[list[str]] = []

    def preprocess(self, images):
        return torch.stack(list(images)) if isinstance(images, list) else images

    def encode(self, images, prompts):
        self.encoded.append(list(prompts))
        return Condition({"e": images.flatten(1)[:, :4]})

    def encode_images(self, images):
        return images.flatten(1)[:, 4:8].clone()

    def velocity(self, x_t, t, cond):
        return self.theta * x_t + cond["e"] * t[:, None]


def _batch(keys: list[str], with_targets: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    images = {k: torch.rand(3, 2, 2, generator=g) for k in sorted(set(keys))}
    return {
        "prompt": [f"edit {k}" for k in keys],
        "key": keys,
        "image": [images[k] for k in keys],
        "target": [1 - images[k] for k in keys] if with_targets else None,
    }


def _module(policy=None, sharded=False, step=2):
    return SimpleNamespace(
        policy=policy or FakePolicy(),
        world_size=1,
        device=torch.device("cpu"),
        sharded=sharded,
        global_step=step,
        seed=99,
        loss_world_scale=1.0,
        manual_backward=lambda loss: loss.backward(),
    )


def test_what_it_declares():
    obj = SFTObjective(SFTSettings())
    assert (obj.name, obj.needs, obj.main_metric, obj.progress_bar, obj.keep_old) == (
        "sft",
        "targets",
        "loss/sft",
        "loss",
        0.0,  # θ_old tracks θ exactly
    )
    assert obj.steps_without_samples is False and obj.micro_batch_size == 16
    with pytest.raises(NotImplementedError, match="'sft'"):
        obj.group_settings()


@pytest.mark.parametrize("batch", [{"prompt": ["a"], "key": ["a"], "image": []}, {"target": None, "prompt": []}])
def test_prepare_without_targets_says_how_to_get_them(batch):
    with pytest.raises(ValueError, match="objective 'sft' needs target images.*data.targets"):
        SFTObjective(SFTSettings()).prepare(_module(), batch)


def test_a_batch_with_no_readable_row_trains_nothing_unless_sharded():
    obj = SFTObjective(SFTSettings())
    empty = {"prompt": [], "key": [], "image": [], "target": []}
    work = obj.prepare(_module(), empty)
    assert (work.count, work.rows, work.can_idle) == (0, 0, False)
    with pytest.raises(RuntimeError, match="sharded supervised training needs every process to train"):
        obj.prepare(_module(sharded=True), empty)


def test_prepare_encodes_every_row_and_draws_its_timestep_from_its_key():
    policy = FakePolicy()
    obj = SFTObjective(SFTSettings(timesteps="uniform"))
    work = obj.prepare(_module(policy), _batch(["a", "b", "c"]))
    assert (work.count, work.rows, work.can_idle) == (3, 3, True)
    assert policy.encoded == [["edit a", "edit b", "edit c"]]
    rows = work.data
    assert rows.x0.shape == (3, 4) and rows.t.shape == (3,) and ((rows.t >= 0) & (rows.t < 1)).all()
    assert rows.step == 2 and len(set(rows.t.tolist())) == 3
    again = obj.prepare(_module(), _batch(["c", "a"])).data
    assert again.t.tolist() == [rows.t[2].item(), rows.t[0].item()]  # the batch position does not matter
    later = obj.prepare(_module(step=3), _batch(["a", "b", "c"])).data
    assert not torch.equal(later.t, rows.t)  # a new draw every step
    repeat = obj.prepare(_module(), _batch(["a", "a"])).data
    assert repeat.t[0] != repeat.t[1]  # a repeated key is another occurrence, another draw


def _run(chunks: list[list[int]], idle: bool = False):
    policy = FakePolicy()
    module = _module(policy)
    obj = SFTObjective(SFTSettings())
    work = obj.prepare(module, _batch(["a", "b", "c", "d"]))
    total = 0.0
    for positions in chunks:
        total += obj.micro_batch(module, work, positions, idle, work.count)["loss"]
    return policy.theta.grad, obj.metrics(module, work, {"loss": total})


def test_the_gradient_does_not_depend_on_the_micro_batching():
    whole, metrics = _run([[0, 1, 2, 3]])
    split, split_metrics = _run([[0], [1, 2], [3]])
    assert whole is not None and float(whole.abs()) > 0
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    assert split_metrics["loss/sft"] == pytest.approx(metrics["loss/sft"], rel=1e-6)
    assert metrics.keys() == {"loss", "loss/sft"} and metrics["loss/sft"] > 0 and metrics["loss"] == metrics["loss/sft"]


def test_an_idle_micro_batch_makes_the_calls_with_zero_weight():
    grad, _ = _run([[0]], idle=True)
    assert grad is not None and float(grad) == 0.0
