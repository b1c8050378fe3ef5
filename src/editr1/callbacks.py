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

from editr1.algorithms.grouping import FilterRule, NanPolicy, decide, global_std
from editr1.data.scenes import SceneConfig
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
    ban: bool = False  # never roll out a prompt again once the filter dropped it
    nan_policy: NanPolicy = "group"  # a reward that failed drops its whole "group" or only the "sample"


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
    width = max(counts)
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
            or ``stop`` the run with a checkpoint. Never an invented reward.
    """

    def __init__(
        self,
        model: RewardModel,
        filter: FilterSettings = FilterSettings(),
        log_images_every_n_steps: int = 25,
        image_groups: int = 4,
        on_failure: Literal["drop", "stop"] = "drop",
    ) -> None:
        if on_failure not in ("drop", "stop"):
            raise ValueError(f"on_failure must be 'drop' or 'stop', got {on_failure!r}")
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
        self.banned = set(state_dict.get("banned", []))
        self.counts = Counter(state_dict.get("counts", {}))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.model.to(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
        if not batch["prompt"]:
            batch["rl"] = None
            return
        t0 = time.perf_counter()
        futures: list[Future] = []
        ro: Rollout = pl_module.rollout(batch, on_chunk=lambda chunk: futures.append(self.model.submit(chunk)))
        t1 = time.perf_counter()
        rewards = self._collect(futures, ro)
        t2 = time.perf_counter()  # time/reward_s: scoring time not hidden behind the rollout
        everything, offset = gather_groups(pl_module, rewards)
        failed = int((~torch.isfinite(everything)).sum())
        if failed and self.on_failure == "stop":
            path = pl_module._emergency_checkpoint("reward") if hasattr(pl_module, "_emergency_checkpoint") else None
            raise RuntimeError(
                f"the reward model could not judge {failed} of {everything.numel()} edits of this step "
                f"({dict(self.model.stats())}); reward.on_failure is 'stop'" + (f"; checkpoint saved to {path}" if path else "")
            )
        nft = pl_module.nft
        f = self.filter
        decision_all = decide(
            everything, std_mode=nft.std_mode, adv_clip=nft.adv_clip, rule=f.rule, mean_threshold=f.mean_threshold,
            std_threshold=f.std_threshold, nan_policy=f.nan_policy, step_std=global_std(everything),
        )
        local = slice(offset, offset + ro.num_groups)
        decision = type(decision_all)(**{k: v[local] for k, v in vars(decision_all).items()})
        if f.ban:
            for g in decision.dropped_low_variance.nonzero().flatten().tolist():
                self.banned.add(ro.keys[g])
        batch["rl"] = StepData(ro, rewards.to(pl_module.device), decision)
        self._log_step(pl_module, everything, decision_all, t1 - t0, t2 - t1)
        if self.log_images_every_n_steps and (ro.index % self.log_images_every_n_steps == 0):
            self._log_rollout_images(trainer, ro, rewards, decision, pl_module.global_step)

    def _collect(self, futures: list[Future], ro: Rollout) -> torch.Tensor:
        """``(G, K)`` rewards of a rollout from its chunks' futures (NaN where the judge failed)."""
        rewards = torch.cat([f.result().float().reshape(-1).cpu() for f in futures])
        check_rewards(rewards, ro.edits.shape[0])
        return rewards.view(ro.num_groups, ro.group_size)

    def _drop_banned(self, batch: dict) -> None:
        if not self.banned:
            return
        keep = [i for i, k in enumerate(batch["key"]) if k not in self.banned]
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
            "time/rollout_s": rollout_s,
            "time/reward_s": reward_s,
        }
        metrics.update({f"reward_model/{k}": v for k, v in self.model.stats().items()})
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
        inputs = RewardInputs(
            sources=outputs["sources"], edits=outputs["edits"], instructions=outputs["prompts"],
            requirements=outputs["requirements"], targets=outputs["targets"],
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
        if not self._eval:
            return
        pl_module.log(f"{prefix}/reward", self._eval["reward"].compute(), prog_bar=prefix == "val")
        pl_module.log(f"{prefix}/failed", self._eval["failed"].compute())

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
