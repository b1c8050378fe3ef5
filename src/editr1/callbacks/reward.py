"""The reward stage of a training step: rollout → reward → gather → group filter / bans → r."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from editr1.algorithms.grouping import decide, global_std, pool_index
from editr1.algorithms.image_stats import check_limits, image_stats, out_of_bounds
from editr1.callbacks.progress import show_phase
from editr1.callbacks.reward_eval import EvalScoring, check_rewards
from editr1.callbacks.tensorboard import (
    add_image,
    add_text,
    forget_step_metrics,
    log_step,
    tensorboards,
    write_dashboard,
)
from editr1.data.datamodule import FIELDS
from editr1.rewards.base import RewardInputs, RewardModel
from editr1.settings import FilterSettings
from editr1.training import distributed
from editr1.training.experience import Experience
from editr1.training.guards import RunStopped
from editr1.training.rollout import Rollout
from editr1.training.state import emergency_checkpoint
from editr1.visualize import captioned_grid

log = logging.getLogger(__name__)


class RewardCallback(EvalScoring, Callback):
    """The reward stage of a training step, one way: asks the module for the group rollouts
    (:meth:`~editr1.module.EditR1Module.sample_groups`), scores them with the reward model, gathers every
    process's rewards, applies the low-variance group filter and bans, computes the optimality probability
    r and puts one :class:`~editr1.training.experience.Experience` in the batch (``batch["experience"]``)
    for ``training_step``. Also scores validation/test edits (``val/reward``). With a
    :class:`~editr1.rewards.combined.CombinedReward` that combines by ``advantage_sum`` it collects each
    component's scores (``submit_components``), gathers them like the rewards and computes r from the sum of
    their advantages (:func:`~editr1.algorithms.grouping.combine_advantages`); the rewards it logs, filters and
    bans on are their weighted mean.

    Args:
        model: the reward model (the verifiable scene reward, an MLLM judge, …).
        filter: the low-variance group filter.
        log_images_every_n_steps: write a source | edits grid to TensorBoard every n rollouts (0 = never).
        image_groups: groups shown in that grid.
        on_failure: what a step does when the reward model could not judge some edits (after the served
            client's own bounded retries, ``max_retries`` / ``retry_backoff``, which ride out short outages):
            ``drop`` their groups and count them (``filter/groups_dropped_nan``, ``reward_model/failed/*``),
            or ``stop`` the run with a checkpoint. ``zero`` is the released reference code's behaviour, for
            reproducing it only: a failed judgement scores 0.0 (under a combined reward's ``advantage_sum``, each
            component's failed score is 0.0 and the reward their weighted mean) and trains (counted as
            ``reward/failed_as_zero``,
            with a warning at the start of the run); it teaches the policy that whatever the judge failed
            on is the worst edit.
        max_failed_steps: with ``on_failure: drop``, steps in a row in which the reward model could not judge
            a single edit (a judge that is down) before the run stops with a checkpoint and a message; the first
            such step warns, naming the reward model and its errors (0: never stop).
        image_limits: bounds on the rollouts' image statistics (logged every step as ``images/<name>``: brightness,
            saturation, contrast, frac_near_black, frac_near_white, edit_distance; see
            :mod:`editr1.algorithms.image_stats`), e.g.
            ``{frac_near_black: [null, 0.5], edit_distance: [0.01, null]}``: a guard against reward hacking.
            Outside them for ``image_limit_steps`` steps in a row on any process, the run stops with a
            checkpoint and a message naming the statistic.
        image_limit_steps: how many steps in a row (≥ 1).
        gold: a held-out reward model, different from ``model``, scored at validation only (``val/gold_reward``
            and ``val/reward_gap`` = ``val/reward`` − gold): does the policy learn the task or please the judge?
        gold_alarm: when the gold reward fell at each of ``gold_patience`` validations in a row while ``val/reward``
            rose: ``warn``, or ``stop`` the run with a checkpoint.
        gold_patience: validations in a row (≥ 1).
        gold_min_delta: how much each rise and each fall must exceed to count (in reward units, ≥ 0), so that
            validation noise does not raise the alarm; 0: any strict change.
    """

    def __init__(
        self,
        model: RewardModel,
        filter: FilterSettings = FilterSettings(),
        log_images_every_n_steps: int = 25,
        image_groups: int = 4,
        on_failure: Literal["drop", "stop", "zero"] = "drop",
        max_failed_steps: int = 5,
        image_limits: dict[str, list[float | None]] | None = None,
        image_limit_steps: int = 3,
        gold: RewardModel | None = None,
        gold_alarm: Literal["warn", "stop"] = "warn",
        gold_patience: int = 3,
        gold_min_delta: float = 0.0,
    ) -> None:
        if gold_alarm not in ("warn", "stop") or gold_patience < 1 or not gold_min_delta >= 0:
            raise ValueError(
                f"gold_alarm 'warn' or 'stop', gold_patience >= 1 and gold_min_delta >= 0, got {gold_alarm!r}, "
                f"{gold_patience}, {gold_min_delta}"
            )
        self.gold, self.gold_alarm, self.gold_patience = gold, gold_alarm, gold_patience
        self.gold_min_delta = gold_min_delta
        self.gold_history: list[tuple[float, float]] = []
        self.image_limits = check_limits(image_limits)
        if image_limit_steps < 1:
            raise ValueError(f"image_limit_steps must be >= 1, got {image_limit_steps}")
        self.image_limit_steps, self.limits_in_a_row = image_limit_steps, 0
        if on_failure not in ("drop", "stop", "zero"):
            raise ValueError(f"on_failure must be 'drop', 'stop' or 'zero', got {on_failure!r}")
        if max_failed_steps < 0:
            raise ValueError(f"max_failed_steps must be >= 0, got {max_failed_steps}")
        self.max_failed_steps = max_failed_steps
        self.failed_in_a_row = 0
        self._adv_clip = 5.0
        self.on_failure = on_failure
        if not isinstance(model, RewardModel):
            raise TypeError(f"reward model must be a RewardModel, got {type(model).__name__}")
        self.model = model
        self.filter = filter
        self.log_images_every_n_steps = log_images_every_n_steps
        self.image_groups = image_groups
        self.banned: set[str] = set()
        self.counts: Counter = Counter()
        self._eval: dict[str, Any] = {}

    # --------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "banned": sorted(self.banned),
            "counts": dict(self.counts),
            "filter": asdict(self.filter),
            "gold_history": [list(pair) for pair in self.gold_history],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = (state_dict.get("filter") or {}).get("group_by", "key")
        if state_dict.get("banned") and saved != self.filter.group_by:
            raise ValueError(
                f"the checkpoint's bans name groups by {saved!r}, this run groups by {self.filter.group_by!r} "
                "(reward.filter.group_by): resume with the same setting"
            )
        self.banned = set(state_dict.get("banned", []))
        self.counts = Counter(state_dict.get("counts", {}))
        self.gold_history = [tuple(pair) for pair in state_dict.get("gold_history", [])]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the setup hook runs before the strategy moves the module, so pl_module.device is still the CPU here
        for model in (self.model, self.gold):
            if model is not None:
                model.to(trainer.strategy.root_device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_dashboard(trainer)  # TensorBoard's "Custom Scalars" tab: reward and loss first
        if self.on_failure == "zero" and trainer.is_global_zero:
            log.warning(
                "reward.on_failure is 'zero' (the reference code's behaviour): edits the reward model could "
                "not judge score 0.0 and are trained on; counted as reward/failed_as_zero"
            )
        # rows the data source rejected when it was read (before any batch) count as skipped data too
        dm = getattr(trainer, "datamodule", None)
        rows = dm.skipped_rows("train") if hasattr(dm, "skipped_rows") else {}
        if rows and not any(k.startswith("data_skipped/") for k in self.counts):  # not again after a resume
            for reason, n in rows.items():
                self.counts[f"data_skipped/{reason}"] += n
        # a single-image model never silently drops reference images: refuse before the first step (shard
        # streams, read as they go, are refused by the policy at the first batch that has one)
        multi = dm.multi_image_rows("train") if hasattr(dm, "multi_image_rows") else 0
        if multi and getattr(pl_module.policy, "max_condition_images", None) == 1:
            raise ValueError(
                f"{multi} training rows have reference images, but {type(pl_module.policy).__name__} takes one "
                "condition image per prompt: use a multi-image model (Qwen-Image-Edit-2509/2511, FLUX.2 [klein]) "
                "or data.references: skip to drop those rows (counted)"
            )

    # --------------------------------------------------------------------------- training
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        forget_step_metrics(trainer)  # a step that trains nothing must not repeat the last step's loss
        self._count_skipped_rows(pl_module, batch)
        if pl_module.objective.needs != "rollouts":
            return  # e.g. the supervised objective: no rollouts, no reward
        self._drop_banned(batch)
        world, device = trainer.world_size, pl_module.device
        group_size = pl_module.rollout_settings.group_size
        empty = not batch["prompt"]  # every prompt of this process's batch was banned or unreadable
        if world > 1 and pl_module.sharded and distributed.any_process(empty, world=world, device=device):
            raise RuntimeError(  # raised on every rank at once: a sharded model cannot step with a rank missing
                "a rank has no prompt left in this batch (all banned or unreadable): sharded training needs every rank "
                "to roll out; use more prompts per rank (data.batch_size), reward.filter.ban: false, or shard: false"
            )
        if empty and world == 1:
            batch["experience"] = Experience.nothing(group_size)
            return
        t0 = time.perf_counter()
        futures: list[Future] = []
        total, made = len(batch["prompt"]) * group_size, [0]
        show_phase(trainer, f"rollout 0/{total} edits")

        names = self._component_names()  # advantage_sum: the combined reward's components reach the advantages
        scorer = self.model.submit_components if names else self.model.submit

        def submit(chunk: RewardInputs) -> None:  # scored while the next chunk is generated
            futures.append(scorer(chunk))
            made[0] += chunk.edits.shape[0]
            show_phase(trainer, f"rollout {made[0]}/{total} edits")

        # a process without prompts still takes part in the step's collectives (the gather below, the ban, training)
        ro = pl_module.sample_groups(batch, on_chunk=submit)
        t1 = time.perf_counter()
        rewards, parts = self._collect(trainer, futures, ro) if ro is not None else (torch.empty(0, group_size), None)
        if names and parts is None:
            parts = {n: torch.empty(0, group_size) for n in names}
        t2 = time.perf_counter()  # time/reward_s: scoring time not hidden behind the rollout
        if self.on_failure == "zero":  # the reference code's 0.0 for a failed judgement, counted
            failed_here = ~torch.isfinite(rewards)
            self.counts["rewards_failed_as_zero"] += int(failed_here.sum())
            if parts is not None:  # each component's failures score 0.0; the total is their weighted mean
                parts = {n: torch.nan_to_num(c, nan=0.0) for n, c in parts.items()}
                rewards = self.model.total({n: c.flatten() for n, c in parts.items()}).view_as(rewards)
            else:
                rewards = torch.where(failed_here, torch.zeros_like(rewards), rewards)
        everything, offset = distributed.gather_rows(rewards, world=world, rank=trainer.global_rank, device=device)
        every_part = None
        if parts is not None:
            rank = trainer.global_rank
            every_part = {
                n: distributed.gather_rows(c, world=world, rank=rank, device=device)[0] for n, c in parts.items()
            }
        if everything.shape[0] == 0:  # no process had a prompt
            batch["experience"] = Experience.nothing(group_size)
            return
        failed = int((~torch.isfinite(everything)).sum())
        if failed and self.on_failure == "stop":
            path = emergency_checkpoint(trainer, "reward")
            raise RunStopped(
                f"the reward model could not judge {failed} of {everything.numel()} edits of this step "
                f"({dict(self.model.stats())}); reward.on_failure is 'stop'; checkpoint saved to {path}"
            )
        self._count_failed_step(trainer, failed == everything.numel())
        std_mode, adv_clip = pl_module.objective.group_settings()
        self._adv_clip = adv_clip
        f = self.filter
        pool = None
        if f.group_by == "instruction":  # rows of the step that share an instruction share their statistics
            prompts = distributed.gather_lists([] if ro is None else ro.prompts, world=world)
            pool = pool_index(prompts).to(everything.device)
        decision_all = decide(
            everything,
            std_mode=std_mode,
            adv_clip=adv_clip,
            rule=f.rule,
            mean_threshold=f.mean_threshold,
            std_threshold=f.std_threshold,
            nan_policy=f.nan_policy,
            step_std=global_std(everything),
            ban_rule=f.ban_rule,
            pool=pool,
            components=every_part,
            weights=self.model.weights if every_part is not None else None,
        )
        local = slice(offset, offset + rewards.shape[0])
        decision = type(decision_all)(**{k: v[local] for k, v in vars(decision_all).items()})
        if f.ban:
            marked = [] if ro is None else decision.ban.nonzero().flatten().tolist()
            self._ban(world, [self._ban_id(ro.keys[g], ro.prompts[g]) for g in marked])
        self._log_step(pl_module, everything, decision_all, t1 - t0, t2 - t1)
        self._guard_images(trainer, pl_module, ro)
        if ro is None:  # this process idles through the step (training_step joins its collectives)
            batch["experience"] = Experience(None, rewards, decision)
            return
        components = None if parts is None else {n: c.to(device) for n, c in parts.items()}
        batch["experience"] = Experience(ro, rewards.to(device), decision, started=t0, components=components)
        kept = decision.num_groups - int((decision.dropped_low_variance | decision.dropped_nan).sum())
        show_phase(trainer, f"training on {kept} of {decision.num_groups} groups")
        if self.log_images_every_n_steps and (ro.index % self.log_images_every_n_steps == 0):
            self._log_rollout_images(trainer, ro, rewards, decision, log_step(trainer))

    def _count_failed_step(self, trainer, nothing_judged: bool) -> None:
        """A judge that is down must not make a run spin: warn at the first step it judged nothing, stop after
        ``max_failed_steps`` such steps in a row."""
        if not nothing_judged:
            self.failed_in_a_row = 0
            return
        self.failed_in_a_row += 1
        errors = {k: v for k, v in self.model.stats().items() if k.startswith(("failed/", "errors/"))}
        where = getattr(self.model, "base_url", None)
        what = f"{type(self.model).__name__}" + (f" at {where}" if where else "") + f" (errors so far: {errors})"
        if self.failed_in_a_row == 1 and trainer.is_global_zero:
            log.warning("the reward model could not judge any edit of this step, which trains nothing: %s", what)
        if self.max_failed_steps and self.failed_in_a_row >= self.max_failed_steps:
            path = emergency_checkpoint(trainer, "reward")
            raise RunStopped(
                f"the reward model judged nothing for {self.failed_in_a_row} steps in a row "
                f"(reward.max_failed_steps = {self.max_failed_steps}): {what}. Is it running? "
                f"Checkpoint saved to {path}"
            )

    def _guard_images(self, trainer, pl_module, ro: Rollout | None) -> None:
        """Log the rollout's image statistics; stop once they left ``image_limits`` for too many steps in a row."""
        broken: list[str] = []
        if ro is not None:
            stats = image_stats(ro.edits, ro.sources.repeat_interleave(ro.group_size, 0).to(ro.edits))
            pl_module.log_dict({f"images/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)
            broken = out_of_bounds(stats, self.image_limits)
        if not self.image_limits:
            return
        anywhere = distributed.any_process(bool(broken), world=trainer.world_size, device=pl_module.device)
        self.limits_in_a_row = self.limits_in_a_row + 1 if anywhere else 0
        if broken and self.limits_in_a_row == 1:
            log.warning("rollout images outside reward.image_limits: %s", ", ".join(broken))
        if self.limits_in_a_row >= self.image_limit_steps:
            path = emergency_checkpoint(trainer, "image_limits")
            raise RunStopped(
                f"the rollouts' images were outside reward.image_limits for {self.limits_in_a_row} steps in a row "
                f"({', '.join(broken) or 'on another process'}): the policy may be hacking the reward. "
                f"Checkpoint saved to {path}"
            )

    def _component_names(self) -> list[str] | None:
        """The combined reward's component names when it combines by ``advantage_sum``, else ``None``."""
        if getattr(self.model, "combine", "weighted_mean") != "advantage_sum":
            return None
        return list(self.model.models)

    def _collect(self, trainer, futures: list[Future], ro: Rollout) -> tuple[torch.Tensor, dict | None]:
        """``(G, K)`` rewards of a rollout from its chunks' futures (NaN where the judge failed), and, when the
        futures hold each component's scores (``advantage_sum``), those as ``(G, K)`` per name (the rewards are
        then their weighted mean)."""
        results, done, total = [], 0, ro.edits.shape[0]
        for f in futures:
            show_phase(trainer, f"judging {done}/{total} edits")
            result = f.result()
            results.append(result)
            done += (next(iter(result.values())) if isinstance(result, dict) else result).numel()
        shape = (ro.num_groups, ro.group_size)
        parts = None
        if results and isinstance(results[0], dict):
            parts = {n: torch.cat([r[n].float().reshape(-1).cpu() for r in results]) for n in results[0]}
            for c in parts.values():
                check_rewards(c, total)
            rewards = self.model.total(parts)
            parts = {n: c.view(shape) for n, c in parts.items()}
        else:
            rewards = torch.cat([r.float().reshape(-1).cpu() for r in results])
        check_rewards(rewards, total)
        return rewards.view(shape), parts

    def _ban_id(self, key: str, prompt: str) -> str:
        """What a ban names: the row's key, or its instruction text under ``group_by: instruction``."""
        return key if self.filter.group_by == "key" else "instruction:" + prompt

    def _ban(self, world: int, keys: list[str]) -> None:
        """Ban the prompts the ban rule marked, on every process alike (a banned prompt may come up on any
        process later, and the checkpoint keeps rank 0's list)."""
        self.banned.update(distributed.gather_lists(keys, world=world))

    def _drop_banned(self, batch: dict) -> None:
        if not self.banned:
            return
        keep = [
            i for i, (k, p) in enumerate(zip(batch["key"], batch["prompt"])) if self._ban_id(k, p) not in self.banned
        ]
        self.counts["banned_prompts_skipped"] += len(batch["key"]) - len(keep)
        for f in (*FIELDS, "references"):  # every per-row field of a batch, so the rows stay aligned
            if batch.get(f) is not None:
                batch[f] = [batch[f][i] for i in keep]

    def _count_skipped_rows(self, pl_module: L.LightningModule, batch: dict) -> None:
        skipped = batch.get("skipped") or {}
        for reason, n in skipped.items():
            self.counts[f"data_skipped/{reason}"] += n
        total = sum(v for k, v in self.counts.items() if k.startswith("data_skipped/"))
        pl_module.log("data/skipped", float(total), on_step=True, on_epoch=False)

    def _log_step(self, pl_module, rewards, decision, rollout_s: float, reward_s: float) -> None:
        finite = rewards[torch.isfinite(rewards)]
        nan_count = int((~torch.isfinite(rewards)).sum())
        self.counts["groups"] += decision.num_groups
        self.counts["groups_dropped_low_variance"] += int(decision.dropped_low_variance.sum())
        self.counts["groups_dropped_nan"] += int(decision.dropped_nan.sum())
        self.counts["rewards_nan"] += nan_count
        std = decision.std[torch.isfinite(decision.std)]
        r = decision.r[torch.isfinite(decision.r)]
        nan = float("nan")
        metrics = {
            "reward/std": float(finite.std(unbiased=False)) if finite.numel() else nan,
            "reward_std": float(std.mean()) if std.numel() else nan,  # mean within-group std: what the filter sees
            "reward/min": float(finite.min()) if finite.numel() else nan,
            "reward/max": float(finite.max()) if finite.numel() else nan,
            "reward/nan": float(nan_count),
            # r = clip(A, ±c)/(2c) + 0.5: |r − 0.5| is |A|/(2c), r at 0 or 1 means A was clipped at ±c
            "advantage/abs_mean": float((r - 0.5).abs().mean() * 2 * self._adv_clip) if r.numel() else nan,
            "advantage/frac_clipped": float(((r <= 0) | (r >= 1)).float().mean()) if r.numel() else nan,
            "frac_reward_zero_std": float((std < 1e-6).float().mean()) if std.numel() else 0.0,
            "filter/frac_groups_dropped": decision.frac_groups_dropped,
            "filter/groups_dropped_low_variance": float(decision.dropped_low_variance.sum()),
            "filter/groups_dropped_nan": float(decision.dropped_nan.sum()),
            "filter/banned_prompts": float(len(self.banned)),
            "filter/groups_banned": float(decision.ban.sum()) if self.filter.ban else 0.0,
            "time/rollout_s": rollout_s,
            "time/reward_s": reward_s,
        }
        if self.on_failure == "zero":
            metrics["reward/failed_as_zero"] = float(self.counts["rewards_failed_as_zero"])
        metrics.update({f"reward_model/{k}": v for k, v in self.model.stats().items()})
        # a combined reward's components as trl names them (rewards/<name>/mean|std); the rest under reward_model/
        metrics.update(
            {k if k.startswith("rewards/") else f"reward_model/{k}": v for k, v in self.model.step_stats().items()}
        )
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=decision.num_groups)
        mean = float(finite.mean()) if finite.numel() else float("nan")
        pl_module.log("reward/mean", mean, on_step=True, on_epoch=False, prog_bar=True, batch_size=decision.num_groups)

    def _log_rollout_images(self, trainer, ro: Rollout, rewards, decision, step: int) -> None:
        if trainer.is_global_zero:
            for tb in tensorboards(trainer):
                tb.add_histogram("reward/histogram", rewards[torch.isfinite(rewards)].float(), step)
        g = min(self.image_groups, ro.num_groups)
        rows, caps = [], []
        for i in range(g):
            dropped = bool(decision.dropped_low_variance[i] or decision.dropped_nan[i])
            row = [ro.sources[i].cpu()] + [ro.edits[i * ro.group_size + k].cpu() for k in range(ro.group_size)]
            cap = ["dropped" if dropped else "source"] + [f"{float(r):.3f}" for r in rewards[i]]
            rows.append(row)
            caps.append(cap)
        titles = [ro.prompts[i] for i in range(g)]
        add_image(trainer, "rollouts/source_edits", captioned_grid(rows, caps, titles=titles), step)
        add_text(trainer, "rollouts/instructions", "\n\n".join(f"{i}. {ro.prompts[i]}" for i in range(g)), step)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.model.close()
        if self.gold is not None:
            self.gold.close()

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.counts:
            summary = dict(sorted(self.counts.items()))
            log.info("editr1 run summary: %s", json.dumps(summary))
            print("editr1 run summary: " + ", ".join(f"{k} {v:g}" for k, v in summary.items()), flush=True)
