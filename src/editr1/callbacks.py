"""Lightning callbacks: the reward step (rollout → reward → group filter → r) and image writing."""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from concurrent.futures import Future
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import MeanMetric, SumMetric
from torchvision.transforms.functional import to_pil_image

from editr1.algorithms.grouping import FilterRule, NanPolicy, decide, global_std, pool_index
from editr1.data.scenes import SceneConfig
from editr1.evaluation.judges import TextJudge
from editr1.evaluation.scenes import evaluate_scenes
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
        _add_image(trainer, "rollouts/source_edits", captioned_grid(rows, caps), step)
        _add_text(trainer, "rollouts/instructions", "\n\n".join(f"{i}. {ro.prompts[i]}" for i in range(g)), step)

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
            _add_image(trainer, f"{prefix}/source_edit", captioned_grid(rows, caps), pl_module.global_step)
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


def _tensorboards(trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _add_image(trainer, tag: str, image: torch.Tensor, step: int) -> None:
    if trainer.is_global_zero:
        for tb in _tensorboards(trainer):
            tb.add_image(tag, image, step)


def _add_text(trainer, tag: str, text: str, step: int) -> None:
    if trainer.is_global_zero:
        for tb in _tensorboards(trainer):
            tb.add_text(tag, text, step)


class ImageWriter(BasePredictionWriter):
    """``editr1 predict`` writes each edit as ``<output_dir>/<key>.png`` and a line of
    ``predictions.jsonl`` (key, instruction, file, reward when a reward model scored it)."""

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, key in enumerate(prediction["keys"]):
            if prediction["meta"][i].get("padding"):
                continue
            name = _safe_name(key) + ".png"
            to_pil_image(prediction["edits"][i].float().cpu()).save(self.output_dir / name)
            lines.append({"key": key, "prompt": prediction["prompts"][i], "file": name})
        with (self.output_dir / f"predictions.rank{trainer.global_rank}.jsonl").open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


def _safe_name(key: str) -> str:
    """A file name for a key: its readable part plus a hash of the whole key, so two keys never
    overwrite each other's files."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:120] or "edit"
    return f"{name}-{zlib.crc32(key.encode('utf-8')):08x}"


class SceneEvaluation(Callback):
    """Before and after training, edit held-out synthetic scenes and score them against their known
    targets (fixed seeds, a deterministic solver): the evidence that training helped.

    Prints a table at the end of ``fit``, logs ``eval/<split>/{identity,ceiling,before,after}`` and
    per-task means to TensorBoard with image grids (source | K edits, reward under each), and writes
    ``scene_eval.json`` to the run folder. ``before`` is measured when this ``fit`` call starts.

    Args:
        scenes: the scene generator; ``None`` takes the datamodule's (so held-out pairs match training).
        splits: ``heldout`` (the training grammar, other random stream) and/or ``unseen`` (shape/colour
            pairs never trained on; needs ``holdout`` pairs in the scene config).
        count: prompts per split (seeds ``[0, count)`` of the split).
        group_size: edits per prompt.
        steps: solver steps.
        solver: ``euler`` or ``dpmpp_2m``.
        seed: base of the sampling seeds (fixed across runs).
        adapter: which policy edits at the end (``default`` = θ, ``ema``).
        image_rows: prompts shown in each grid.
    """

    def __init__(
        self,
        scenes: SceneConfig | None = None,
        splits: list[str] = ["heldout", "unseen"],  # noqa: B006 - jsonargparse shows list defaults
        count: int = 64,
        group_size: int = 4,
        steps: int = 8,
        solver: str = "euler",
        seed: int = 0,
        adapter: str = "default",
        image_rows: int = 8,
    ) -> None:
        unknown = set(splits) - {"heldout", "unseen"}
        if unknown:
            raise ValueError(f"SceneEvaluation splits must be 'heldout' and/or 'unseen', got {sorted(unknown)}")
        self.scenes = scenes
        self.splits = list(splits)
        self.count = count
        self.group_size = group_size
        self.steps = steps
        self.solver = solver
        self.seed = seed
        self.adapter = adapter
        self.image_rows = image_rows
        self.results: dict[str, dict[str, dict[str, float]]] = {}

    def _scenes(self, trainer) -> SceneConfig:
        if self.scenes is not None:
            return self.scenes
        scenes = getattr(trainer.datamodule, "scenes", None)
        if scenes is None:
            raise ValueError("SceneEvaluation needs `scenes` (the datamodule has none)")
        return scenes

    def _run(self, trainer, pl_module, when: str) -> None:
        scenes = self._scenes(trainer)
        adapter = {"default": "default", "ema": "ema", "old": "old", "reference": None}[self.adapter]
        out = {}
        for split in self.splits:
            if split == "unseen" and not scenes.holdout:
                log.info("SceneEvaluation: no held-out shape/colour pairs, skipping the unseen split")
                continue
            with pl_module.policy.adapter(adapter):
                res = evaluate_scenes(pl_module.policy, scenes, split, self.count, self.group_size, self.steps,
                                      self.solver, self.seed)
            out[split] = res.summary()
            step = trainer.global_step
            for tb in _tensorboards(trainer) if trainer.is_global_zero else []:
                tb.add_scalar(f"eval/{split}/{when}", res.mean, step)
                tb.add_scalar(f"eval/{split}/identity", out[split]["identity"], step)
                tb.add_scalar(f"eval/{split}/ceiling", out[split]["ceiling"], step)
                for k, v in out[split].items():
                    if k.startswith("task/"):
                        tb.add_scalar(f"eval/{split}/{when}/{k}", v, step)
            rows, caps = [], []
            k = self.group_size
            for i in range(min(self.image_rows, self.count)):
                rows.append([res.sources[i]] + [res.edits[i * k + j] for j in range(k)])
                caps.append(["source"] + [f"{float(res.rewards[i, j]):.3f}" for j in range(k)])
            _add_image(trainer, f"eval/{split}/{when}", captioned_grid(rows, caps), trainer.global_step)
        self.results[when] = out

    def on_train_start(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "before")

    def on_train_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "after")
        if not trainer.is_global_zero:
            return
        print(self.table(), flush=True)
        if trainer.log_dir:
            path = Path(trainer.log_dir) / "scene_eval.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"steps": trainer.global_step, **self.results}, indent=2) + "\n")

    def table(self) -> str:
        lines = [
            f"Held-out scenes: {self.count} prompts x {self.group_size} edits, {self.solver} {self.steps} steps, fixed seeds",
            f"{'split':<8} {'identity':>8} {'ceiling':>8} {'before':>8} {'after':>8} {'change':>8}",
        ]
        for split in self.splits:
            b = self.results.get("before", {}).get(split)
            a = self.results.get("after", {}).get(split)
            if b is None or a is None:
                continue
            lines.append(f"{split:<8} {a['identity']:8.3f} {a['ceiling']:8.3f} {b['mean']:8.3f} {a['mean']:8.3f} "
                         f"{a['mean'] - b['mean']:+8.3f}")
        return "\n".join(lines)


class ExportLora(Callback):
    """At the end of ``fit``, write the trained adapter as a diffusers LoRA
    (``<run folder>/lora/pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights``).

    Args:
        adapter: ``auto`` (the EMA adapter when the run keeps one, else ``default``), ``default`` or ``ema``.
        dirname: folder inside the run folder.
    """

    def __init__(self, adapter: Literal["auto", "default", "ema"] = "auto", dirname: str = "lora") -> None:
        self.adapter = adapter
        self.dirname = dirname
        self.path: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from pathlib import Path

        from editr1.export import export_module

        adapter = self.adapter
        if adapter == "auto":
            adapter = "ema" if getattr(pl_module, "use_ema", False) else "default"
        root = Path(trainer.log_dir or trainer.default_root_dir)
        path = export_module(pl_module, root / self.dirname, adapter)
        if path is not None:
            self.path = str(path)
            log.info("exported the %s adapter as a diffusers LoRA: %s", adapter, path)


def _file_name(key: str) -> str:
    """A benchmark key as a file name: unchanged when it is already safe (ImgEdit ids, GEdit keys)."""
    return key if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}", key) else _safe_name(key)


def _thumb(img, size: int = 128) -> torch.Tensor:
    from PIL import Image as PILImage
    from torchvision.transforms.functional import pil_to_tensor

    if isinstance(img, torch.Tensor):
        img = to_pil_image(img.float().clamp(0, 1).cpu())
    img = img.copy()
    img.thumbnail((size, size), PILImage.Resampling.BICUBIC)
    return pil_to_tensor(img.convert("RGB")).float() / 255


class BenchmarkEvaluation(Callback):
    """``editr1 test`` on ImgEdit Basic or GEdit-Bench: writes every edit in the benchmark's own layout,
    judges it with ``judge`` under the benchmark's protocol, and reports per-category and overall scores
    (``summary.json``, ``summary.md``, per-sample ``samples.jsonl``, TensorBoard scalars, a per-category
    table and the best and worst edits). Inert unless ``protocol`` is set (and only in ``test``).

    Args:
        protocol: ``none``, ``imgedit`` or ``gedit`` (match ``data.test_format``; ``jsonl`` data is
            judged with either protocol, its ``task`` field naming the category).
        judge: the judge (:class:`editr1.evaluation.judges.ServedJudge` or ``LocalJudge``); ``null``
            writes the edits in the benchmark layout without judging them (for the official scripts).
        output_dir: where edits and summaries go; ``null`` = ``<run folder>/<protocol>``.
        rubric_dir: ImgEdit rubric files (``<edit_type>.txt``); ``null`` = editr1's own.
        prompts_json: the official ImgEdit ``prompts.json`` instead of rubric files.
        sc_prompt_file: GEdit semantic-consistency prompt (``<instruction>`` placeholder); ``null`` = ours.
        pq_prompt_file: GEdit perceptual-quality prompt; ``null`` = ours.
        max_attempts: judge calls per judgement before it is reported as failed (unparsable answers and
            transport failures both count).
        show: best and worst edits shown in TensorBoard.
    """

    def __init__(
        self,
        protocol: Literal["none", "imgedit", "gedit"] = "none",
        judge: TextJudge | None = None,
        output_dir: str | None = None,
        rubric_dir: str | None = None,
        prompts_json: str | None = None,
        sc_prompt_file: str | None = None,
        pq_prompt_file: str | None = None,
        max_attempts: int = 3,
        show: int = 4,
    ) -> None:
        if protocol not in ("none", "imgedit", "gedit"):
            raise ValueError(f"benchmark.protocol must be none, imgedit or gedit, got {protocol!r}")
        if judge is not None and not isinstance(judge, TextJudge):
            raise TypeError(f"benchmark.judge must be a TextJudge (LocalJudge, ServedJudge), got {type(judge).__name__}")
        if max_attempts < 1:
            raise ValueError(f"benchmark.max_attempts must be >= 1, got {max_attempts}")
        self.protocol_name = protocol
        self.judge = judge
        self.output_dir = output_dir
        self.rubric_dir = rubric_dir
        self.prompts_json = prompts_json
        self.sc_prompt_file = sc_prompt_file
        self.pq_prompt_file = pq_prompt_file
        self.max_attempts = max_attempts
        self.show = show
        self.protocol = None
        self.active = False

    # ------------------------------------------------------------------------------ set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.active = stage == "test" and self.protocol_name != "none"
        if not self.active:
            return
        from editr1.evaluation.benchmark import GEditProtocol, ImgEditProtocol

        if self.protocol_name == "imgedit":
            self.protocol = ImgEditProtocol(self.rubric_dir, self.prompts_json, self.max_attempts)
        else:
            self.protocol = GEditProtocol(self.sc_prompt_file, self.pq_prompt_file, self.max_attempts)
        dm = getattr(trainer, "datamodule", None)
        ds = dm._dataset("test") if dm is not None and hasattr(dm, "_dataset") else None
        tasks = ds.tasks() if hasattr(ds, "tasks") else None
        if tasks is not None:  # every category must be known before any edit is made
            for t in sorted(set(tasks)):
                self.protocol.category(t)
        self.languages = list(getattr(dm, "test_languages", ["en"])) if self.protocol_name == "gedit" else ["en"]
        self.skipped_rows = dict(getattr(ds, "skipped_rows", {}) or {})

    def on_test_start(self, trainer, pl_module) -> None:
        if not self.active:
            return
        from editr1.evaluation.protocols import CategoryMean, GEditScore

        if self.judge is not None:
            self.judge.to(pl_module.device)  # a local judge joins the policy on its device
        root = self.output_dir or str(Path(trainer.log_dir or trainer.default_root_dir) / self.protocol_name)
        self.out = Path(root)
        self.out.mkdir(parents=True, exist_ok=True)
        cats = self.protocol.categories
        if self.protocol_name == "imgedit":
            self.metrics = {"all": CategoryMean(cats).to(pl_module.device)}
        else:
            self.metrics = {f"{lang}/{subset}": GEditScore(cats).to(pl_module.device)
                            for lang in self.languages for subset in ("fullset", "intersection")}
        self.samples_file = self.out / f"samples.rank{trainer.global_rank}.jsonl"
        self.samples_file.unlink(missing_ok=True)
        self.extremes: list[tuple] = []
        self.written = 0
        self.missing = 0
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------ per batch
    def _metric_keys(self, meta: dict) -> list[str]:
        if self.protocol_name == "imgedit":
            return ["all"]
        lang = meta.get("language", "en")
        return [f"{lang}/fullset"] + ([f"{lang}/intersection"] if meta.get("intersection") else [])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.active:
            return
        from editr1.evaluation.benchmark import Sample, SampleResult

        lines = []
        for m in batch.get("missing") or []:
            cat = self.protocol.category(m["task"])
            for k in self._metric_keys(m["meta"]):
                self.metrics[k].update_missing([cat])
            lines.append({"key": m["key"], "category": cat, "failure": f"missing:{m['reason']}", "scores": None})
            self.missing += 1
        samples, files = [], []
        for i, key in enumerate(outputs["keys"]):
            meta = outputs["meta"][i]
            if meta.get("padding"):
                continue
            cat = self.protocol.category(outputs["tasks"][i])
            lang = meta.get("language", "en")
            rel = self.protocol.output_path(_file_name(key), outputs["tasks"][i], lang)
            path = self.out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            edit = to_pil_image(outputs["edits"][i].float().clamp(0, 1).cpu())
            edit.save(path)
            samples.append(Sample(key, cat, outputs["prompts"][i], batch["image"][i], edit, lang,
                                  bool(meta.get("intersection"))))
            files.append(rel)
            self.written += 1
        if not samples and not lines:
            return
        if self.judge is not None and samples:
            results = self.protocol.judge(self.judge, samples)
        else:
            results = [SampleResult(s.key, s.category, {}, "not_judged") for s in samples]
        for s, r, rel in zip(samples, results, files):
            meta = {"language": s.language, "intersection": s.intersection}
            if self.judge is not None:
                for k in self._metric_keys(meta):
                    if self.protocol_name == "imgedit":
                        self.metrics[k].update([r.category], [r.scores["score"]])
                    else:
                        self.metrics[k].update([r.category], [r.scores["SC"]], [r.scores["PQ"]])
            lines.append(dict(r.to_json(), file=rel))
            if r.headline == r.headline:  # finite: a candidate for the best / worst lists
                self.extremes.append((r.headline, s.key, s.category, s.prompt, _thumb(s.source), _thumb(s.edit)))
        self.extremes.sort(key=lambda e: e[0])
        if len(self.extremes) > 2 * self.show:
            self.extremes = self.extremes[: self.show] + self.extremes[-self.show :]
        with self.samples_file.open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------------------ summary
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if not self.active:
            return
        judged = self.judge is not None
        results = {k: m.compute() for k, m in self.metrics.items()} if judged else {}  # reduced over processes
        extremes, counts = self.extremes, Counter(getattr(self.judge, "counts", {}) or {})
        written, missing = self.written, self.missing
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (extremes, counts, written, missing))
            extremes = sorted((e for g in gathered for e in g[0]), key=lambda e: e[0])
            counts = sum((Counter(g[1]) for g in gathered), Counter())
            written, missing = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
        trainer.strategy.barrier()
        summary = self._summary(results, counts, written, missing, pl_module)
        self._log(trainer, pl_module, summary, extremes)
        if trainer.is_global_zero:
            self._write(summary)

    def _summary(self, results: dict, counts: dict, written: int, missing: int, pl_module) -> dict:
        cats = self.protocol.categories
        tables: dict[str, dict] = {}
        headline: dict | None = None
        formula = ""
        totals = {"samples": 0, "failed": 0}
        if not results:
            pass
        elif self.protocol_name == "imgedit":
            r = results["all"]
            rows = {c: {"score": r[f"category/{c}"], "samples": r[f"samples/{c}"], "failed": r[f"failed/{c}"],
                        "missing": r[f"missing/{c}"]} for c in cats}
            tables["ImgEdit Basic"] = {"id": None, "columns": ["score"], "rows": rows, "overall": {"score": r["macro"]},
                                       "totals": {k: r[k] for k in ("samples", "failed", "missing")}}
            headline = {"overall": r["macro"], "micro": r["micro"]}
            formula = "sample = mean of its three 1-5 criteria; type = mean of its samples; overall = unweighted mean of the type means"
            totals = r
        else:
            headline = {}
            for key, r in results.items():
                lang, subset = key.split("/")
                rows = {c: {"SC": r[f"SC/{c}"], "PQ": r[f"PQ/{c}"], "O": r[f"O/{c}"], "samples": r[f"samples/{c}"],
                            "failed": r[f"failed/{c}"], "missing": r[f"missing/{c}"]} for c in cats}
                tables[f"GEdit-Bench-{lang.upper()} {subset}"] = {
                    "id": key, "columns": ["SC", "PQ", "O"], "rows": rows,
                    "overall": {"SC": r["G_SC"], "PQ": r["G_PQ"], "O": r["G_O"]},
                    "totals": {k: r[k] for k in ("samples", "failed", "missing")}}
                headline[key] = {"G_SC": r["G_SC"], "G_PQ": r["G_PQ"], "G_O": r["G_O"]}
            formula = ("SC = min of the two 0-10 scores of the call with both images; PQ = min of the two of the call "
                       "with the edit; O = sqrt(SC*PQ) per sample; G_SC, G_PQ, G_O = unweighted means over the groups")
            totals = results[f"{self.languages[0]}/fullset"]
        judged = self.judge is not None
        return {
            "protocol": self.protocol_name,
            "judge": self.judge.info() if judged else None,
            "judge_calls": {k: v for k, v in sorted(counts.items())},
            "policy": {"pipeline": type(getattr(pl_module.policy, "pipe", None)).__name__,
                       "adapter": pl_module.eval_cfg.adapter, "steps": pl_module.eval_cfg.steps,
                       "solver": pl_module.eval_cfg.solver, "seed": pl_module.seed},
            "samples": written + missing,
            "edits_written": written,
            "judged": int(totals["samples"]),
            "failed": int(totals["failed"]),
            "missing": missing,
            "skipped_rows": self.skipped_rows,
            "formula": formula,
            "headline": headline if judged else None,
            # categories that had samples but not one judged: the overall above is over the others only
            "categories_without_scores": sorted({c for t in tables.values() for c, row in t["rows"].items()
                                                 if row["samples"] == 0 and row["failed"] + row["missing"] > 0}),
            "tables": tables if judged else {},
            "max_attempts": self.max_attempts,
            "output_dir": str(self.out),
            "wall_s": round(time.perf_counter() - self.started, 1),
        }

    def _log(self, trainer, pl_module, summary: dict, extremes: list) -> None:
        if summary["headline"] is None:
            return
        prefix = f"test/{self.protocol_name}"
        for table in summary["tables"].values():
            tag = "" if table["id"] is None else "/" + table["id"].replace("/", "_")  # e.g. /en_fullset
            for col, v in table["overall"].items():
                pl_module.log(f"{prefix}{tag}/overall_{col}", float(v), sync_dist=False, rank_zero_only=True)
            for cat, row in table["rows"].items():
                for col in table["columns"]:
                    if row[col] == row[col]:
                        pl_module.log(f"{prefix}{tag}/{cat}_{col}", float(row[col]), sync_dist=False, rank_zero_only=True)
        from editr1.evaluation.benchmark import summary_markdown

        _add_text(trainer, f"{prefix}/table", summary_markdown(summary), pl_module.global_step)
        n = min(self.show, len(extremes) // 2 if len(extremes) < 2 * self.show else self.show)
        for name, picks in (("best", list(reversed(extremes))[:n]), ("worst", extremes[:n])):
            if not picks:
                continue
            rows = [[p[4], p[5]] for p in picks]
            caps = [[f"{p[2]} #{p[1]}", f"{p[0]:.2f}"] for p in picks]
            _add_image(trainer, f"{prefix}/{name}_edits", captioned_grid(rows, caps), pl_module.global_step)
            _add_text(trainer, f"{prefix}/{name}_edits", "\n".join(f"- {p[0]:.3f} · {p[2]} · `{p[1]}` · {p[3]}" for p in picks),
                      pl_module.global_step)

    def _write(self, summary: dict) -> None:
        from editr1.evaluation.benchmark import summary_markdown

        lines = []
        for f in sorted(self.out.glob("samples.rank*.jsonl")):
            lines.extend(json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip())
            f.unlink()
        lines.sort(key=lambda x: x["key"])
        with (self.out / "samples.jsonl").open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if summary["headline"] is not None:
            (self.out / "summary.md").write_text(summary_markdown(summary) + "\n", encoding="utf-8")
        log.info("%s: wrote %s", self.protocol_name, self.out / "summary.json")
        print(f"{self.protocol_name}: edits and summary in {self.out}")
        if summary["headline"] is not None:
            print(json.dumps(summary["headline"], indent=1))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.judge is not None:
            self.judge.close()
