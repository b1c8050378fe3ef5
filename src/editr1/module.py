"""EditR1Module: the policy θ (LoRA "default"), the rollout policy θ_old (LoRA "old") and the frozen
reference (adapters off) on one transformer, trained by manual optimisation with an objective
(:mod:`editr1.objectives`: DiffusionNFT on rewarded rollouts, or supervised flow matching).

One training step, one way: the DataLoader's batch → :class:`editr1.callbacks.RewardCallback` (asks
:meth:`EditR1Module.sample_groups` for rollouts, scores them, gathers, filters, bans) → an
:class:`~editr1.training.experience.Experience` in the batch → :meth:`EditR1Module.training_step`
(the objective's loss per micro-batch, one optimiser step, θ_old / EMA updates). The module never calls a
callback. The algorithm lives in :mod:`editr1.algorithms`; this file wires it to Lightning.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch

from editr1.algorithms.nft import ema_decay, old_policy_eta
from editr1.editing import edit_images
from editr1.efficiency import apply_efficiency
from editr1.objectives import OBJECTIVES, Objective
from editr1.policies import lora as adapters
from editr1.policies.base import EditPolicy, at_batch_size
from editr1.rewards.base import RewardInputs
from editr1.seeding import EVAL_NOISE, ROLLOUT_NOISE, derive_seed
from editr1.settings import (
    AWMSettings,
    EfficiencySettings,
    EvalSettings,
    FlowGRPOSettings,
    NFTSettings,
    OldPolicySettings,
    OptimSettings,
    RolloutSettings,
    SFTSettings,
)
from editr1.training import distributed, guards
from editr1.training.optim import build_optimizer
from editr1.training.rollout import Rollout, chunk_inputs, group_ids, key_hash, sample_seed
from editr1.training.state import emergency_checkpoint, gathered_rng_states, restore_rng_states

# The policy runs in eval mode on purpose (frozen base, deterministic forward passes).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
# Checkpoints after the optimiser step are what resuming needs.
warnings.filterwarnings("ignore", message=r".*no pre-optimization state was saved.*")

__all__ = [
    "EditR1Module",
    "EfficiencySettings",
    "EvalSettings",
    "NFTSettings",
    "OldPolicySettings",
    "OptimSettings",
    "RolloutSettings",
    "SFTSettings",
]


ADAPTERS = {"default": adapters.DEFAULT, "old": adapters.OLD, "ema": adapters.EMA, "reference": None}


class EditR1Module(L.LightningModule):
    """Edit-R1 on any :class:`~editr1.policies.base.EditPolicy`.

    Args:
        policy: the base editing model (FLUX.1-Kontext, Qwen-Image-Edit, …).
        lora: the LoRA adapters (θ, θ_old and optionally the EMA share these settings).
        rollout: group sampling.
        nft: the DiffusionNFT objective.
        old_policy: the θ_old update schedule.
        optim: optimiser.
        evaluation: editing for validate/test/predict.
        ema: keep an EMA adapter of θ (decay min((1+s)/(10+s), 0.9)) for evaluation and export.
        seed: base of every per-sample random stream; ``None`` takes ``torch.initial_seed()`` (the
            value of ``seed_everything``) when training starts.
        objective: ``nft`` (Edit-R1: rollouts, rewards, DiffusionNFT), ``flow_grpo`` (SDE rollouts, PPO-clipped
            ratios), ``awm`` (advantage weighted matching) or ``sft`` (supervised flow matching towards each row's
            ``target`` image; no rollouts, no reward).
        sft: settings of the supervised objective.
        flow_grpo: settings of Flow-GRPO.
        awm: settings of advantage weighted matching.
        efficiency: activation checkpointing, ``torch.compile`` and bf16 autocast of the transformer.
        lora_weights: start from a diffusers LoRA (``pytorch_lora_weights.safetensors`` or its folder, e.g.
            a finished run's ``lora/``) loaded into every adapter — for ``test``/``predict`` with a trained
            LoRA, or to continue training from one. Its rank and α must match ``lora``.
    """

    def __init__(
        self,
        policy: EditPolicy,
        lora: adapters.LoraSettings = adapters.LoraSettings(),
        rollout: RolloutSettings = RolloutSettings(),
        nft: NFTSettings = NFTSettings(),
        old_policy: OldPolicySettings = OldPolicySettings(),
        optim: OptimSettings = OptimSettings(),
        evaluation: EvalSettings = EvalSettings(),
        ema: bool = False,
        seed: int | None = None,
        objective: Literal["nft", "sft", "flow_grpo", "awm"] = "nft",
        sft: SFTSettings = SFTSettings(),
        flow_grpo: FlowGRPOSettings = FlowGRPOSettings(),
        awm: AWMSettings = AWMSettings(),
        efficiency: EfficiencySettings = EfficiencySettings(),
        lora_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapters, never the frozen base
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        if evaluation.adapter == "ema" and not ema:
            raise ValueError("evaluation.adapter is 'ema' but ema is off")
        self.policy = policy
        self.lora_settings = lora
        self.rollout_settings = rollout
        self.nft = nft
        self.sft = sft
        self.old_policy = old_policy
        self.optim = optim
        self.evaluation = evaluation
        self.efficiency = efficiency
        self.use_ema = ema
        chosen = {"nft": nft, "sft": sft, "flow_grpo": flow_grpo, "awm": awm}[objective]
        self.objective: Objective = OBJECTIVES[objective](chosen)
        names = [adapters.DEFAULT, adapters.OLD] + ([adapters.EMA] if ema else [])
        policy.add_adapters(lora, names)
        self.lora_weights = lora_weights
        if lora_weights is not None:
            from editr1.export import load_lora

            load_lora(policy, lora_weights, lora, names)
        policy.eval()  # no dropout anywhere; LoRA weights train in eval mode
        apply_efficiency(policy, efficiency)
        self.seed = seed
        self.rollouts_done = 0  # rollouts sampled so far (the index of every random stream)
        self.skipped_steps = 0  # steps with nothing left to train on after filtering
        self.sharded = False  # FSDP2 applied by configure_model
        self.nonfinite_in_a_row = 0  # consecutive steps skipped for a non-finite gradient
        self.nonfinite_total = 0
        self.idle_in_a_row = 0  # consecutive steps that trained nothing, whatever the cause

    # ------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        self._ensure_seed()

    def _ensure_seed(self) -> None:
        if self.seed is None:
            self.seed = int(torch.initial_seed()) & ((1 << 63) - 1)

    def configure_model(self) -> None:
        """Under :class:`editr1.strategies.FSDP2Strategy` with ``shard: true``: FSDP2-shard the policy."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or not getattr(strategy, "shard", False) or self.sharded:
            return
        self.policy.shard(mesh["data_parallel"])
        self.sharded = True

    def configure_optimizers(self) -> Any:
        return build_optimizer(self.policy.trainable_parameters(), self.optim)

    def configure_callbacks(self) -> list:
        """Callbacks no config can drop by accident: :class:`~editr1.callbacks.RunGuard` (a checkpoint on Ctrl-C
        or SIGTERM), :class:`~editr1.callbacks.RunClock` (fit's elapsed time), for ``predict`` an ImageWriter
        when none is configured, and the step-counting progress bar in place of Lightning's default rich bar."""
        from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar

        from editr1.callbacks.image_writer import ImageWriter
        from editr1.callbacks.progress import StepProgressBar
        from editr1.callbacks.run_clock import RunClock
        from editr1.callbacks.run_guard import RunGuard

        present = self.trainer.callbacks if self._trainer is not None else []
        out = [c() for c in (RunGuard, RunClock) if not any(isinstance(p, c) for p in present)]
        if not any(isinstance(c, BasePredictionWriter) for c in present):
            out.append(ImageWriter(output_dir=None))
        if any(type(c) is RichProgressBar for c in present):  # Lightning's default; a chosen bar stays
            out.append(StepProgressBar())
        return out

    # ------------------------------------------------------------------------------- across processes
    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def reduce(self, value: float, op: str = "sum") -> float:
        """``value`` summed (or maxed) over all processes; itself on one."""
        return distributed.reduce(value, op, world=self.world_size, device=self.device)

    @property
    def loss_world_scale(self) -> float:
        """FSDP2 averages gradients over processes; losses normalised globally are scaled back up by it."""
        return float(self.world_size) if self.sharded else 1.0

    def _sum_gradients(self) -> None:
        """Replicated multi-process training sums the LoRA gradients; sharded training reduce-scatters them in
        backward instead."""
        if not self.sharded:
            distributed.sum_gradients(self.policy.trainable_parameters(), world=self.world_size)

    # ------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    @at_batch_size
    def sample_groups(self, batch: dict, on_chunk: Callable[[RewardInputs], None] | None = None) -> Rollout | None:
        """K edits per prompt of ``batch`` with the rollout policy θ_old — the reward stage's one entry point.

        Samples are generated and decoded in chunks of ``rollout.batch_size``; ``on_chunk`` gets each chunk's
        edits as soon as they exist (the reward callback submits them for scoring, so a served judge works
        while the next chunk is generated). A batch with no prompt left (all banned or unreadable) returns
        ``None``; the index of the random streams advances either way, alike on every process.
        """
        self._ensure_seed()
        cfg = self.rollout_settings
        prompts, requirements, keys = list(batch["prompt"]), list(batch["requirement"]), list(batch["key"])
        if not prompts:
            self.rollouts_done += 1
            guards.check_finite_rollout(self, None)  # joins the other processes' check
            return None
        policy = self.policy
        sources = policy.preprocess(batch["image"])
        targets = policy.preprocess(batch["target"]) if batch.get("target") is not None else None
        ids = group_ids(keys)
        k = cfg.group_size
        seeds = [
            sample_seed(int(self.seed), ROLLOUT_NOISE, self.rollouts_done, ids, k, i) for i in range(len(keys) * k)
        ]

        make_inputs = chunk_inputs(batch, sources, targets, k)  # the reward's inputs of a chunk (with masks)

        def chunk_ready(index: torch.Tensor, images: torch.Tensor) -> None:
            on_chunk(make_inputs(index, images))

        min_prompts = int(self.reduce(len(prompts), "max")) if self.sharded else 0
        with policy.adapter(adapters.OLD):
            out = edit_images(
                policy,
                sources,
                prompts,
                seeds,
                steps=cfg.steps,
                solver=cfg.solver,
                batch_size=cfg.batch_size,
                group_size=k,
                first_order_second_to_last=cfg.first_order_second_to_last,
                on_chunk=chunk_ready if on_chunk is not None else None,
                min_prompts=min_prompts,
                references=batch.get("references"),
                sde=self.objective.rollout_sde,
            )
        guards.check_finite_rollout(self, out.x0)
        ro = Rollout(
            prompts=prompts,
            requirements=requirements,
            keys=keys,
            sources=sources,
            targets=targets,
            cond=out.cond,
            x0=out.x0,
            edits=out.images,
            sigmas=out.sigmas,
            group_size=k,
            index=self.rollouts_done,
            base_seed=int(self.seed),
            latents=out.latents,
            log_probs=out.log_probs,
        )
        self.rollouts_done += 1
        return ro

    # ------------------------------------------------------------------------------- training
    @at_batch_size
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """One optimiser step of the objective, the same path for every objective: prepare, micro-batches
        (idle ones where a sharded process has fewer), gradients summed over processes, clip, step, θ_old /
        EMA updates, metrics."""
        start = time.perf_counter()
        self._ensure_seed()
        obj = self.objective
        work = obj.prepare(self, batch)
        total = int(self.reduce(work.count))
        if total == 0:  # one decision for all processes: nobody trains
            self.skipped_steps += 1
            self.log("filter/steps_skipped", float(self.skipped_steps), on_step=True)
            guards.count_idle_step(self)
            if obj.steps_without_samples:
                self._zero_gradient_step()
            return None
        self.idle_in_a_row = 0
        opt = self.optimizers()
        mb = obj.micro_batch_size
        chunks = -(-work.count // mb)
        if self.sharded and work.can_idle:  # every process makes the same forward/backward calls
            chunks = int(self.reduce(chunks, "max"))
        sums: Counter = Counter()
        for c in range(chunks):
            positions = list(range(c * mb, min((c + 1) * mb, work.count)))
            idle = not positions
            got = obj.micro_batch(self, work, positions or [0], idle, total)
            if not idle:
                sums.update(got)
        self._sum_gradients()
        grad_norm = self._clip_and_step(opt)
        if grad_norm is None:
            return None
        self._update_shadow_adapters(obj.keep_old)
        if work.count == 0:  # this process took part in the step with nothing of its own
            return None
        metrics = obj.metrics(self, work, sums)
        main = metrics[obj.main_metric]
        now = time.perf_counter()
        step_s = now - (work.started if work.started is not None else start)
        metrics.update(
            {
                "grad_norm": float(grad_norm),
                "learning_rate": float(opt.param_groups[0]["lr"]),
                "time/train_s": now - start,
                "time/step_s": step_s,  # rollout, reward and training
                "samples_per_s": work.samples / step_s if step_s > 0 else 0.0,
            }
        )
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        rows, bar = max(work.rows, 1), obj.progress_bar
        self.log_dict({k: v for k, v in metrics.items() if k != bar}, on_step=True, on_epoch=False, batch_size=rows)
        if bar is not None:
            self.log(bar, metrics[bar], prog_bar=True, on_step=True, on_epoch=False, batch_size=rows)
        return torch.tensor(main)

    def _zero_gradient_step(self) -> None:
        """An optimiser step on a zero gradient (AdamW's moments and weight decay still move the weights),
        then the θ_old / EMA updates: what the released code does when every sample of a step is masked."""
        for p in self.policy.trainable_parameters():
            p.grad = torch.zeros_like(p)
        if self._clip_and_step(self.optimizers()) is not None:
            self._update_shadow_adapters(self.objective.keep_old)

    def _clip_and_step(self, opt) -> torch.Tensor | None:
        """Clip and take the optimiser step; ``None`` when the gradient is not finite on some process: the
        step is skipped on every process (one collective decision) and counted; after
        ``optim.max_nonfinite_steps`` in a row the run saves a checkpoint and stops."""
        params = self.policy.trainable_parameters()
        if self.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # sharded parameters give a DTensor norm
            norm = norm.full_tensor()
        if self.reduce(0.0 if torch.isfinite(norm) else 1.0, "max") > 0:
            opt.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log_dict({"train/nonfinite_skipped": float(self.nonfinite_total)}, on_step=True, on_epoch=False)
            limit = self.optim.max_nonfinite_steps
            if self.nonfinite_in_a_row >= limit:
                path = emergency_checkpoint(self.trainer, "nonfinite")
                raise guards.RunStopped(
                    f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                    f"(optim.max_nonfinite_steps = {limit}); stopped. Last good state saved to {path}. "
                    "Lower the learning rate, check the rewards, or resume from an earlier checkpoint."
                )
            warnings.warn(
                f"step skipped: non-finite gradient norm ({float(norm)}); {self.nonfinite_in_a_row} in a row",
                stacklevel=2,
            )
            return None
        self.nonfinite_in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        guards.check_finite_adapters(self)
        return norm

    @torch.no_grad()
    def _update_shadow_adapters(self, keep_old: float | None = None) -> None:
        """After optimiser step s: θ_old ← η(s)·θ_old + (1 − η(s))·θ; EMA ← d(s)·EMA + (1 − d(s))·θ.
        ``keep_old`` overrides η (0 copies θ)."""
        step = self.global_step
        model = self.policy.transformer
        old = self.old_policy
        eta = old_policy_eta(step, old.rate, old.cap, old.delay) if keep_old is None else keep_old
        adapters.mix_adapter(model, src=adapters.DEFAULT, dst=adapters.OLD, keep=eta)
        if self.use_ema:
            adapters.mix_adapter(model, src=adapters.DEFAULT, dst=adapters.EMA, keep=ema_decay(step))

    # ------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict) -> dict:
        cfg = self.evaluation
        self._ensure_seed()
        n = len(batch["key"])
        min_prompts = int(self.reduce(n, "max")) if self.sharded else 0
        if n == 0:  # every row of this batch was unreadable (counted by the callbacks as missing)
            if min_prompts > 0:  # sharded, and the others edit: make the same sharded calls, keep nothing
                with self.policy.adapter(ADAPTERS[cfg.adapter]):
                    edit_images(
                        self.policy,
                        torch.zeros(0, 3, self.policy.height, self.policy.width),
                        [],
                        [],
                        steps=cfg.steps,
                        solver=cfg.solver,
                        batch_size=cfg.batch_size,
                        first_order_second_to_last=self.rollout_settings.first_order_second_to_last,
                        min_prompts=min_prompts,
                    )
            empty = {"sources": None, "edits": None, "targets": None}
            return {**empty, "prompts": [], "requirements": [], "keys": [], "tasks": [], "meta": []}
        sources = self.policy.preprocess(batch["image"])
        seeds = [derive_seed(int(self.seed), EVAL_NOISE, key_hash(k)) for k in batch["key"]]
        with self.policy.adapter(ADAPTERS[cfg.adapter]):
            edits = edit_images(
                self.policy,
                sources,
                list(batch["prompt"]),
                seeds,
                steps=cfg.steps,
                solver=cfg.solver,
                batch_size=cfg.batch_size,
                first_order_second_to_last=self.rollout_settings.first_order_second_to_last,
                min_prompts=min_prompts,
                references=batch.get("references"),
            ).images
        targets = self.policy.preprocess(batch["target"]) if batch.get("target") is not None else None
        return {
            "sources": sources,
            "references": batch.get("references"),
            "edits": edits,
            "targets": targets,
            "prompts": list(batch["prompt"]),
            "requirements": list(batch["requirement"]),
            "keys": list(batch["key"]),
            "tasks": list(batch.get("task") or [""] * len(batch["key"])),
            "meta": [m or {} for m in (batch.get("meta") or [None] * len(batch["key"]))],
        }

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch)

    # ------------------------------------------------------------------------------- checkpoints
    COUNTERS = {"rollouts_done": 0, "skipped_steps": 0, "idle_in_a_row": 0}  # saved with the adapters

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only adapter weights: a checkpoint's size does not grow with the base model."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
        lora = self.lora_settings
        checkpoint["editr1"] = {
            "rng": gathered_rng_states(self.world_size),  # every rank's (dump_checkpoint runs on all; rank 0 writes)
            "seed": self.seed,
            **{k: getattr(self, k) for k in self.COUNTERS},
            "nonfinite": [self.nonfinite_in_a_row, self.nonfinite_total],
            "adapters": adapters.adapter_names(self.policy.transformer),
            # what `editr1 export-lora` needs to write a diffusers LoRA without building the model
            "lora": {"r": lora.rank, "lora_alpha": float(lora.alpha), "target_modules": list(lora.target_modules)},
            "pipeline": type(self.policy.pipe).__name__,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("editr1", {})
        expected = adapters.adapter_names(self.policy.transformer)
        if extra.get("adapters") is not None and sorted(extra["adapters"]) != expected:
            raise ValueError(
                f"checkpoint has adapters {extra['adapters']}, this run has {expected} (the `ema` setting?)"
            )
        missing = {k for k in self.state_dict() if "lora_" in k} - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} adapter weights, e.g. {sorted(missing)[0]}")
        self.seed = extra.get("seed", self.seed)
        for k, default in self.COUNTERS.items():
            setattr(self, k, extra.get(k, default))
        self.nonfinite_in_a_row, self.nonfinite_total = extra.get("nonfinite", [0, 0])
        restore_rng_states(extra.get("rng"), self.global_rank if self._trainer is not None else 0)
