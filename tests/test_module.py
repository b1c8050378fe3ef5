"""EditR1Module + RewardCallback end to end on the tiny FLUX.1-Kontext (CPU)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import small_module, small_trainer
from editr1.algorithms.nft import old_policy_eta
from editr1.callbacks import FilterSettings, ImageWriter, RewardCallback
from editr1.policies import lora
from editr1.rewards import RewardInputs, RewardModel, SceneReward
from editr1.settings import OptimSettings


class ConstantReward(RewardModel):
    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        return torch.full((inputs.edits.shape[0],), self.value)


class NaNFirstGroupReward(RewardModel):
    """Scene reward, except the first group_size samples of every batch could not be judged."""

    def __init__(self, group_size: int) -> None:
        self.k = group_size
        self.inner = SceneReward()

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        r = self.inner.score(inputs)
        r[: self.k] = float("nan")
        return r


class Recorder(L.Callback):
    """Adapter weights before training and after every batch, and each step's rollout/decision."""

    def __init__(self) -> None:
        self.states: list[tuple[int, dict, dict]] = []
        self.steps: list = []

    def _snap(self, module, step):
        model = module.policy.transformer
        self.states.append((step, lora.adapter_state(model, lora.DEFAULT), lora.adapter_state(model, lora.OLD)))

    def on_train_start(self, trainer, module):
        self._snap(module, 0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(batch["experience"])
        self._snap(module, trainer.global_step)


def base_state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items() if "lora_" not in k}


def fit(module, data, reward=None, max_steps=3, callbacks=(), **trainer_kwargs):
    L.seed_everything(0)
    rec = Recorder()
    cbs = [RewardCallback(model=reward or SceneReward(), log_images_every_n_steps=0), rec, *callbacks]
    trainer = small_trainer(cbs, max_steps=max_steps, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer, rec


def test_fit_trains_default_old_follows_schedule_base_frozen(scenes_data):
    module = small_module()
    before = base_state(module)
    trainer, rec = fit(module, scenes_data, max_steps=3)
    assert trainer.global_step == 3
    # The base weights (everything that is not LoRA) never change.
    after = base_state(module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # θ moved.
    d0, d3 = rec.states[0][1], rec.states[-1][1]
    assert max(float((d3[k] - d0[k]).abs().max()) for k in d0) > 0
    # θ_old followed θ_old ← η·θ_old + (1 − η)·θ with η = min(0.2·step, 0.5), exactly.
    assert [s[0] for s in rec.states] == [0, 1, 2, 3]
    for (_, _, old_prev), (step, default, old) in zip(rec.states, rec.states[1:]):
        eta = old_policy_eta(step, rate=0.2, cap=0.5)
        assert eta == pytest.approx([0.2, 0.4, 0.5][step - 1])
        for k in old:
            expected = eta * old_prev[k] + (1 - eta) * default[k]
            torch.testing.assert_close(old[k], expected, rtol=1e-6, atol=1e-7)  # float rounding only
    # Old started as an exact copy of default.
    assert all(torch.equal(rec.states[0][1][k], rec.states[0][2][k]) for k in d0)
    metrics = trainer.callback_metrics
    for name in (
        "reward/mean",
        "reward/std",
        "frac_reward_zero_std",
        "filter/frac_groups_dropped",
        "loss/policy",
        "loss/kl",
        "nft/old_deviation",
        "learning_rate",
        "time/rollout_s",
        "time/reward_s",
        "time/train_s",
        # what trl / flow_grpo users look for
        "loss",
        "reward_std",
        "reward/min",
        "reward/max",
        "advantage/abs_mean",
        "advantage/frac_clipped",
        "time/step_s",
        "samples_per_s",
    ):
        assert name in metrics, name
    assert float(metrics["time/step_s"]) >= float(metrics["time/train_s"]) > 0
    assert float(metrics["reward/min"]) <= float(metrics["reward/mean"]) <= float(metrics["reward/max"])
    assert 0.0 <= float(metrics["advantage/frac_clipped"]) <= 1.0
    assert float(metrics["nft/trained_samples"]) == 2 * 4


def test_same_seed_same_rollouts_and_weights(scenes_data):
    from editr1.data import EditDataModule, SceneConfig

    def run(seed):
        data = EditDataModule(scenes=SceneConfig(size=32), batch_size=2, train_size=64, val_size=4)
        module = small_module(seed=seed)
        _, rec = fit(module, data, max_steps=2)
        return rec.steps[0].rollout.edits, rec.states[-1][1]

    edits_a, w_a = run(1234)
    edits_b, w_b = run(1234)
    edits_c, _ = run(99)
    assert torch.equal(edits_a, edits_b)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert not torch.equal(edits_a, edits_c)


def test_group_of_k_shares_one_encoding_and_differs_in_noise(scenes_data):
    module = small_module()
    _, rec = fit(module, scenes_data, max_steps=1)
    ro = rec.steps[0].rollout
    assert len(ro.cond) == ro.num_groups == 2  # encoded once per prompt, not per sample
    assert ro.x0.shape[0] == 2 * 4
    # The K samples of a group are different edits (different noise).
    assert not torch.equal(ro.x0[0], ro.x0[1])


def test_all_groups_filtered_skips_the_step_without_touching_weights(scenes_data):
    module = small_module()
    w0 = lora.adapter_state(module.policy.transformer, lora.DEFAULT)
    trainer, rec = fit(
        module, scenes_data, reward=ConstantReward(1.0), max_steps=5, limit_train_batches=3, max_epochs=1
    )
    assert trainer.global_step == 0
    assert module.skipped_steps == 3
    w1 = lora.adapter_state(module.policy.transformer, lora.DEFAULT)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(s.decision.dropped_low_variance.all() for s in rec.steps)


def test_nan_reward_drops_its_group_and_is_counted(scenes_data):
    module = small_module()
    trainer, rec = fit(module, scenes_data, reward=NaNFirstGroupReward(4), max_steps=2)
    for step in rec.steps:
        d = step.decision
        assert bool(d.dropped_nan[0]) and not bool(d.dropped_nan[1])
        assert not d.train_mask[0].any() and d.train_mask[1].all()
        assert torch.isnan(step.rewards[0]).all()  # never turned into a number
    assert float(trainer.callback_metrics["nft/trained_samples"]) == 4
    assert float(trainer.callback_metrics["reward/nan"]) == 4


def test_nan_policy_sample_keeps_the_rest_of_the_group(scenes_data):
    class OneNaN(RewardModel):
        def score(self, inputs):
            r = SceneReward().score(inputs)
            r[0] = float("nan")
            return r

    module = small_module()
    cb = RewardCallback(
        model=OneNaN(), filter=FilterSettings(rule="none", nan_policy="sample"), log_images_every_n_steps=0
    )
    rec = Recorder()
    small_trainer([cb, rec], max_steps=1).fit(module, datamodule=scenes_data)
    mask = rec.steps[0].decision.train_mask
    assert mask.sum() == 7 and not mask[0, 0]


def test_banned_prompts_are_not_rolled_out_again():
    from editr1.data import EditDataModule, SceneConfig

    data = EditDataModule(scenes=SceneConfig(size=32), batch_size=2, train_size=4, val_size=2)
    module = small_module()
    cb = RewardCallback(model=ConstantReward(1.0), filter=FilterSettings(ban=True), log_images_every_n_steps=0)
    trainer = small_trainer([cb], max_steps=10, max_epochs=2)
    trainer.fit(module, datamodule=data)
    assert len(cb.banned) == 4
    assert cb.counts["banned_prompts_skipped"] == 4  # the whole second epoch
    assert module.rollouts_done == 2  # only the first epoch was rolled out
    assert cb.state_dict()["banned"] == sorted(cb.banned)


def test_reward_outside_unit_interval_is_an_error(scenes_data):
    with pytest.raises(ValueError, match="outside"):
        fit(small_module(), scenes_data, reward=ConstantReward(1.5), max_steps=1)


def test_training_without_reward_callback_says_what_is_missing(scenes_data):
    trainer = small_trainer([], max_steps=1)
    with pytest.raises(RuntimeError, match="RewardCallback"):
        trainer.fit(small_module(), datamodule=scenes_data)


def test_checkpoint_holds_only_adapters_and_resumes(tmp_path, scenes_data):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = small_module()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer, _ = fit(module, scenes_data, max_steps=2, callbacks=[ckpt_cb], enable_checkpointing=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False, map_location="cpu")
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert {k.split(".lora_")[1].split(".")[1] for k in keys} == {"default", "old"}
    assert ckpt["editr1"]["rollouts_done"] == 2
    assert ckpt["editr1"]["seed"] == 1234
    # Resume in a fresh module: the adapters come back and training continues.
    resumed = small_module()
    trainer2 = small_trainer([RewardCallback(model=SceneReward(), log_images_every_n_steps=0)], max_steps=3)
    trainer2.fit(resumed, datamodule=scenes_data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer2.global_step == 3
    assert resumed.rollouts_done == 3


def test_validate_scores_held_out_scenes_and_predict_writes_pngs(tmp_path, scenes_data):
    module = small_module()
    cb = RewardCallback(model=SceneReward(), log_images_every_n_steps=0)
    trainer = small_trainer([cb, ImageWriter(str(tmp_path / "pred"))], limit_val_batches=None)
    metrics = trainer.validate(module, datamodule=scenes_data)[0]
    assert 0.0 <= metrics["val/reward"] <= 1.0
    assert metrics["val/failed"] == 0
    trainer.predict(module, datamodule=scenes_data, return_predictions=False)
    pngs = sorted((tmp_path / "pred").glob("*.png"))
    assert len(pngs) == 4
    lines = (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_eval_edits_are_fixed_per_prompt(scenes_data):
    module = small_module()
    scenes_data.setup("validate")
    batch = next(iter(scenes_data.val_dataloader()))
    a = module._evaluate(batch)["edits"]
    b = module._evaluate(batch)["edits"]
    assert torch.equal(a, b)


def test_eval_adapter_ema_requires_ema():
    from editr1.settings import EvalSettings

    with pytest.raises(ValueError, match="ema"):
        small_module(evaluation=EvalSettings(adapter="ema"))


def test_ema_adapter_tracks_default(scenes_data):
    module = small_module(ema=True)
    fit(module, scenes_data, max_steps=2)
    model = module.policy.transformer
    assert lora.adapter_names(model) == ["default", "ema", "old"]
    ema = lora.adapter_state(model, lora.EMA)
    default = lora.adapter_state(model, lora.DEFAULT)
    assert any(not torch.equal(ema[k], default[k]) for k in ema)  # decay (1+s)/(10+s) > 0


def test_adamw8bit_is_selectable():
    from editr1.settings import OptimSettings

    module = small_module(optim=OptimSettings(name="adamw8bit"))
    opt = module.configure_optimizers()
    assert type(opt).__name__ == "AdamW8bit"


def test_sft_objective_trains_default_towards_targets_without_rollouts(scenes_data):
    module = small_module(objective="sft")
    assert module.objective.needs == "targets"  # no rollouts, no reward
    cb = RewardCallback(model=SceneReward(), log_images_every_n_steps=0)
    rec = Recorder()
    rec.on_train_batch_end = lambda trainer, m, outputs, batch, batch_idx: rec._snap(m, trainer.global_step)
    trainer = small_trainer([cb, rec], max_steps=3)
    trainer.fit(module, datamodule=scenes_data)
    assert trainer.global_step == 3 and module.rollouts_done == 0
    d0, d3 = rec.states[0][1], rec.states[-1][1]
    assert max(float((d3[k] - d0[k]).abs().max()) for k in d0) > 0
    for _, default, old in rec.states:  # θ_old copies θ in supervised training
        assert all(torch.equal(default[k], old[k]) for k in default)
    assert "loss/sft" in trainer.callback_metrics


def test_sft_objective_needs_targets(tmp_path):
    import json

    from PIL import Image

    from editr1.data import EditDataModule

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    (tmp_path / "train_metadata.jsonl").write_text(json.dumps({"prompt": "p", "image": "images/a.png"}) + "\n")
    data = EditDataModule(path=str(tmp_path), batch_size=1)
    trainer = small_trainer([RewardCallback(model=SceneReward())], max_steps=1)
    with pytest.raises(ValueError, match="target"):
        trainer.fit(small_module(objective="sft"), datamodule=data)


def test_scene_evaluation_before_and_after(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from editr1.callbacks import SceneEvaluation
    from editr1.data import EditDataModule, SceneConfig

    scenes = SceneConfig(size=32, holdout=["circle:yellow"])
    data = EditDataModule(scenes=scenes, batch_size=2, train_size=16, val_size=2)
    ev = SceneEvaluation(count=4, group_size=2, steps=2, image_rows=2)
    trainer = small_trainer(
        [RewardCallback(model=SceneReward(), log_images_every_n_steps=0), ev],
        max_steps=2,
        logger=TensorBoardLogger(str(tmp_path), name="run"),
    )
    trainer.fit(small_module(), datamodule=data)
    for when in ("before", "after"):
        for split in ("heldout", "unseen"):
            r = ev.results[when][split]
            assert 0 <= r["mean"] <= 1 and r["identity"] == pytest.approx(0.5)
            assert 0.0 <= r["ceiling"] <= 1.0  # a random tiny VAE: the round trip is poor
    assert "heldout" in ev.table() and "unseen" in ev.table()
    saved = (tmp_path / "run" / "version_0" / "scene_eval.json").read_text()
    assert '"before"' in saved and '"after"' in saved


class NaNVelocityOn:
    """Makes the policy's velocity NaN during the given training batches (counted from 0)."""

    def __init__(self, module, batches: set[int]):
        self.module, self.batches, self.batch = module, batches, -1
        self.original = module.policy.velocity
        module.policy.velocity = self

    def __call__(self, x, t, cond):
        v = self.original(x, t, cond)
        return v * float("nan") if self.batch in self.batches and torch.is_grad_enabled() else v


class BatchCounter(L.Callback):
    def __init__(self, nan):
        self.nan = nan

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.nan.batch = batch_idx


def test_a_non_finite_step_is_skipped_and_counted(scenes_data):
    from editr1.settings import OptimSettings

    module = small_module(optim=OptimSettings(lr=1e-3, max_nonfinite_steps=3))
    nan = NaNVelocityOn(module, {1})
    with pytest.warns(UserWarning, match="non-finite"):
        trainer, rec = fit(module, scenes_data, max_steps=3, callbacks=[BatchCounter(nan)])
    assert trainer.global_step == 3  # the NaN batch did not count as a step; a fourth batch ran
    assert module.nonfinite_total == 1 and module.nonfinite_in_a_row == 0
    assert all(torch.isfinite(p).all() for p in module.policy.trainable_parameters())
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1


def test_too_many_non_finite_steps_stop_with_a_checkpoint(tmp_path, scenes_data):
    from editr1.settings import OptimSettings

    module = small_module(optim=OptimSettings(max_nonfinite_steps=2))
    nan = NaNVelocityOn(module, set(range(100)))
    with pytest.raises(RuntimeError, match="2 steps in a row had a non-finite"):
        fit(module, scenes_data, max_steps=5, callbacks=[BatchCounter(nan)], default_root_dir=str(tmp_path))
    saved = list(tmp_path.rglob("stopped-nonfinite-step0.ckpt"))
    assert len(saved) == 1
    ck = torch.load(saved[0], weights_only=True)
    assert ck["editr1"]["nonfinite"] == [2, 2] and all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_checkpoint_size_does_not_grow_with_the_base(tmp_path, scenes_data):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from editr1.policies import FluxKontextPolicy, TinyFlux
    from editr1.policies.tiny import TinyTextConfig

    sizes = {}
    for name, tiny in {
        "small": TinyFlux(),
        "big": TinyFlux(vae_channels=[32, 64], text=TinyTextConfig(t5_layers=6, clip_layers=4, t5_hidden=32)),
    }.items():
        policy = FluxKontextPolicy(resolution=32, max_sequence_length=16, tiny=tiny)
        module = small_module(policy=policy)
        ck = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        fit(module, scenes_data, max_steps=1, callbacks=[ck], enable_checkpointing=True)
        base = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if "lora_" not in n)
        lora = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if "lora_" in n)
        sizes[name] = (base, lora, (tmp_path / name / "last.ckpt").stat().st_size)
    (b_small, l_small, c_small), (b_big, l_big, c_big) = sizes["small"], sizes["big"]
    assert b_big > 2 * b_small and l_big == l_small  # a much bigger base, the same adapters
    assert abs(c_big - c_small) < 0.02 * c_small  # so the same checkpoint
    # adapters default + old, and Adam's two moments of default: about 2 x LoRA + 2 x trainable, plus counters
    assert c_small < 2.5 * l_small + 200_000


def test_sft_batch_with_nothing_readable_is_skipped_not_a_crash(tmp_path):
    import json

    from PIL import Image

    from editr1.data import EditDataModule

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (32, 32), (0, 0, 200)).save(tmp_path / "images" / "t.png")
    (tmp_path / "images" / "b.png").write_bytes(b"not an image")
    rows = [
        {"prompt": "make it blue", "image": "images/a.png", "target": "images/t.png"},
        {"prompt": "make it blue", "image": "images/b.png", "target": "images/t.png"},
    ]
    (tmp_path / "train_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = EditDataModule(path=str(tmp_path), batch_size=1, shuffle=False)
    module = small_module(objective="sft")
    trainer = small_trainer([RewardCallback(model=SceneReward())], max_steps=5, max_epochs=2)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and module.skipped_steps == 2  # one good row per epoch; the bad one skipped


def test_ban_rule_bans_with_one_rule_while_the_mask_follows_another():
    """reward.filter.ban_rule: every group trains (rule none) yet all are banned (paper rule: mean 1 > 0.9,
    std 0 < 0.05), so the second epoch rolls nothing out."""
    from editr1.data import EditDataModule, SceneConfig

    data = EditDataModule(scenes=SceneConfig(size=32), batch_size=2, train_size=4, val_size=2)
    module = small_module()
    cb = RewardCallback(
        model=ConstantReward(1.0),
        filter=FilterSettings(rule="none", ban=True, ban_rule="paper"),
        log_images_every_n_steps=0,
    )
    trainer = small_trainer([cb], max_steps=10, max_epochs=2)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2  # both first-epoch batches trained (rule none masked nothing)
    assert module.skipped_steps == 2  # the second epoch's batches were banned whole
    assert len(cb.banned) == 4 and cb.counts["banned_prompts_skipped"] == 4
    assert module.rollouts_done == 2


class SplitReward(RewardModel):
    """0.2 for every edit of the batch's first source, 0.8 for the second's."""

    def score(self, inputs):
        return torch.tensor([0.2 if g == 0 else 0.8 for g in inputs.source_ids])


def test_group_by_instruction_pools_rows_that_share_an_instruction(tmp_path):
    """Two images with the same instruction: grouped by key they are two groups (means 0.2 and 0.8); grouped by
    instruction text (the reference code's keying) one group of 2K samples, mean 0.5, and a ban names the
    instruction, so the same instruction on any image is skipped afterwards."""
    import json

    from PIL import Image

    from editr1.data import EditDataModule

    (tmp_path / "images").mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / name)
    rows = [{"prompt": "make it green", "image": f"images/{n}"} for n in ("a.png", "b.png")]
    (tmp_path / "train_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    means, banned = {}, {}
    for group_by in ("key", "instruction"):
        data = EditDataModule(path=str(tmp_path), batch_size=2, shuffle=False)
        module = small_module()
        # everything trains (rule none); the strict rule with τσ 0.5 bans both key groups (std 0) and the pooled
        # instruction group (std 0.3)
        f = FilterSettings(rule="none", group_by=group_by, ban=True, ban_rule="strict", std_threshold=0.5)
        cb = RewardCallback(model=SplitReward(), filter=f, log_images_every_n_steps=0)
        rec = Recorder()
        small_trainer([cb, rec], max_steps=1).fit(module, datamodule=data)
        means[group_by] = rec.steps[0].decision.mean.tolist()
        banned[group_by] = cb.banned
    assert means["key"] == pytest.approx([0.2, 0.8])
    assert means["instruction"] == pytest.approx([0.5, 0.5])
    assert len(banned["key"]) == 2 and not any(b.startswith("instruction:") for b in banned["key"])
    assert banned["instruction"] == {"instruction:make it green"}
    with pytest.raises(ValueError, match="group_by"):
        FilterSettings(group_by="prompt")


# ---------------------------------------------------------------------------------------------- run guards


def test_steps_that_train_nothing_are_bounded_and_stop_with_a_checkpoint(tmp_path, scenes_data):
    """Every group filtered every step (all rewards 1.0): without a bound `fit` would spin at step 0 forever."""
    module = small_module(optim=OptimSettings(max_idle_steps=3))
    with (
        pytest.warns(UserWarning, match="nothing to train on any process"),
        pytest.raises(RuntimeError, match=r"3 steps in a row trained nothing \(optim.max_idle_steps = 3\)"),
    ):
        fit(module, scenes_data, reward=ConstantReward(1.0), max_steps=5, default_root_dir=str(tmp_path))
    assert module.idle_in_a_row == 3
    assert list(tmp_path.rglob("stopped-idle-step0.ckpt"))


class AlwaysNaN(RewardModel):
    def score(self, inputs):
        return torch.full((inputs.edits.shape[0],), float("nan"))


def test_a_judge_that_judges_nothing_warns_then_stops_the_run(tmp_path, scenes_data, caplog):
    module = small_module()
    cb = RewardCallback(model=AlwaysNaN(), log_images_every_n_steps=0, max_failed_steps=2)
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="judged nothing for 2 steps in a row"):
        small_trainer([cb], max_steps=5, default_root_dir=str(tmp_path)).fit(module, datamodule=scenes_data)
    assert "could not judge any edit of this step" in caplog.text and "AlwaysNaN" in caplog.text
    assert list(tmp_path.rglob("stopped-reward-step0.ckpt"))


def test_a_diverged_policy_stops_the_run_with_a_message(scenes_data):
    """lr 1e30 makes the LoRA product overflow: the run stops at once instead of dropping NaN rewards forever."""
    module = small_module(optim=OptimSettings(lr=1e30, grad_clip=0.0))
    with pytest.raises(RuntimeError, match="non-finite|not finite"):
        fit(module, scenes_data, max_steps=5)
    assert module.global_step <= 2


class InterruptAt(L.Callback):
    def __init__(self, exc: BaseException, batch: int = 1) -> None:
        self.exc, self.batch = exc, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            raise self.exc


def test_ctrl_c_and_sigterm_save_a_checkpoint(tmp_path, scenes_data, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    for exc, name in ((KeyboardInterrupt(), "Ctrl-C"), (SIGTERMException(), "SIGTERM")):
        root = tmp_path / name
        module = small_module()
        with pytest.raises(SystemExit):
            fit(module, scenes_data, max_steps=5, callbacks=[InterruptAt(exc)], default_root_dir=str(root))
        saved = list(root.rglob("stopped-interrupted-step1.ckpt"))
        assert len(saved) == 1 and torch.load(saved[0], weights_only=True)["global_step"] == 1
        assert f"editr1: {name} at step 1: saved" in capsys.readouterr().out


def test_predict_writes_even_when_a_config_replaced_the_callbacks(tmp_path, scenes_data, capsys):
    module = small_module()
    trainer = small_trainer([], default_root_dir=str(tmp_path))  # e.g. -c configs/trainer/cpu.yaml: no ImageWriter
    trainer.predict(module, datamodule=scenes_data, return_predictions=False)
    out = tmp_path / "predictions"
    assert len(list(out.glob("*.png"))) == 4 and len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert f"predict: wrote 4 edits to {out}" in capsys.readouterr().out


def test_the_end_of_run_summary_is_printed(scenes_data, capsys):
    fit(small_module(), scenes_data, max_steps=1)
    assert "editr1 run summary: groups 2" in capsys.readouterr().out
