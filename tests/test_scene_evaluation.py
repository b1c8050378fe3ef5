"""Held-out scene evaluation (editr1.evaluation.scenes and the SceneEvaluation callback) with a fake policy that
returns the source unchanged: its score is the identity baseline exactly, and a lossless "VAE" reaches the
ceiling of 1. The callback runs on fake trainers (no fit; test_module.py runs one end to end)."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from editr1.callbacks import SceneEvaluation
from editr1.data.scenes import SceneConfig
from editr1.evaluation.scenes import SceneEvalResult, evaluate_scenes
from editr1.images import to_tensor_images
from editr1.policies.base import Condition

SCENES = SceneConfig(size=24)


class SourcePolicy:
    """Samples x0 = the source exactly (v = (x − source)/σ under Euler); latents are the flattened pixels."""

    height = width = 24
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.adapters: list = []

    @contextlib.contextmanager
    def adapter(self, name):
        self.adapters.append(name)
        yield

    def preprocess(self, images):
        return to_tensor_images(images, self.height, self.width)

    def encode(self, images, prompts):
        return Condition({"src": images.flatten(1)})

    def latent_shape(self):
        return (3 * self.height * self.width,)

    def sigmas(self, steps):
        return torch.linspace(1, 0, steps + 1)

    def velocity(self, x, t, cond):
        return (x - cond["src"]) / t[:, None]

    def decode(self, x0):
        return x0.view(-1, 3, self.height, self.width).clamp(0, 1)

    def encode_images(self, images):
        return images.flatten(1)


# ---------------------------------------------------------------------------------------------- evaluate_scenes
def test_returning_the_source_scores_the_identity_baseline_and_a_lossless_round_trip_the_ceiling():
    res = evaluate_scenes(SourcePolicy(), SCENES, "heldout", count=5, group_size=2, steps=2, batch_size=3)
    assert res.rewards.shape == (5, 2) and res.edits.shape == (10, 3, 24, 24) and res.sources.shape == (5, 3, 24, 24)
    torch.testing.assert_close(res.edits, res.sources.repeat_interleave(2, 0), atol=1e-5, rtol=0)
    assert torch.allclose(res.identity, torch.full((5,), 0.5)) and torch.allclose(res.rewards, torch.full((5, 2), 0.5))
    assert torch.allclose(res.ceiling, torch.ones(5))
    assert len(res.prompts) == len(res.tasks) == 5 and res.split == "heldout"
    later = evaluate_scenes(SourcePolicy(), SCENES, "heldout", count=2, start=3, steps=2)
    assert later.prompts == res.prompts[3:5]  # seeds [start, start + count) of the split


def test_summary_by_hand():
    res = SceneEvalResult(
        split="heldout",
        rewards=torch.tensor([[0.2, 0.4], [1.0, 0.6], [0.0, 0.2]]),
        identity=torch.tensor([0.5, 0.5, 0.5]),
        ceiling=torch.tensor([1.0, 0.9, 0.8]),
        sources=torch.zeros(3, 3, 1, 1),
        edits=torch.zeros(6, 3, 1, 1),
        prompts=["a", "b", "c"],
        tasks=["remove", "add", "remove"],
    )
    assert res.mean == pytest.approx(2.4 / 6)
    summary = res.summary()
    assert summary == pytest.approx({"mean": 0.4, "identity": 0.5, "ceiling": 0.9, "task/add": 0.8, "task/remove": 0.2})
    assert list(summary) == ["mean", "identity", "ceiling", "task/add", "task/remove"]


# ---------------------------------------------------------------------------------------------- the callback
def test_splits_are_checked():
    with pytest.raises(ValueError, match=r"'heldout' and/or 'unseen', got \['test', 'train'\]"):
        SceneEvaluation(splits=["heldout", "train", "test"])


def test_scenes_come_from_the_callback_or_the_datamodule():
    own = SceneConfig(size=24, holdout=["circle:red"])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(scenes=SCENES))
    assert SceneEvaluation(scenes=own)._scenes(trainer) is own
    assert SceneEvaluation()._scenes(trainer) is SCENES
    with pytest.raises(ValueError, match="needs `scenes`"):
        SceneEvaluation()._scenes(SimpleNamespace(datamodule=None))


class Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.images: list[str] = []

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value
        self.steps[tag] = step

    def add_image(self, tag, image, step):
        assert image.ndim == 3 and image.shape[0] == 3
        self.images.append(tag)
        self.steps[f"image:{tag}"] = step


def _run(tmp_path, rank_zero=True, **kwargs):
    from lightning.pytorch.loggers import TensorBoardLogger

    writer = Writer()

    class TB(TensorBoardLogger):
        @property
        def experiment(self):
            return writer

    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(scenes=SCENES),
        global_step=0,
        is_global_zero=rank_zero,
        loggers=[TB(str(tmp_path / "tb"))],
        log_dir=str(tmp_path / "run"),
    )
    module = SimpleNamespace(policy=SourcePolicy())
    ev = SceneEvaluation(count=3, group_size=2, steps=2, image_rows=2, **kwargs)
    ev.on_train_start(trainer, module)
    trainer.global_step = 5  # optimiser steps; Lightning's scalar axis counts 7 batches (2 trained nothing)
    trainer.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=7))
    ev.on_train_end(trainer, module)
    return ev, writer, module.policy


def test_before_and_after_on_rank_zero(tmp_path, capsys):
    ev, writer, policy = _run(tmp_path)
    assert set(ev.results) == {"before", "after"}
    assert set(ev.results["after"]) == {"heldout"}  # no holdout pairs in the scene config: unseen is skipped
    after = ev.results["after"]["heldout"]
    assert (after["mean"], after["identity"], after["ceiling"]) == pytest.approx((0.5, 0.5, 1.0))
    assert policy.adapters == ["default", "default"]
    table = ev.table()
    assert table.splitlines() == [
        "Held-out scenes: 3 prompts x 2 edits, euler 2 steps, fixed seeds",
        f"{'split':<8} {'identity':>8} {'ceiling':>8} {'before':>8} {'after':>8} {'change':>8}",
        f"{'heldout':<8} {0.5:8.3f} {1.0:8.3f} {0.5:8.3f} {0.5:8.3f} {0.0:+8.3f}",
    ]
    assert table in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "scene_eval.json").read_text())
    assert saved["steps"] == 5 and saved["after"]["heldout"]["mean"] == pytest.approx(0.5)
    assert writer.scalars["eval/heldout/before"] == pytest.approx(0.5)
    assert writer.scalars["eval/heldout/identity"] == pytest.approx(0.5)
    assert writer.scalars["eval/heldout/ceiling"] == pytest.approx(1.0)
    assert any(tag.startswith("eval/heldout/after/task/") for tag in writer.scalars)
    assert writer.images == ["eval/heldout/before", "eval/heldout/after"]
    # scalars and grids on the training scalars' axis (batches), not on optimiser steps
    assert writer.steps["eval/heldout/before"] == writer.steps["image:eval/heldout/before"] == 0
    assert writer.steps["eval/heldout/after"] == writer.steps["image:eval/heldout/after"] == 7


def test_other_ranks_evaluate_but_write_nothing(tmp_path, capsys):
    ev, writer, _ = _run(tmp_path, rank_zero=False)
    assert ev.results["after"]["heldout"]["mean"] == pytest.approx(0.5)
    assert writer.scalars == {} and writer.images == []
    assert not (tmp_path / "run" / "scene_eval.json").exists() and capsys.readouterr().out == ""


@pytest.mark.parametrize(("adapter", "active"), [("ema", "ema"), ("old", "old"), ("reference", None)])
def test_the_adapter_setting_picks_the_policy_adapter(tmp_path, adapter, active):
    _, _, policy = _run(tmp_path, adapter=adapter)
    assert policy.adapters == [active, active]
