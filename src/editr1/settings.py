"""Every settings dataclass of a run, each field documented (``editr1 fit --help`` shows these texts).

They are the typed sections of the config: ``model.rollout`` (:class:`RolloutSettings`), ``model.nft``
(:class:`NFTSettings`), ``model.flow_grpo`` (:class:`FlowGRPOSettings`), ``model.awm`` (:class:`AWMSettings`),
``model.sft``, ``model.old_policy``, ``model.optim``, ``model.evaluation``,
``model.efficiency`` and ``reward.filter`` (:class:`FilterSettings`); ``model.lora`` is
:class:`editr1.policies.lora.LoraSettings`. All are frozen and validated when built, so a bad value stops
the run before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from editr1.algorithms.awm import Weighting
from editr1.algorithms.grouping import FilterRule, NanPolicy, StdMode
from editr1.algorithms.timesteps import TimestepMode
from editr1.sampling import Solver

FILTER_RULES = ("paper", "strict", "none")


@dataclass(frozen=True)
class RolloutSettings:
    """How the rollout policy θ_old samples a group of edits per prompt (CFG-free, deterministic ODE).

    Attributes:
        group_size: K, edits per prompt (the paper: 12).
        steps: solver steps (the paper: 6).
        solver: ``dpmpp_2m`` (DPM-Solver++(2M) in x0 space) or ``euler``.
        batch_size: samples per denoising forward pass.
        first_order_second_to_last: DPM-Solver++ orders. ``false``: first order on the first and the last
            step only, [1, 2, 2, 2, 2, 1] at 6 steps (the released code and diffusers); ``true``: also on the
            second-to-last step below 15 steps (editr1's earlier default).
    """

    group_size: int = 12
    steps: int = 6
    solver: Solver = "dpmpp_2m"
    batch_size: int = 12
    first_order_second_to_last: bool = False

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("rollout group_size, steps and batch_size must all be >= 1")


@dataclass(frozen=True)
class NFTSettings:
    """The DiffusionNFT objective (DESIGN.md section 2).

    Attributes:
        beta: β, how far the implicit positive and negative policies move from θ_old.
        adv_clip: c, advantages are clipped to ±c; also the loss scale.
        std_mode: the advantages' normaliser: the std of the whole step (``global``) or each group's own.
        kl_weight: λ_KL on mean((v_θ − v_ref)²) towards the frozen base; 0 skips the reference forward.
        timesteps: ``rollout`` (the rollout's own σ's, permuted per sample), ``uniform`` or ``logit_normal``.
        timestep_fraction: train each sample on int(steps × fraction) timesteps (the released code's rule).
        t_min: lower end of t in the continuous timestep modes.
        t_max: upper end of t in the continuous timestep modes.
        micro_batch_size: samples per forward/backward (a memory knob; results do not depend on it with
            ``normalize: kept``).
        normalize: ``kept``: every kept sample of the step weighs 1/kept. ``reference``: the released code's
            per-micro-batch means over the kept samples of shuffled micro-batches (filtered ones included),
            divided by the number of micro-batches (more filtering, smaller steps; an all-filtered step still
            takes an optimiser step on a zero gradient). Filtered samples are never computed in either mode.
    """

    beta: float = 1.0
    adv_clip: float = 5.0
    std_mode: StdMode = "global"
    kl_weight: float = 1e-4
    timesteps: TimestepMode = "rollout"
    timestep_fraction: float = 0.99
    t_min: float = 0.0
    t_max: float = 1.0
    micro_batch_size: int = 4
    normalize: Literal["kept", "reference"] = "kept"

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.adv_clip <= 0 or self.kl_weight < 0 or self.micro_batch_size < 1:
            raise ValueError("nft: beta and adv_clip must be > 0, kl_weight >= 0, micro_batch_size >= 1")
        if self.normalize not in ("kept", "reference"):
            raise ValueError(f"nft.normalize must be 'kept' or 'reference', got {self.normalize!r}")


@dataclass(frozen=True)
class FlowGRPOSettings:
    """Flow-GRPO on SDE rollouts (``objective: flow_grpo``). Defaults are the released code's
    (yifan123/flow_grpo: ``config/base.py``, and ``config/grpo.py`` for β_KL and the timestep fraction).

    Attributes:
        noise_level: a in σ_t = a·sqrt(t/(1 − t)) of the rollout SDE (``sample.noise_level`` 0.7).
        sde_window: ``[start, stop]``: the SDE only on rollout steps start … stop − 1, Euler ODE elsewhere, and
            training only there (the "Fast" variant); ``null``: every step (the reference).
        clip_range: ε of the PPO ratio clip ``clip(ρ, 1 − ε, 1 + ε)`` (``train.clip_range`` 1e-4).
        adv_clip: advantages are clipped to ±adv_clip (``train.adv_clip_max`` 5).
        std_mode: the advantages' normaliser: the std of the whole step (``global``, ``sample.global_std``) or
            each group's own; the mean is always the group's (per-prompt stat tracking).
        kl_weight: β_KL on the KL of the step's Gaussians to the reference's (``train.beta`` 0.04 in the
            GenEval/OCR recipes, 0.01 PickScore, 0 in base.py); 0 skips the reference forward.
        timestep_fraction: train each sample on the first int(n × fraction) SDE steps (0.99 in the recipes).
        on_policy: θ_old (which samples the rollouts) copies θ after every optimiser step, so the ratio is 1 on
            the step's update as in the reference's first update per rollout; ``false``: θ_old follows the
            ``old_policy`` schedule and the clip acts.
        micro_batch_size: samples per forward/backward.
    """

    noise_level: float = 0.7
    sde_window: tuple[int, int] | None = None
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    std_mode: StdMode = "global"
    kl_weight: float = 0.04
    timestep_fraction: float = 0.99
    on_policy: bool = True
    micro_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.noise_level <= 0 or self.clip_range <= 0 or self.adv_clip <= 0 or self.kl_weight < 0:
            raise ValueError("flow_grpo: noise_level, clip_range and adv_clip must be > 0 and kl_weight >= 0")
        if not 0.0 < self.timestep_fraction <= 1.0 or self.micro_batch_size < 1:
            raise ValueError("flow_grpo: timestep_fraction must be in (0, 1] and micro_batch_size >= 1")


@dataclass(frozen=True)
class AWMSettings:
    """Advantage Weighted Matching on ODE rollouts (``objective: awm``). Defaults are the released recipe's
    (scxue/advantage_weighted_matching, ``config/dgx_awm.py``, GenEval) unless noted.

    Attributes:
        weighting: w of log p = −w(t, ℓ) for the flow-matching error ℓ: ``uniform`` (the paper's plain loss),
            ``t``, ``t2`` or ``ghuber`` (the recipe's robust t·((ℓ + 1e-10)^p − 1e-10^p)/p).
        ghuber_power: p of ``ghuber`` (0.25).
        clip_range: ε of the ratio clip (``train.clip_range`` 1).
        adv_clip: advantages are clipped to ±adv_clip (``train.adv_clip_max`` 5) ...
        advantage_max: ... then scaled to ±advantage_max (``train.advantage_max`` 1).
        std_mode: the advantages' normaliser (``sample.global_std``: ``global``).
        kl_weight: λ on mean((v_θ − v_ref)²) to the frozen base (``train.beta`` 0.001, ``kl_weight: Uniform``).
        timesteps: training timesteps, as ``nft.timesteps`` (``rollout``: the rollout's own σ's, permuted).
        timestep_fraction: train each sample on int(steps × fraction) timesteps (``train.timestep_fraction`` 0.9).
        t_min: lower end of t in the continuous timestep modes.
        t_max: upper end of t in the continuous timestep modes.
        on_policy: log p_old is log p detached (the recipe's ``off_policy: false``; ρ = 1) and θ_old copies θ
            after each step; ``false``: log p_old from θ_old (one more forward) on the ``old_policy`` schedule.
        micro_batch_size: samples per forward/backward.
    """

    weighting: Weighting = "ghuber"
    ghuber_power: float = 0.25
    clip_range: float = 1.0
    adv_clip: float = 5.0
    advantage_max: float = 1.0
    std_mode: StdMode = "global"
    kl_weight: float = 0.001
    timesteps: TimestepMode = "rollout"
    timestep_fraction: float = 0.9
    t_min: float = 0.0
    t_max: float = 1.0
    on_policy: bool = True
    micro_batch_size: int = 4

    def __post_init__(self) -> None:
        if min(self.ghuber_power, self.clip_range, self.adv_clip, self.advantage_max) <= 0 or self.kl_weight < 0:
            raise ValueError("awm: ghuber_power, clip_range, adv_clip and advantage_max must be > 0, kl_weight >= 0")
        if self.weighting not in ("uniform", "t", "t2", "ghuber"):
            raise ValueError(f"awm.weighting must be uniform, t, t2 or ghuber, got {self.weighting!r}")
        if not 0.0 < self.timestep_fraction <= 1.0 or self.micro_batch_size < 1:
            raise ValueError("awm: timestep_fraction must be in (0, 1] and micro_batch_size >= 1")


@dataclass(frozen=True)
class SFTSettings:
    """Supervised flow matching on (source, instruction, target) rows (``objective: sft``).

    Attributes:
        timesteps: the distribution of t, ``uniform`` or ``logit_normal``.
        micro_batch_size: samples per forward/backward.
    """

    timesteps: Literal["uniform", "logit_normal"] = "logit_normal"
    micro_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError("sft.micro_batch_size must be >= 1")


@dataclass(frozen=True)
class OldPolicySettings:
    """θ_old ← η·θ_old + (1 − η)·θ after each optimiser step, η = 0 before ``delay``, then
    min(rate·(step − delay), cap). The paper: rate 0.001, cap 0.5, delay 0.

    Attributes:
        rate: growth of η per optimiser step.
        cap: the largest η.
        delay: steps with η = 0 (θ_old copies θ exactly).
    """

    rate: float = 0.001
    cap: float = 0.5
    delay: int = 0

    def __post_init__(self) -> None:
        if self.rate < 0 or not 0.0 <= self.cap <= 1.0 or self.delay < 0:
            raise ValueError(
                f"old_policy: need rate >= 0, 0 <= cap <= 1 and delay >= 0, got {self.rate}, {self.cap}, {self.delay}"
            )


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser of the LoRA weights.

    Attributes:
        name: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes).
        lr: learning rate.
        betas: Adam betas.
        weight_decay: decoupled weight decay.
        eps: Adam epsilon.
        grad_clip: largest global gradient norm (0: no clipping).
        warmup_steps: linear learning-rate warm-up steps.
        max_nonfinite_steps: steps in a row with a non-finite loss or gradient that are skipped before the
            run stops with a checkpoint.
        max_idle_steps: steps in a row that trained nothing, whatever the cause (every group filtered,
            banned, unjudged or unreadable), before the run stops with a checkpoint and a message (0: never).
    """

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    max_nonfinite_steps: int = 3
    max_idle_steps: int = 20

    def __post_init__(self) -> None:
        if self.max_nonfinite_steps < 1 or self.max_idle_steps < 0:
            raise ValueError("optim.max_nonfinite_steps must be >= 1 and optim.max_idle_steps >= 0")


@dataclass(frozen=True)
class EvalSettings:
    """How validate, test and predict edit: one edit per prompt with fixed per-prompt seeds.

    Attributes:
        steps: solver steps.
        solver: ``euler`` or ``dpmpp_2m``.
        adapter: which policy edits: ``default`` (θ), ``old``, ``ema`` or ``reference`` (the base).
        batch_size: samples per denoising forward pass.
    """

    steps: int = 15
    solver: Solver = "euler"
    adapter: Literal["default", "old", "ema", "reference"] = "default"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"evaluation steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")


@dataclass(frozen=True)
class EfficiencySettings:
    """Speed and memory switches for the transformer, all off by default; none changes the algorithm
    (``tests/test_efficiency.py`` compares losses and gradients with each on and off).

    Attributes:
        activation_checkpointing: recompute each block's activations in backward (less memory, about one
            more forward).
        compile: ``torch.compile`` the transformer in place (slow first steps; one graph per adapter).
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` to debug).
        autocast: ``bf16`` autocasts every transformer forward (the weights stay as loaded), or ``no``.
    """

    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    autocast: Literal["no", "bf16"] = "no"

    def __post_init__(self) -> None:
        if self.autocast not in ("no", "bf16"):
            raise ValueError(f"efficiency.autocast must be 'no' or 'bf16', got {self.autocast!r}")


@dataclass(frozen=True)
class FilterSettings:
    """The low-variance group filter and prompt bans (DESIGN.md section 2).

    Attributes:
        rule: ``paper``: drop a group when mean > τμ and std < τσ; ``strict`` (the released code's mask):
            keep it only when std > τσ and mean < τμ; ``none``: drop nothing.
        mean_threshold: τμ.
        std_threshold: τσ.
        ban: never roll a prompt out again once the ban rule marks its group.
        ban_rule: which groups are banned (with ``ban: true``); ``null``: the same rule as ``rule``. The
            released code masks with ``strict`` and bans with ``paper``.
        nan_policy: a reward that could not be judged drops its whole ``group`` or only the ``sample``.
        group_by: ``key``: one (source image, instruction) row is one group; ``instruction``: every row of
            the step with the same instruction text shares one mean and std, and bans ban the instruction
            (the released code's keying).
    """

    rule: FilterRule = "paper"
    mean_threshold: float = 0.9
    std_threshold: float = 0.05
    ban: bool = False
    ban_rule: FilterRule | None = None
    nan_policy: NanPolicy = "group"
    group_by: Literal["key", "instruction"] = "key"

    def __post_init__(self) -> None:
        if self.rule not in FILTER_RULES or (self.ban_rule is not None and self.ban_rule not in FILTER_RULES):
            raise ValueError(
                f"reward.filter.rule and ban_rule must be one of {FILTER_RULES}, got {self.rule!r}, {self.ban_rule!r}"
            )
        if self.group_by not in ("key", "instruction"):
            raise ValueError(f"reward.filter.group_by must be 'key' or 'instruction', got {self.group_by!r}")
