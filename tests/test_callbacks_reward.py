"""The reward stage on a fake module and trainer (no model, no fit): rewards collected chunk by chunk in sample
order, the filter and bans, failures dropped / zeroed / stopped on, state round trips, validation scoring, and
what it logs. The end-to-end behaviour with a real policy is in test_module.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from editr1.callbacks.reward import RewardCallback, check_rewards
from editr1.objectives import NFTObjective, SFTObjective
from editr1.policies.base import Condition
from editr1.rewards.base import RewardInputs, RewardModel
from editr1.settings import FilterSettings, NFTSettings, RolloutSettings, SFTSettings
from editr1.training.experience import Experience
from editr1.training.rollout import Rollout

K = 3


class Brightness(RewardModel):
    """The reward of an edit is its mean pixel value; NaN where the value is negative (a failed judgement)."""

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.closed = False

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        self.chunks.append(inputs.edits.shape[0])
        r = inputs.edits.mean(dim=(1, 2, 3))
        return torch.where(r < 0, torch.full_like(r, float("nan")), r)

    def stats(self):
        return {"failed/http_503": 2.0}

    def close(self):
        self.closed = True


class FakeModule:
    """What the reward stage uses of EditR1Module: sample_groups (edits of a given brightness per key, scored in
    chunks of 2), objective, rollout_settings, sharded, device, global_step, log / log_dict."""

    def __init__(self, values: dict[str, list[float]], objective=None) -> None:
        self.values = values
        self.objective = objective or NFTObjective(NFTSettings())
        self.rollout_settings = RolloutSettings(group_size=K, batch_size=2)
        self.sharded = False
        self.device = torch.device("cpu")
        self.global_step = 0
        self.rollouts = 0
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = float(value)

    def log_dict(self, metrics, **kwargs):
        self.logged.update({k: float(v) for k, v in metrics.items()})

    def sample_groups(self, batch, on_chunk=None):
        index, self.rollouts = self.rollouts, self.rollouts + 1
        keys = list(batch["key"])
        if not keys:
            return None
        g = len(keys)
        edits = torch.tensor([v for k in keys for v in self.values[k]]).view(g * K, 1, 1, 1).expand(g * K, 3, 2, 2)
        sources = torch.zeros(g, 3, 2, 2)
        for s in range(0, g * K, 2):
            idx = list(range(s, min(s + 2, g * K)))
            chunk = RewardInputs(
                sources[[i // K for i in idx]], edits[idx], [batch["prompt"][i // K] for i in idx], [""] * len(idx)
            )
            on_chunk(chunk)
        return Rollout(
            prompts=list(batch["prompt"]),
            requirements=list(batch["requirement"]),
            keys=keys,
            sources=sources,
            targets=None,
            cond=Condition({"e": torch.zeros(g, 1)}),
            x0=torch.zeros(g * K, 2),
            edits=edits,
            sigmas=torch.tensor([1.0, 0.0]),
            group_size=K,
            index=index,
            base_seed=0,
        )


class FakeTrainer:
    def __init__(self, tmp_path=None, datamodule=None) -> None:
        self.world_size, self.global_rank, self.is_global_zero = 1, 0, True
        self.loggers: list = []
        self.datamodule = datamodule
        self.log_dir, self.default_root_dir = None, str(tmp_path or ".")
        self.global_step = 4
        self.saved: list[str] = []
        self.sanity_checking = False

    def save_checkpoint(self, path):
        self.saved.append(path)


def _batch(keys, prompts=None, skipped=None) -> dict:
    return {
        "key": list(keys),
        "prompt": list(prompts or [f"prompt {k}" for k in keys]),
        "requirement": [""] * len(keys),
        "image": [None] * len(keys),
        "task": ["recolor"] * len(keys),
        "target": None,
        "meta": [{} for _ in keys],
        "skipped": skipped or {},
    }


VALUES = {
    "a": [0.1, 0.5, 0.9],  # varied: trains
    "b": [1.0, 1.0, 1.0],  # saturated: the paper's filter drops it
    "c": [0.2, -1.0, 0.4],  # one failed judgement: dropped with nan_policy group
}


# ---------------------------------------------------------------------------------------------- construction
def test_construction_checks():
    with pytest.raises(ValueError, match="on_failure must be 'drop', 'stop' or 'zero', got 'retry'"):
        RewardCallback(Brightness(), on_failure="retry")
    with pytest.raises(TypeError, match="reward model must be a RewardModel, got function"):
        RewardCallback(lambda inputs: inputs)


def test_check_rewards_shape_and_range():
    check_rewards(torch.tensor([0.0, 1.0, float("nan")]), 3)  # NaN: not judged, allowed
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\) for 2 edits"):
        check_rewards(torch.zeros(2, 1), 2)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]: \[1.5, -0.25\]"):
        check_rewards(torch.tensor([1.5, 0.5, -0.25]), 3)


# ---------------------------------------------------------------------------------------------- training
def test_one_step_collects_chunks_in_order_filters_and_logs():
    model = Brightness()
    cb = RewardCallback(model, log_images_every_n_steps=0)
    module, batch = FakeModule(VALUES), _batch(["a", "b", "c"], skipped={"unreadable_image": 2})
    cb.on_train_batch_start(FakeTrainer(), module, batch, 0)
    exp: Experience = batch["experience"]
    assert model.chunks == [2, 2, 2, 2, 1]  # 9 samples scored in chunks of the rollout batch size
    expected = torch.tensor([[0.1, 0.5, 0.9], [1.0, 1.0, 1.0], [0.2, float("nan"), 0.4]])
    torch.testing.assert_close(exp.rewards, expected, equal_nan=True)
    assert exp.decision.train_mask.tolist() == [[True] * 3, [False] * 3, [False] * 3]
    assert exp.trainable == 3
    assert cb.counts == {
        "data_skipped/unreadable_image": 2,
        "groups": 3,
        "groups_dropped_low_variance": 1,
        "groups_dropped_nan": 1,
        "rewards_nan": 1,
    }
    finite = torch.tensor([0.1, 0.5, 0.9, 1.0, 1.0, 1.0, 0.2, 0.4])
    logged = module.logged
    assert logged["reward/mean"] == pytest.approx(float(finite.mean()))
    assert logged["reward/std"] == pytest.approx(float(finite.std(unbiased=False)))
    assert logged["reward/nan"] == 1.0 and logged["data/skipped"] == 2.0
    assert logged["filter/frac_groups_dropped"] == pytest.approx(2 / 3)
    assert logged["frac_reward_zero_std"] == pytest.approx(1 / 3)  # b's std is 0 (c's is over its finite two)
    assert logged["reward_model/failed/http_503"] == 2.0
    assert logged["filter/groups_banned"] == 0.0  # bans are off


def test_on_failure_zero_scores_failed_judgements_zero_and_counts_them():
    cb = RewardCallback(Brightness(), log_images_every_n_steps=0, on_failure="zero")
    module, batch = FakeModule(VALUES), _batch(["c"])
    cb.on_train_batch_start(FakeTrainer(), module, batch, 0)
    assert batch["experience"].rewards.tolist() == [[pytest.approx(0.2), 0.0, pytest.approx(0.4)]]
    assert batch["experience"].trainable == 3
    assert cb.counts["rewards_failed_as_zero"] == 1 and cb.counts["rewards_nan"] == 0
    assert module.logged["reward/failed_as_zero"] == 1.0


def test_on_failure_stop_saves_a_checkpoint_and_says_where(tmp_path):
    cb = RewardCallback(Brightness(), log_images_every_n_steps=0, on_failure="stop")
    trainer = FakeTrainer(tmp_path)
    with pytest.raises(
        RuntimeError, match=r"could not judge 1 of 6 edits.*'failed/http_503': 2.0.*stopped-reward-step4"
    ):
        cb.on_train_batch_start(trainer, FakeModule(VALUES), _batch(["a", "c"]), 0)
    assert trainer.saved == [str(tmp_path / "checkpoints" / "stopped-reward-step4.ckpt")]


def test_a_supervised_objective_gets_no_rollout_only_the_skip_counts():
    module = FakeModule(VALUES, objective=SFTObjective(SFTSettings()))
    cb = RewardCallback(Brightness(), log_images_every_n_steps=0)
    batch = _batch(["a"], skipped={"missing_image_file": 1})
    cb.on_train_batch_start(FakeTrainer(), module, batch, 0)
    assert "experience" not in batch and module.rollouts == 0
    assert cb.counts == {"data_skipped/missing_image_file": 1} and module.logged == {"data/skipped": 1.0}


def test_bans_drop_the_prompt_from_later_batches():
    cb = RewardCallback(Brightness(), filter=FilterSettings(ban=True), log_images_every_n_steps=0)
    module = FakeModule(VALUES)
    cb.on_train_batch_start(FakeTrainer(), module, _batch(["a", "b"]), 0)
    assert cb.banned == {"b"} and module.logged["filter/groups_banned"] == 1.0
    batch = _batch(["b", "a", "b"])
    cb.on_train_batch_start(FakeTrainer(), module, batch, 1)
    assert batch["key"] == ["a"] and batch["prompt"] == ["prompt a"] and batch["task"] == ["recolor"]
    assert cb.counts["banned_prompts_skipped"] == 2
    everything_banned = _batch(["b"])
    cb.on_train_batch_start(FakeTrainer(), module, everything_banned, 2)
    exp = everything_banned["experience"]
    assert exp.rollout is None and exp.rewards.shape == (0, K) and exp.trainable == 0


def test_bans_by_instruction_name_the_instruction():
    f = FilterSettings(ban=True, group_by="instruction")
    cb = RewardCallback(Brightness(), filter=f, log_images_every_n_steps=0)
    cb.on_train_batch_start(FakeTrainer(), FakeModule(VALUES), _batch(["a", "b"], ["make it red", "recolor"]), 0)
    assert cb.banned == {"instruction:recolor"}
    batch = _batch(["x", "y"], ["recolor", "make it red"])  # other rows, the banned instruction
    cb._drop_banned(batch)
    assert batch["key"] == ["y"]


def test_dropping_banned_rows_keeps_every_per_row_field_aligned():
    cb = RewardCallback(Brightness(), log_images_every_n_steps=0)
    cb.banned = {"b"}
    batch = _batch(["a", "b"])
    batch["references"], batch["mask"] = [["ref a"], ["ref b"]], ["mask a", None]
    cb._drop_banned(batch)
    assert len(batch["meta"]) == len(batch["key"]) == 1
    assert batch["references"] == [["ref a"]] and batch["mask"] == ["mask a"]


def test_rollout_images_go_to_tensorboard_every_n_rollouts(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    calls = []

    class TB(TensorBoardLogger):
        @property
        def experiment(self):
            return SimpleNamespace(
                add_image=lambda tag, img, step: calls.append((tag, tuple(img.shape[:1]), step)),
                add_text=lambda tag, text, step: calls.append((tag, text, step)),
                add_histogram=lambda tag, values, step: calls.append((tag, values.numel(), step)),
            )

    trainer = FakeTrainer()
    trainer.loggers = [TB(str(tmp_path))]
    cb = RewardCallback(Brightness(), log_images_every_n_steps=2, image_groups=2)
    module = FakeModule(VALUES)
    for step in range(3):  # rollouts 0 and 2 are shown
        module.global_step = trainer.global_step = step  # no fit loop here: the trainer's step is the axis
        cb.on_train_batch_start(trainer, module, _batch(["a", "b", "c"]), step)
    assert calls == [
        ("reward/histogram", 8, 0),  # every finite reward of the rollout
        ("rollouts/source_edits", (3,), 0),
        ("rollouts/instructions", "0. prompt a\n\n1. prompt b", 0),
        ("reward/histogram", 8, 2),
        ("rollouts/source_edits", (3,), 2),
        ("rollouts/instructions", "0. prompt a\n\n1. prompt b", 2),
    ]


# ---------------------------------------------------------------------------------------------- state
def test_state_round_trips_and_refuses_bans_keyed_another_way():
    cb = RewardCallback(Brightness(), filter=FilterSettings(ban=True))
    cb.banned, cb.counts["groups"] = {"z", "a"}, 7
    state = cb.state_dict()
    assert state["banned"] == ["a", "z"] and state["counts"] == {"groups": 7} and state["filter"]["group_by"] == "key"
    other = RewardCallback(Brightness())
    other.load_state_dict(state)
    assert other.banned == {"a", "z"} and other.counts == {"groups": 7}
    by_instruction = RewardCallback(Brightness(), filter=FilterSettings(group_by="instruction"))
    with pytest.raises(ValueError, match="bans name groups by 'key', this run groups by 'instruction'"):
        by_instruction.load_state_dict(state)
    by_instruction.load_state_dict({**state, "banned": []})  # nothing banned: nothing to misread
    by_instruction.load_state_dict({"banned": [], "counts": {}})  # an older checkpoint without the filter


def test_rows_rejected_when_the_data_was_read_are_counted_once():
    dm = SimpleNamespace(skipped_rows=lambda split: {"bad_json": 3} if split == "train" else {})
    cb = RewardCallback(Brightness())
    cb.on_train_start(FakeTrainer(datamodule=dm), None)
    cb.on_train_start(FakeTrainer(datamodule=dm), None)  # a resumed run already has them
    assert cb.counts == {"data_skipped/bad_json": 3}
    RewardCallback(Brightness()).on_train_start(FakeTrainer(datamodule=None), None)  # no datamodule: fine


def test_teardown_closes_the_reward_model():
    model = Brightness()
    RewardCallback(model).teardown(FakeTrainer(), None, "fit")
    assert model.closed


# ---------------------------------------------------------------------------------------------- evaluation
def _outputs(values, padding=(), targets=None):
    n = len(values)
    return {
        "keys": [str(i) for i in range(n)],
        "prompts": [f"p{i}" for i in range(n)],
        "requirements": [""] * n,
        "sources": torch.zeros(n, 3, 2, 2),
        "edits": torch.tensor(values, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2),
        "targets": targets,
        "meta": [{"padding": True} if i in padding else {} for i in range(n)],
    }


def test_validation_scores_real_rows_and_logs_the_mean_and_failures():
    cb = RewardCallback(Brightness())
    module, trainer = FakeModule(VALUES), FakeTrainer()
    cb.on_validation_epoch_start(trainer, module)
    first = _outputs([0.2, 0.4, 0.9], padding={2})  # the padding row is a repeat: not judged
    cb.on_validation_batch_end(trainer, module, first, None, 0)
    assert first["rewards"].tolist() == [pytest.approx(0.2), pytest.approx(0.4)]
    cb.on_validation_batch_end(trainer, module, _outputs([-1.0, 0.6]), None, 1)  # one failed judgement
    cb.on_validation_batch_end(trainer, module, {**_outputs([0.5]), "edits": None}, None, 2)  # nothing readable
    cb.on_validation_epoch_end(trainer, module)
    assert module.logged["val/reward"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert module.logged["val/failed"] == 1.0


def test_a_reward_that_needs_targets_is_skipped_on_data_without_them():
    model = Brightness()
    model.needs_targets = True
    cb = RewardCallback(model)
    module, trainer = FakeModule(VALUES), FakeTrainer()
    cb.on_test_epoch_start(trainer, module)
    outputs = _outputs([0.3])
    cb.on_test_batch_end(trainer, module, outputs, None, 0)
    cb.on_test_epoch_end(trainer, module)
    assert "rewards" not in outputs and model.chunks == [] and module.logged == {}
    with_targets = _outputs([0.3], targets=torch.zeros(1, 3, 2, 2))
    cb.on_test_epoch_start(trainer, module)
    cb.on_test_batch_end(trainer, module, with_targets, None, 0)
    cb.on_test_epoch_end(trainer, module)
    assert module.logged["test/reward"] == pytest.approx(0.3)


def test_the_progress_bar_names_each_phase_of_a_step():
    from editr1.callbacks.progress import StepProgressBar

    class Recording(StepProgressBar):
        def __init__(self) -> None:
            super().__init__()
            self.phases: list[str | None] = []

        def set_phase(self, text):
            self.phases.append(text)

    bar, trainer = Recording(), FakeTrainer()
    trainer.callbacks = [bar]
    RewardCallback(Brightness(), log_images_every_n_steps=0).on_train_batch_start(
        trainer, FakeModule(VALUES), _batch(["a", "b", "c"]), 0
    )
    rollout = [f"rollout {n}/9 edits" for n in (0, 2, 4, 6, 8, 9)]  # after each chunk of 2 (the rollout batch)
    judging = [f"judging {n}/9 edits" for n in (0, 2, 4, 6, 8)]  # before waiting on each chunk's judgement
    assert bar.phases == rollout + judging + ["training on 1 of 3 groups"]


def test_a_combined_rewards_components_are_logged_by_name():
    from editr1.rewards.combined import CombinedReward

    class Half(RewardModel):
        def score(self, inputs):
            return torch.full((inputs.edits.shape[0],), 0.5)

    module, batch = FakeModule(VALUES), _batch(["a", "b"])
    reward = CombinedReward({"bright": Brightness(), "half": Half()})
    RewardCallback(reward, log_images_every_n_steps=0).on_train_batch_start(FakeTrainer(), module, batch, 0)
    bright = torch.tensor([0.1, 0.5, 0.9, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert module.logged["rewards/bright/mean"] == pytest.approx(float(bright.mean()))
    assert module.logged["rewards/bright/std"] == pytest.approx(float(bright.std(unbiased=False)))
    assert module.logged["rewards/half/mean"] == 0.5 and module.logged["rewards/half/std"] == 0.0
    assert module.logged["reward/mean"] == pytest.approx(float((bright + 0.5).mean() / 2))
    assert module.logged["reward_model/failed/bright"] == 0.0


def test_rollout_image_statistics_are_logged_and_a_hacked_reward_trips_the_guard(tmp_path):
    from editr1.training.guards import RunStopped

    cb = RewardCallback(
        Brightness(), log_images_every_n_steps=0, image_limits={"brightness": [None, 0.8]}, image_limit_steps=2
    )
    module, trainer = FakeModule(VALUES), FakeTrainer(tmp_path)
    cb.on_train_batch_start(trainer, module, _batch(["a"]), 0)  # brightness 0.5: fine
    assert module.logged["images/brightness"] == pytest.approx(0.5) and cb.limits_in_a_row == 0
    cb.on_train_batch_start(trainer, module, _batch(["b"]), 1)  # every edit white: the reward's favourite
    assert module.logged["images/frac_near_white"] == 1.0 and cb.limits_in_a_row == 1 and not trainer.saved
    with pytest.raises(RunStopped, match=r"outside reward.image_limits for 2 steps in a row \(brightness 1 > 0.8\)"):
        cb.on_train_batch_start(trainer, module, _batch(["b"]), 2)
    assert trainer.saved and "stopped-image_limits" in trainer.saved[0]
    with pytest.raises(ValueError, match="unknown statistic"):
        RewardCallback(Brightness(), image_limits={"glow": [0, 1]})


class Darkness(RewardModel):
    """A gold reward that disagrees with Brightness: 1 − mean pixel value."""

    def score(self, inputs):
        return 1 - inputs.edits.float().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("alarm", ["warn", "stop"])
def test_a_gold_reward_falling_while_the_training_reward_rises_trips_the_alarm(alarm, tmp_path, caplog):
    from editr1.training.guards import RunStopped

    cb = RewardCallback(Brightness(), gold=Darkness(), gold_alarm=alarm, gold_patience=2)
    module, trainer = FakeModule(VALUES), FakeTrainer(tmp_path)

    def validate(value):
        cb.on_validation_epoch_start(trainer, module)
        cb.on_validation_batch_end(trainer, module, _outputs([value, value]), None, 0)
        cb.on_validation_epoch_end(trainer, module)

    validate(0.5)
    validate(0.6)  # the policy pleases the training reward more, the gold reward less: once
    assert module.logged["val/gold_reward"] == pytest.approx(0.4)
    assert module.logged["val/reward_gap"] == pytest.approx(0.6 - 0.4)
    with caplog.at_level("WARNING"):
        if alarm == "stop":
            with pytest.raises(
                RunStopped, match=r"val/reward rose 0.5000 → 0.7000 while the gold reward fell 0.5000 → 0.3000"
            ):
                validate(0.7)
            assert "stopped-gold" in trainer.saved[0]
        else:
            validate(0.7)
            assert "the policy may be hacking the training reward (reward.gold_alarm: warn)" in caplog.text
    assert cb.state_dict()["gold_history"] == [pytest.approx([v, 1 - v]) for v in (0.5, 0.6, 0.7)]


@pytest.mark.parametrize(
    "kw",
    [dict(gold_alarm="email"), dict(gold_patience=0), dict(gold_min_delta=-0.01), dict(gold_min_delta=float("nan"))],
)
def test_gold_alarm_settings_out_of_range_are_a_clear_error(kw):
    with pytest.raises(ValueError, match="gold_alarm 'warn' or 'stop', gold_patience >= 1 and gold_min_delta >= 0"):
        RewardCallback(Brightness(), gold=Darkness(), **kw)


def test_gold_min_delta_keeps_noise_from_raising_the_alarm(tmp_path, caplog):
    """The training reward creeping up by less than gold_min_delta at each validation is not a rise."""
    cb = RewardCallback(Brightness(), gold=Darkness(), gold_patience=2, gold_min_delta=0.05)
    module, trainer = FakeModule(VALUES), FakeTrainer(tmp_path)
    with caplog.at_level("WARNING"):
        for value in (0.5, 0.52, 0.54):  # up 0.02 a time, the gold (1 − value) down 0.02: within 0.05
            cb.on_validation_epoch_start(trainer, module)
            cb.on_validation_batch_end(trainer, module, _outputs([value, value]), None, 0)
            cb.on_validation_epoch_end(trainer, module)
    assert "hacking" not in caplog.text and len(cb.gold_history) == 3
