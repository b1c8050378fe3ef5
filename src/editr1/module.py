"""EditR1Module: the policy θ (LoRA "default"), the rollout policy θ_old (LoRA "old") and the frozen
reference (adapters off) on one transformer, trained with DiffusionNFT by manual optimisation.

The algorithm lives in :mod:`editr1.algorithms`; this file only wires it to Lightning. Rollouts are
requested by :class:`editr1.callbacks.RewardCallback`, which scores them, applies the group filter and
puts a :class:`~editr1.rollout.StepData` into the batch under ``"rl"`` before ``training_step`` runs.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch

from editr1.algorithms.flow_matching import flow_matching_loss
from editr1.algorithms.nft import add_noise, ema_decay, nft_loss, old_policy_eta, reference_sample_weights
from editr1.algorithms.timesteps import TimestepMode, continuous_timesteps, train_timesteps
from editr1.policies import lora as adapters
from editr1.policies.base import EditPolicy
from editr1.rewards.base import RewardInputs
from editr1.rollout import Rollout, StepData, group_ids, key_hash, sample_seed
from editr1.editing import edit_images, encode_padded
from editr1.sampling import Solver
from editr1.seeding import (
    EVAL_NOISE, ROLLOUT_NOISE, TRAIN_NOISE, TRAIN_SHUFFLE, TRAIN_TIMESTEPS, derive_seed, per_sample_rand, per_sample_randn,
)

# The policy runs in eval mode on purpose (frozen base, deterministic forward passes).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
# Checkpoints after the optimiser step are what resuming needs.
warnings.filterwarnings("ignore", message=r".*no pre-optimization state was saved.*")

def rng_states() -> dict:
    """torch, NumPy and Python global RNG states as tensors and plain numbers (loadable with
    ``weights_only=True``). Every draw of the algorithm comes from per-sample seeds; these cover the rest."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_rng_states(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))


def apply_efficiency(policy: EditPolicy, cfg: "EfficiencySettings") -> None:
    """Turn on the switches of ``cfg`` on ``policy``'s transformer (nothing when all are off).

    Activation checkpointing recomputes a block's forward in backward with whatever adapter is active
    then: ``training_step`` calls backward with θ ("default") active, the adapter its forward used.
    """
    if cfg.activation_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    policy.autocast_dtype = torch.bfloat16 if cfg.autocast == "bf16" else None
    if cfg.compile:
        policy.transformer.compile(backend=cfg.compile_backend)


ADAPTERS = {"default": adapters.DEFAULT, "old": adapters.OLD, "ema": adapters.EMA, "reference": None}


@dataclass(frozen=True)
class RolloutSettings:
    """How the rollout policy samples a group of edits per prompt (CFG-free, deterministic ODE)."""

    group_size: int = 12  # K edits per prompt
    steps: int = 6  # solver steps
    solver: Solver = "dpmpp_2m"  # "dpmpp_2m" (DPM-Solver++ 2M in x0 space) or "euler"
    batch_size: int = 12  # samples per denoising forward pass
    # DPM-Solver++ orders: false = first order on the first and last step only (the reference code and diffusers);
    # true = also on the second-to-last step below 15 steps (editr1's earlier default)
    first_order_second_to_last: bool = False

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("rollout group_size, steps and batch_size must all be >= 1")


@dataclass(frozen=True)
class NFTSettings:
    """The DiffusionNFT objective (DESIGN.md section 2)."""

    beta: float = 1.0  # β: how far the implicit positive/negative policies move from θ_old
    adv_clip: float = 5.0  # c: advantages clipped to ±c; also the loss scale
    std_mode: Literal["global", "group"] = "global"  # reward std for advantages: whole step or per group
    kl_weight: float = 1e-4  # λ_KL on mean((v_θ − v_ref)²); 0 skips the reference forward
    timesteps: TimestepMode = "rollout"  # "rollout" (the rollout's σ's, permuted), "uniform", "logit_normal"
    timestep_fraction: float = 0.99  # train on int(steps × fraction) timesteps per sample (the reference rule)
    t_min: float = 0.0  # continuous modes: lower end of t
    t_max: float = 1.0  # continuous modes: upper end of t
    micro_batch_size: int = 4  # samples per forward/backward during training
    # loss normalisation: "kept" = mean over the kept samples of the step (each weighs 1/kept); "reference" = the
    # released code's: shuffled micro-batches of kept and filtered samples, each micro-batch's mean over its kept
    # ones, divided by the number of micro-batches (more filtering, smaller steps; an all-filtered step still
    # takes an optimiser step with zero gradient). Filtered samples are never computed in either mode.
    normalize: Literal["kept", "reference"] = "kept"

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.adv_clip <= 0 or self.kl_weight < 0 or self.micro_batch_size < 1:
            raise ValueError("nft: beta and adv_clip must be > 0, kl_weight >= 0, micro_batch_size >= 1")
        if self.normalize not in ("kept", "reference"):
            raise ValueError(f"nft.normalize must be 'kept' or 'reference', got {self.normalize!r}")


@dataclass(frozen=True)
class SFTSettings:
    """Supervised flow matching on (source, instruction, target) pairs (``objective: sft``)."""

    timesteps: Literal["uniform", "logit_normal"] = "logit_normal"  # distribution of t
    micro_batch_size: int = 16  # samples per forward/backward

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError("sft.micro_batch_size must be >= 1")


@dataclass(frozen=True)
class OldPolicySettings:
    """θ_old ← η·θ_old + (1 − η)·θ after each optimiser step; η = 0 before ``delay``, then
    min(rate·(step − delay), cap). Paper: rate 0.001, cap 0.5, delay 0."""

    rate: float = 0.001  # growth of η per optimiser step
    cap: float = 0.5  # largest η
    delay: int = 0  # steps with η = 0 (old copies θ exactly)


@dataclass(frozen=True)
class OptimSettings:
    """Optimiser of the LoRA weights."""

    name: Literal["adamw", "adamw8bit"] = "adamw"  # torch AdamW or bitsandbytes AdamW8bit
    lr: float = 3e-4  # learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    weight_decay: float = 1e-4  # decoupled weight decay
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping)
    warmup_steps: int = 0  # linear LR warm-up steps
    max_nonfinite_steps: int = 3  # consecutive steps with a non-finite loss/gradient skipped before the run stops


@dataclass(frozen=True)
class EvalSettings:
    """How validation/test/predict edit: one edit per prompt with fixed per-prompt seeds."""

    steps: int = 15  # solver steps
    solver: Solver = "euler"  # "euler" or "dpmpp_2m"
    adapter: Literal["default", "old", "ema", "reference"] = "default"  # which policy edits
    batch_size: int = 16  # samples per denoising forward pass


@dataclass(frozen=True)
class EfficiencySettings:
    """Optional speed/memory switches for the transformer. All off by default; none changes the algorithm
    (``tests/test_efficiency.py`` compares losses and weights with each switch on and off)."""

    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1 more forward
    compile: bool = False  # torch.compile the transformer in place (slow first steps; one graph per adapter)
    compile_backend: str = "inductor"  # torch.compile backend ("inductor"; "aot_eager" to debug)
    autocast: Literal["no", "bf16"] = "no"  # bf16 autocast of every transformer forward (weights stay as loaded)

    def __post_init__(self) -> None:
        if self.autocast not in ("no", "bf16"):
            raise ValueError(f"efficiency.autocast must be 'no' or 'bf16', got {self.autocast!r}")


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
        objective: ``nft`` (Edit-R1: rollouts, rewards, DiffusionNFT) or ``sft`` (supervised flow
            matching towards each row's ``target`` image; no rollouts, no reward).
        sft: settings of the supervised objective.
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
        objective: Literal["nft", "sft"] = "nft",
        sft: SFTSettings = SFTSettings(),
        efficiency: EfficiencySettings = EfficiencySettings(),
        lora_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapters, never the frozen base
        self.policy = policy
        self.lora_settings = lora
        self.rollout_cfg = rollout
        self.nft = nft
        self.old_cfg = old_policy
        self.optim_cfg = optim
        self.eval_cfg = evaluation
        self.use_ema = ema
        if objective not in ("nft", "sft"):
            raise ValueError(f"objective must be 'nft' or 'sft', got {objective!r}")
        self.objective = objective
        self.sft_cfg = sft
        if self.eval_cfg.adapter == "ema" and not ema:
            raise ValueError("evaluation.adapter is 'ema' but ema is off")
        names = [adapters.DEFAULT, adapters.OLD] + ([adapters.EMA] if ema else [])
        policy.add_adapters(self.lora_settings, names)
        self.lora_weights = lora_weights
        if lora_weights is not None:
            from editr1.export import load_lora

            load_lora(policy, lora_weights, self.lora_settings, names)
        policy.eval()  # no dropout anywhere; LoRA weights train in eval mode
        self.efficiency = efficiency
        apply_efficiency(policy, efficiency)
        self.seed = seed
        self.rollouts_done = 0  # rollouts sampled so far (the index of every random stream)
        self.skipped_steps = 0  # steps with nothing left to train on after filtering
        self._sharded = False  # FSDP2 applied by configure_model
        self.nonfinite_in_a_row = 0  # consecutive steps skipped for a non-finite gradient
        self.nonfinite_total = 0

    @property
    def wants_rollouts(self) -> bool:
        """Whether training batches need rollouts and rewards (the RewardCallback asks)."""
        return self.objective == "nft"

    # ------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if self.seed is None:
            self.seed = int(torch.initial_seed()) & ((1 << 63) - 1)

    def configure_model(self) -> None:
        """Under :class:`editr1.strategies.FSDP2Strategy` with ``shard: true``: FSDP2-shard the policy."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or not getattr(strategy, "shard", False) or self._sharded:
            return
        self.policy.shard(mesh["data_parallel"])
        self._sharded = True

    # ------------------------------------------------------------------------------- across ranks
    @property
    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _reduce(self, value: float, op: str = "sum") -> float:
        """``value`` summed (or maxed) over all ranks; itself on one process."""
        if self._world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return float(t.item())

    def _sync_gradients(self) -> None:
        """Replicated multi-rank training: sum the LoRA gradients over ranks (losses are already
        normalised by the global sample count). Sharded training reduce-scatters in backward instead."""
        if self._world == 1 or self._sharded:
            return
        import torch.distributed as dist

        for p in self.policy.trainable_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    @property
    def _loss_world_scale(self) -> float:
        """FSDP2 averages gradients over ranks; losses normalised globally must be scaled back up."""
        return float(self._world) if self._sharded else 1.0

    def configure_optimizers(self) -> Any:
        params = self.policy.trainable_parameters()
        cfg = self.optim_cfg
        kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
        if cfg.name == "adamw":
            opt = torch.optim.AdamW(params, **kwargs)
        elif cfg.name == "adamw8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, **kwargs)
        else:
            raise ValueError(f"optim.name must be 'adamw' or 'adamw8bit', got {cfg.name!r}")
        if cfg.warmup_steps <= 0:
            return opt
        warm = cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------- editing
    @torch.no_grad()
    def rollout(self, batch: dict, on_chunk: Callable[[RewardInputs], None] | None = None) -> Rollout:
        """K edits per prompt of ``batch`` with the rollout policy θ_old.

        Samples are generated and decoded in chunks of ``rollout.batch_size``; ``on_chunk`` gets each
        chunk's edits as soon as they exist (the reward callback submits them for scoring, so a
        served judge works while the next chunk is generated).
        """
        cfg = self.rollout_cfg
        if self.seed is None:
            self.setup("fit")
        policy = self.policy
        prompts, requirements, keys = list(batch["prompt"]), list(batch["requirement"]), list(batch["key"])
        sources = policy.preprocess(batch["image"])
        targets = policy.preprocess(batch["target"]) if batch.get("target") is not None else None
        ids = group_ids(keys)
        k = cfg.group_size
        seeds = [sample_seed(int(self.seed), ROLLOUT_NOISE, self.rollouts_done, ids, k, i) for i in range(len(keys) * k)]

        def chunk_ready(index: torch.Tensor, images: torch.Tensor) -> None:
            g = (index // k).tolist()
            on_chunk(RewardInputs(
                sources=sources[index // k], edits=images, instructions=[prompts[i] for i in g],
                requirements=[requirements[i] for i in g],
                targets=None if targets is None else targets[index // k], source_ids=g,
            ))

        min_prompts = int(self._reduce(len(prompts), "max")) if self._sharded else 0
        with policy.adapter(adapters.OLD):
            out = edit_images(
                policy, sources, prompts, seeds, steps=cfg.steps, solver=cfg.solver, batch_size=cfg.batch_size,
                group_size=k, first_order_second_to_last=cfg.first_order_second_to_last,
                on_chunk=chunk_ready if on_chunk is not None else None, min_prompts=min_prompts,
            )
        ro = Rollout(
            prompts=prompts, requirements=requirements, keys=keys, sources=sources, targets=targets, cond=out.cond,
            x0=out.x0, edits=out.images, sigmas=out.sigmas, group_size=k, index=self.rollouts_done,
            base_seed=int(self.seed),
        )
        self.rollouts_done += 1
        return ro

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if self.objective == "sft":
            return self._sft_step(batch)
        data: StepData | None = batch.get("rl")
        if "rl" not in batch:
            raise RuntimeError(
                "no rollout for this batch: training needs editr1.callbacks.RewardCallback "
                "(the `reward:` section of the config)"
            )
        n_local = int(data.decision.train_mask.sum()) if data is not None else 0
        n_global = int(self._reduce(n_local))
        if n_global == 0:  # one decision for all ranks: nobody trains
            self.skipped_steps += 1
            self.log("filter/steps_skipped", float(self.skipped_steps), on_step=True)
            if self.nft.normalize == "reference":  # the reference still steps, on a zero gradient
                self._zero_gradient_step()
            return None
        if data is None:
            if self._sharded:
                raise RuntimeError(
                    "this rank has no rollout (every prompt of its batch was banned or skipped) while others "
                    "train: sharded training needs every rank to take part; use more prompts per rank or ban: false"
                )
            self._sync_gradients()
            if self._clip_and_step(self.optimizers()) is not None:
                self._update_shadow_adapters()
            return None
        start = time.perf_counter()
        ro, nft = data.rollout, self.nft
        policy = self.policy
        opt = self.optimizers()
        idx = data.decision.train_mask.flatten().nonzero().squeeze(1).tolist()
        n = len(idx)
        r_all = data.decision.r.flatten().to(self.device)
        train_sigmas = ro.sigmas[:-1]
        keys = per_sample_rand(train_sigmas.numel(), [ro.sample_seed(TRAIN_TIMESTEPS, i) for i in idx or [0]])
        ts = train_timesteps(nft.timesteps, train_sigmas, keys, nft.timestep_fraction, t_min=nft.t_min, t_max=nft.t_max)
        rounds = ts.shape[0]
        group_index = ro.group_index
        mb = nft.micro_batch_size
        chunks = -(-n // mb)
        if self._sharded:  # every rank makes the same forward/backward calls: idle chunks where it has fewer
            chunks = int(self._reduce(chunks, "max"))
        scale = self._loss_world_scale / (n_global * rounds)
        weights = None  # nft.normalize "kept": every kept sample weighs 1 / n_global
        if nft.normalize == "reference":
            n_local = ro.x0.shape[0]
            order = per_sample_rand(1, [ro.sample_seed(TRAIN_SHUFFLE, i) for i in range(n_local)])[:, 0].argsort()
            weights = reference_sample_weights(data.decision.train_mask.flatten().cpu(), order, mb, self._world)
            weights = weights[torch.tensor(idx, dtype=torch.long)].to(self.device)
        sums = {"policy": 0.0, "kl": 0.0, "old_deviation": 0.0}
        for c in range(chunks):
            s = c * mb
            sel = idx[s : s + mb]
            idle = not sel
            if idle:
                sel = [0]  # any sample of this rank's rollout; its loss is multiplied by 0
            b = len(sel)
            sel_t = torch.tensor(sel, device=self.device)
            cond = ro.cond.select(group_index[sel])
            x0 = ro.x0[sel_t]
            r = r_all[sel_t]
            for j in range(rounds):
                t = ts[j, s : s + b].to(self.device) if not idle else ts[j, :1].to(self.device)
                eps = per_sample_randn(x0.shape[1:], [ro.sample_seed(TRAIN_NOISE, i, j) for i in sel], self.device)
                x_t = add_noise(x0, eps, t)
                with torch.no_grad():
                    with policy.adapter(adapters.OLD):
                        v_old = policy.velocity(x_t, t, cond)
                    v_ref = None
                    if nft.kl_weight > 0:
                        with policy.adapter(None):
                            v_ref = policy.velocity(x_t, t, cond)
                v_theta = policy.velocity(x_t, t, cond)
                w = None if weights is None or idle else weights[s : s + b]
                out = nft_loss(
                    v_theta, v_old, x_t, x0, t, r, beta=nft.beta, adv_clip=nft.adv_clip, v_ref=v_ref,
                    kl_weight=nft.kl_weight, weights=w,
                )
                if w is None:
                    factor = 0.0 if idle else b * scale
                else:  # out.loss is the w-weighted mean: times Σw gives Σ w·(policy + λ·kl)
                    factor = float(w.sum()) * self._loss_world_scale / rounds
                self.manual_backward(out.loss * factor)
                if idle:
                    continue
                sums["policy"] += float(out.policy.detach().sum())
                sums["kl"] += float(out.kl.detach().sum())
                sums["old_deviation"] += float(out.old_deviation.sum())
        self._sync_gradients()
        grad_norm = self._clip_and_step(opt)
        if grad_norm is None:
            return None
        self._update_shadow_adapters()
        denom = max(n, 1) * rounds
        metrics = {
            "loss/policy": sums["policy"] / denom,
            "loss/kl": sums["kl"] / denom,
            "nft/old_deviation": sums["old_deviation"] / denom,
            "nft/eta": old_policy_eta(self.global_step, self.old_cfg.rate, self.old_cfg.cap, self.old_cfg.delay),
            "nft/trained_samples": float(n),
            "grad_norm": float(grad_norm),
            "lr": float(opt.param_groups[0]["lr"]),
            "time/train_s": time.perf_counter() - start,
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=ro.num_groups)
        return torch.tensor(metrics["loss/policy"])

    def _sft_step(self, batch: dict) -> torch.Tensor:
        """Supervised flow matching of θ (LoRA ``default``) towards the batch's target images."""
        if batch.get("target") is None:
            raise ValueError(
                "objective 'sft' needs target images: use the synthetic scenes, give JSONL rows a `target` (shards a "
                "`tgt` image), and keep data.targets at 'require' (the CLI's choice for sft) so rows without one are skipped"
            )
        start = time.perf_counter()
        policy, cfg = self.policy, self.sft_cfg
        if self.seed is None:
            self.setup("fit")
        opt = self.optimizers()
        prompts, keys = list(batch["prompt"]), list(batch["key"])
        n = len(prompts)
        if self._sharded and self._reduce(float(n == 0), "max") > 0:  # decided on every rank at once
            raise RuntimeError("a process has no readable row in this batch: sharded supervised training needs "
                               "every process to train; use more rows per process (data.batch_size) or shard: false")
        if n == 0:  # every row of this batch was unreadable (counted): take part in the step, train nothing
            if self._reduce(0.0) == 0:
                self.skipped_steps += 1
                return None
            self._sync_gradients()
            if self._clip_and_step(opt) is not None:
                self._update_shadow_adapters(keep_old=0.0)
            return None
        with torch.no_grad():
            min_prompts = int(self._reduce(n, "max")) if self._sharded else 0  # sharded encoders: equal calls
            cond = encode_padded(policy, policy.preprocess(batch["image"]), prompts, min_prompts).select(torch.arange(n))
            x0 = policy.encode_images(policy.preprocess(batch["target"]))
        ids = group_ids(keys)
        step = self.global_step
        keys_t = per_sample_rand(1, [sample_seed(int(self.seed), TRAIN_TIMESTEPS, step, ids, 1, i) for i in range(n)])
        t_all = continuous_timesteps(keys_t[:, 0], cfg.timesteps)
        total = 0.0
        n_global = self._reduce(n)
        chunks = -(-n // cfg.micro_batch_size)
        if self._sharded:
            chunks = int(self._reduce(chunks, "max"))
        for c in range(chunks):
            s = c * cfg.micro_batch_size
            idx = torch.arange(s, min(s + cfg.micro_batch_size, n))
            idle = idx.numel() == 0
            if idle:  # sharded: same forward/backward calls on every rank
                idx = torch.zeros(1, dtype=torch.long)
            seeds = [sample_seed(int(self.seed), TRAIN_NOISE, step, ids, 1, int(i)) for i in idx]
            eps = per_sample_randn(x0.shape[1:], seeds, self.device)
            t = t_all[idx].to(self.device)
            x_t = add_noise(x0[idx.to(x0.device)], eps, t)
            v = policy.velocity(x_t, t, cond.select(idx))
            loss = flow_matching_loss(v, eps, x0[idx.to(x0.device)])
            self.manual_backward(loss.sum() * (0.0 if idle else self._loss_world_scale / n_global))
            if not idle:
                total += float(loss.detach().sum())
        self._sync_gradients()
        grad_norm = self._clip_and_step(opt)
        if grad_norm is None:
            return None
        self._update_shadow_adapters(keep_old=0.0)  # θ_old tracks θ exactly during supervised training
        metrics = {
            "loss/sft": total / n,
            "grad_norm": float(grad_norm),
            "lr": float(opt.param_groups[0]["lr"]),
            "time/train_s": time.perf_counter() - start,
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n)
        self.log("loss/sft_bar", total / n, prog_bar=True, on_step=True, on_epoch=False, batch_size=n, logger=False)
        return torch.tensor(total / n)

    def _zero_gradient_step(self) -> None:
        """An optimiser step on a zero gradient (AdamW's moments and weight decay still move the weights),
        then the θ_old / EMA updates: what the reference code does when every sample of a step is masked."""
        for p in self.policy.trainable_parameters():
            p.grad = torch.zeros_like(p)
        if self._clip_and_step(self.optimizers()) is not None:
            self._update_shadow_adapters()

    def _clip_and_step(self, opt) -> torch.Tensor | None:
        """Clip and take the optimiser step; ``None`` when the gradient is not finite on some rank: the
        step is skipped on every rank (one collective decision) and counted; after
        ``optim.max_nonfinite_steps`` in a row the run saves a checkpoint and stops."""
        params = self.policy.trainable_parameters()
        if self.optim_cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # sharded parameters give a DTensor norm
            norm = norm.full_tensor()
        if self._reduce(0.0 if torch.isfinite(norm) else 1.0, "max") > 0:
            opt.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log_dict({"train/nonfinite_skipped": float(self.nonfinite_total)}, on_step=True, on_epoch=False)
            limit = self.optim_cfg.max_nonfinite_steps
            if self.nonfinite_in_a_row >= limit:
                path = self._emergency_checkpoint("nonfinite")
                raise RuntimeError(
                    f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                    f"(optim.max_nonfinite_steps = {limit}); stopped. Last good state saved to {path}. "
                    "Lower the learning rate, check the rewards, or resume from an earlier checkpoint."
                )
            warnings.warn(f"step skipped: non-finite gradient norm ({float(norm)}); {self.nonfinite_in_a_row} in a row")
            return None
        self.nonfinite_in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return norm

    def _emergency_checkpoint(self, reason: str) -> str:
        from pathlib import Path

        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path = root / "checkpoints" / f"stopped-{reason}-step{self.global_step}.ckpt"
        self.trainer.save_checkpoint(str(path))
        return str(path)

    @torch.no_grad()
    def _update_shadow_adapters(self, keep_old: float | None = None) -> None:
        """After optimiser step s: θ_old ← η(s)·θ_old + (1 − η(s))·θ; EMA ← d(s)·EMA + (1 − d(s))·θ.
        ``keep_old`` overrides η (0 copies θ)."""
        step = self.global_step
        model = self.policy.transformer
        eta = old_policy_eta(step, self.old_cfg.rate, self.old_cfg.cap, self.old_cfg.delay) if keep_old is None else keep_old
        adapters.mix_adapter(model, src=adapters.DEFAULT, dst=adapters.OLD, keep=eta)
        if self.use_ema:
            adapters.mix_adapter(model, src=adapters.DEFAULT, dst=adapters.EMA, keep=ema_decay(step))

    # ------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict) -> dict:
        cfg = self.eval_cfg
        if self.seed is None:
            self.setup("validate")
        n = len(batch["key"])
        min_prompts = int(self._reduce(n, "max")) if self._sharded else 0
        if n == 0:  # every row of this batch was unreadable (counted by the callbacks as missing)
            if min_prompts > 0:  # sharded, and the others edit: make the same sharded calls, keep nothing
                with self.policy.adapter(ADAPTERS[cfg.adapter]):
                    edit_images(self.policy, torch.zeros(0, 3, self.policy.height, self.policy.width), [], [],
                                steps=cfg.steps, solver=cfg.solver, batch_size=cfg.batch_size,
                                first_order_second_to_last=self.rollout_cfg.first_order_second_to_last, min_prompts=min_prompts)
            return {"sources": None, "edits": None, "targets": None, "prompts": [], "requirements": [], "keys": [],
                    "tasks": [], "meta": []}
        sources = self.policy.preprocess(batch["image"])
        seeds = [derive_seed(int(self.seed), EVAL_NOISE, key_hash(k)) for k in batch["key"]]
        with self.policy.adapter(ADAPTERS[cfg.adapter]):
            edits = edit_images(
                self.policy, sources, list(batch["prompt"]), seeds, steps=cfg.steps, solver=cfg.solver,
                batch_size=cfg.batch_size, first_order_second_to_last=self.rollout_cfg.first_order_second_to_last,
                min_prompts=min_prompts,
            ).images
        targets = self.policy.preprocess(batch["target"]) if batch.get("target") is not None else None
        return {
            "sources": sources,
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
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only adapter weights: a checkpoint's size does not grow with the base model."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if "lora_" in k}
        rng = [rng_states()]
        if self._world > 1:  # every rank's generators (dump_checkpoint runs on all ranks; rank 0 writes)
            import torch.distributed as dist

            rng = [None] * self._world
            dist.all_gather_object(rng, rng_states())
        checkpoint["editr1"] = {
            "rng": rng,
            "seed": self.seed,
            "rollouts_done": self.rollouts_done,
            "skipped_steps": self.skipped_steps,
            "nonfinite": [self.nonfinite_in_a_row, self.nonfinite_total],
            "adapters": adapters.adapter_names(self.policy.transformer),
            # what `editr1 export-lora` needs to write a diffusers LoRA without building the model
            "lora": {"r": self.lora_settings.rank, "lora_alpha": float(self.lora_settings.alpha),
                     "target_modules": list(self.lora_settings.target_modules)},
            "pipeline": type(self.policy.pipe).__name__,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("editr1", {})
        expected = adapters.adapter_names(self.policy.transformer)
        if extra.get("adapters") is not None and sorted(extra["adapters"]) != expected:
            raise ValueError(f"checkpoint has adapters {extra['adapters']}, this run has {expected} (the `ema` setting?)")
        lora_keys = {k for k in self.state_dict() if "lora_" in k}
        missing = lora_keys - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} adapter weights, e.g. {sorted(missing)[0]}")
        self.seed = extra.get("seed", self.seed)
        self.rollouts_done = extra.get("rollouts_done", 0)
        self.skipped_steps = extra.get("skipped_steps", 0)
        self.nonfinite_in_a_row, self.nonfinite_total = extra.get("nonfinite", [0, 0])
        rng = extra.get("rng")
        if rng:
            rank = self.global_rank if self._trainer is not None else 0
            set_rng_states(rng[rank] if rank < len(rng) else rng[0])
