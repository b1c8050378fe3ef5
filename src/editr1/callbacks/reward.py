"""The reward stage of a training step: rollout → reward → gather → group filter / bans → r."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import MeanMetric, SumMetric

from editr1.algorithms.grouping import FilterRule, NanPolicy, decide, global_std, pool_index
from editr1.callbacks.tensorboard import add_image, add_text
from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rollout import Rollout, StepData
from editr1.visualize import captioned_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterSettings:
    """Low-variance group filter (DESIGN.md section 2)."""

    rule: FilterRule = "paper"  # "paper": drop mean > τμ and std < τσ; "strict": keep only std > τσ and mean < τμ; "none"
    mean_threshold: float = 0.9  # τμ
    std_threshold: float = 0.05  # τσ
    ban: bool = False  # never roll out a prompt again once the ban rule marks it
    ban_rule: FilterRule | None = None  # which groups are banned (with ban: true); null = the same as `rule`
    nan_policy: NanPolicy = "group"  # a reward that failed drops its whole "group" or only the "sample"
    # what a group is: "key" = one (source image, instruction) row; "instruction" = every row of the step with
    # the same instruction text shares one mean/std, and bans ban the instruction (the reference code's keying)
    group_by: Literal["key", "instruction"] = "key"

    def __post_init__(self) -> None:
        rules = ("paper", "strict", "none")
        if self.rule not in rules or (self.ban_rule is not None and self.ban_rule not in rules):
            raise ValueError(f"reward.filter.rule and ban_rule must be one of {rules}, got {self.rule!r}, {self.ban_rule!r}")
        if self.group_by not in ("key", "instruction"):
            raise ValueError(f"reward.filter.group_by must be 'key' or 'instruction', got {self.group_by!r}")


def check_rewards(rewards: torch.Tensor, n: int) -> None:
    if rewards.shape != (n,):
        raise ValueError(f"reward model returned shape {tuple(rewards.shape)} for {n} edits")
    bad = torch.isfinite(rewards) & ((rewards < 0) | (rewards > 1))
    if bad.any():
        raise ValueError(f"reward model returned values outside [0, 1]: {rewards[bad][:4].tolist()}")


def gather_groups(module: L.LightningModule, rewards: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``(G_r, K)`` rewards stacked rank by rank, and this rank's first row in them.

    Ranks may hold different numbers of groups (banned prompts); short ones are padded and trimmed.
    """
    world = module.trainer.world_size if module._trainer is not None else 1
    if world == 1:
        return rewards, 0
    device = module.device
    counts = module.all_gather(torch.tensor([rewards.shape[0]], device=device)).flatten().tolist()
    width = max(max(counts), 1)  # a rank may have no groups (its prompts were all banned or unreadable)
    padded = torch.full((width, rewards.shape[1]), float("nan"), device=device, dtype=rewards.dtype)
    padded[: rewards.shape[0]] = rewards.to(device)
    everything = module.all_gather(padded)  # (world, width, K)
    rows = torch.cat([everything[w, : counts[w]] for w in range(world)])
    return rows, sum(counts[: module.global_rank])


class RewardCallback(Callback):
    """Asks the module for the group rollouts, scores them with the reward model, applies the
    low-variance group filter, computes the optimality probability r and hands the result to
    ``training_step`` (as ``batch["rl"]``). Also scores validation/test edits (``val/reward``).

    Args:
        model: the reward model (the verifiable scene reward, an MLLM judge, …).
        filter: the low-variance group filter.
        log_images_every_n_steps: write a source | edits grid to TensorBoard every n rollouts (0 = never).
        image_groups: groups shown in that grid.
        on_failure: what a step does when the reward model could not judge some edits (after the served
            client's own bounded retries, ``max_retries`` / ``retry_backoff``, which ride out short outages):
            ``drop`` their groups and count them (``filter/groups_dropped_nan``, ``reward_model/failed/*``),
            or ``stop`` the run with a checkpoint. ``zero`` is the released reference code's behaviour, for
            reproducing it only: a failed judgement scores 0.0 and trains (counted as ``reward/failed_as_zero``,
            with a warning at the start of the run); it teaches the policy that whatever the judge failed
            on is the worst edit.
    """

    def __init__(
        self,
        model: RewardModel,
        filter: FilterSettings = FilterSettings(),
        log_images_every_n_steps: int = 25,
        image_groups: int = 4,
        on_failure: Literal["drop", "stop", "zero"] = "drop",
    ) -> None:
        if on_failure not in ("drop", "stop", "zero"):
            raise ValueError(f"on_failure must be 'drop', 'stop' or 'zero', got {on_failure!r}")
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
        return {"banned": sorted(self.banned), "counts": dict(self.counts), "filter": asdict(self.filter)}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = (state_dict.get("filter") or {}).get("group_by", "key")
        if state_dict.get("banned") and saved != self.filter.group_by:
            raise ValueError(f"the checkpoint's bans name groups by {saved!r}, this run groups by {self.filter.group_by!r} "
                             "(reward.filter.group_by): resume with the same setting")
        self.banned = set(state_dict.get("banned", []))
        self.counts = Counter(state_dict.get("counts", {}))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the setup hook runs before the strategy moves the module, so pl_module.device is still the CPU here
        self.model.to(trainer.strategy.root_device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_failure == "zero" and trainer.is_global_zero:
            log.warning("reward.on_failure is 'zero' (the reference code's behaviour): edits the reward model could "
                        "not judge score 0.0 and are trained on; counted as reward/failed_as_zero")
        # rows the data source rejected when it was read (before any batch) count as skipped data too
        datasets = getattr(getattr(trainer, "datamodule", None), "_datasets", {}) or {}
        rows = getattr(datasets.get("train"), "skipped_rows", None)
        if rows and not any(k.startswith("data_skipped/") for k in self.counts):  # not again after a resume
            for reason, n in rows.items():
                self.counts[f"data_skipped/{reason}"] += n

    # --------------------------------------------------------------------------- training
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        self._count_skipped_rows(pl_module, batch)
        if not getattr(pl_module, "wants_rollouts", True):
            return  # supervised objective: no rollouts, no reward
        self._drop_banned(batch)
        empty = not batch["prompt"]  # every prompt of this rank's batch was banned or unreadable
        if trainer.world_size > 1 and getattr(pl_module, "_sharded", False) and pl_module._reduce(float(empty), "max") > 0:
            raise RuntimeError(  # raised on every rank at once: a sharded model cannot step with a rank missing
                "a rank has no prompt left in this batch (all banned or unreadable): sharded training needs every rank "
                "to roll out; use more prompts per rank (data.batch_size), reward.filter.ban: false, or shard: false"
            )
        if empty and trainer.world_size == 1:
            batch["rl"] = None
            return
        t0 = time.perf_counter()
        ro: Rollout | None = None
        if empty:  # still take part in the step's collectives (the gather below, the ban, training)
            rewards = torch.empty(0, pl_module.rollout_cfg.group_size)
            pl_module.rollouts_done += 1  # the random streams' index stays the same on every rank
        else:
            futures: list[Future] = []
            ro = pl_module.rollout(batch, on_chunk=lambda chunk: futures.append(self.model.submit(chunk)))
        t1 = time.perf_counter()
        if ro is not None:
            rewards = self._collect(futures, ro)
        t2 = time.perf_counter()  # time/reward_s: scoring time not hidden behind the rollout
        if self.on_failure == "zero":  # the reference code's 0.0 for a failed judgement, counted
            failed_here = ~torch.isfinite(rewards)
            self.counts["rewards_failed_as_zero"] += int(failed_here.sum())
            rewards = torch.where(failed_here, torch.zeros_like(rewards), rewards)
        everything, offset = gather_groups(pl_module, rewards)
        if everything.shape[0] == 0:  # no rank had a prompt
            batch["rl"] = None
            return
        failed = int((~torch.isfinite(everything)).sum())
        if failed and self.on_failure == "stop":
            path = pl_module._emergency_checkpoint("reward") if hasattr(pl_module, "_emergency_checkpoint") else None
            raise RuntimeError(
                f"the reward model could not judge {failed} of {everything.numel()} edits of this step "
                f"({dict(self.model.stats())}); reward.on_failure is 'stop'" + (f"; checkpoint saved to {path}" if path else "")
            )
        nft = pl_module.nft
        f = self.filter
        pool = None
        if f.group_by == "instruction":  # rows of the step that share an instruction share their statistics
            pool = pool_index(self._gather_list(trainer, [] if ro is None else ro.prompts)).to(everything.device)
        decision_all = decide(
            everything, std_mode=nft.std_mode, adv_clip=nft.adv_clip, rule=f.rule, mean_threshold=f.mean_threshold,
            std_threshold=f.std_threshold, nan_policy=f.nan_policy, step_std=global_std(everything),
            ban_rule=f.ban_rule, pool=pool,
        )
        local = slice(offset, offset + rewards.shape[0])
        decision = type(decision_all)(**{k: v[local] for k, v in vars(decision_all).items()})
        if f.ban:
            self._ban(trainer, [] if ro is None else
                      [self._ban_id(ro.keys[g], ro.prompts[g]) for g in decision.ban.nonzero().flatten().tolist()])
        self._log_step(pl_module, everything, decision_all, t1 - t0, t2 - t1)
        if ro is None:
            batch["rl"] = None  # this rank idles through the step (training_step joins its collectives)
            return
        batch["rl"] = StepData(ro, rewards.to(pl_module.device), decision)
        if self.log_images_every_n_steps and (ro.index % self.log_images_every_n_steps == 0):
            self._log_rollout_images(trainer, ro, rewards, decision, pl_module.global_step)

    def _collect(self, futures: list[Future], ro: Rollout) -> torch.Tensor:
        """``(G, K)`` rewards of a rollout from its chunks' futures (NaN where the judge failed)."""
        rewards = torch.cat([f.result().float().reshape(-1).cpu() for f in futures])
        check_rewards(rewards, ro.edits.shape[0])
        return rewards.view(ro.num_groups, ro.group_size)

    @staticmethod
    def _gather_list(trainer, items: list) -> list:
        """Every rank's ``items``, concatenated rank by rank (the order of :func:`gather_groups`)."""
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, list(items))
            return [x for part in gathered for x in part]
        return list(items)

    def _ban_id(self, key: str, prompt: str) -> str:
        """What a ban names: the row's key, or its instruction text under ``group_by: instruction``."""
        return key if self.filter.group_by == "key" else "instruction:" + prompt

    def _ban(self, trainer, keys: list[str]) -> None:
        """Ban the prompts the ban rule marked, on every rank alike (a banned prompt may come up on any rank
        later, and the checkpoint keeps rank 0's list)."""
        self.banned.update(self._gather_list(trainer, keys))

    def _drop_banned(self, batch: dict) -> None:
        if not self.banned:
            return
        keep = [i for i, (k, p) in enumerate(zip(batch["key"], batch["prompt"])) if self._ban_id(k, p) not in self.banned]
        self.counts["banned_prompts_skipped"] += len(batch["key"]) - len(keep)
        for f in ("image", "prompt", "requirement", "task", "key"):
            batch[f] = [batch[f][i] for i in keep]
        if batch.get("target") is not None:
            batch["target"] = [batch["target"][i] for i in keep]

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
        metrics = {
            "reward/std": float(finite.std(unbiased=False)) if finite.numel() else float("nan"),
            "reward/nan": float(nan_count),
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
        metrics.update({f"reward_model/{k}": v for k, v in self.model.step_stats().items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=decision.num_groups)
        mean = float(finite.mean()) if finite.numel() else float("nan")
        pl_module.log("reward/mean", mean, on_step=True, on_epoch=False, prog_bar=True, batch_size=decision.num_groups)

    def _log_rollout_images(self, trainer, ro: Rollout, rewards, decision, step: int) -> None:
        g = min(self.image_groups, ro.num_groups)
        rows, caps = [], []
        for i in range(g):
            dropped = bool(decision.dropped_low_variance[i] or decision.dropped_nan[i])
            row = [ro.sources[i].cpu()] + [ro.edits[i * ro.group_size + k].cpu() for k in range(ro.group_size)]
            cap = ["dropped" if dropped else "source"] + [f"{float(r):.3f}" for r in rewards[i]]
            rows.append(row)
            caps.append(cap)
        add_image(trainer, "rollouts/source_edits", captioned_grid(rows, caps), step)
        add_text(trainer, "rollouts/instructions", "\n\n".join(f"{i}. {ro.prompts[i]}" for i in range(g)), step)

    # --------------------------------------------------------------------------- validation / test
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset_eval(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset_eval(pl_module)

    def _reset_eval(self, pl_module) -> None:
        self.model.step_stats()  # judgements before this evaluation are not its own
        self._eval = {
            "reward": MeanMetric(nan_strategy="ignore").to(pl_module.device),
            "failed": SumMetric().to(pl_module.device),
            "logged_images": False,
        }

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._score_eval(trainer, pl_module, outputs, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._score_eval(trainer, pl_module, outputs, "test")

    def _score_eval(self, trainer, pl_module, outputs: dict, prefix: str) -> None:
        if not self._eval:
            self._reset_eval(pl_module)
        if outputs["edits"] is None:
            return  # nothing readable in this batch
        if outputs["targets"] is None and getattr(self.model, "needs_targets", False):
            if not self._eval.get("warned"):
                log.info("%s/reward not computed: %s needs data with targets", prefix, type(self.model).__name__)
                self._eval["warned"] = True
            return
        keep = [i for i, m in enumerate(outputs.get("meta") or [{}] * len(outputs["keys"])) if not m.get("padding")]
        if not keep:
            return
        sel = torch.tensor(keep)
        inputs = RewardInputs(
            sources=outputs["sources"][sel], edits=outputs["edits"][sel],
            instructions=[outputs["prompts"][i] for i in keep], requirements=[outputs["requirements"][i] for i in keep],
            targets=None if outputs["targets"] is None else outputs["targets"][sel],
        )
        rewards = self.model.score(inputs).float().reshape(-1)
        check_rewards(rewards, inputs.edits.shape[0])
        rewards = rewards.to(pl_module.device)
        outputs["rewards"] = rewards
        self._eval["reward"].update(rewards)
        self._eval["failed"].update((~torch.isfinite(rewards)).sum().float())
        if not self._eval["logged_images"] and not trainer.sanity_checking:
            n = min(8, rewards.numel())
            rows = [[outputs["sources"][i].cpu(), outputs["edits"][i].cpu()] for i in range(n)]
            caps = [["source", f"{float(rewards[i]):.3f}"] for i in range(n)]
            add_image(trainer, f"{prefix}/source_edit", captioned_grid(rows, caps), pl_module.global_step)
            self._eval["logged_images"] = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log_eval(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log_eval(pl_module, "test")

    def _log_eval(self, pl_module, prefix: str) -> None:
        if not self._eval or self._eval.get("warned"):
            return  # nothing scored (the reward needs targets this data does not have)
        pl_module.log(f"{prefix}/reward", self._eval["reward"].compute(), prog_bar=prefix == "val")
        pl_module.log(f"{prefix}/failed", self._eval["failed"].compute())
        for k, v in self.model.step_stats().items():  # this evaluation's judgements (e.g. digit mass)
            pl_module.log(f"{prefix}/reward_model/{k}", v)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.model.close()

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.counts:
            summary = {k: v for k, v in sorted(self.counts.items())}
            log.info("editr1 run summary: %s", json.dumps(summary))
