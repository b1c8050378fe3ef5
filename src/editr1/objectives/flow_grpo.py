"""Flow-GRPO on rewarded SDE rollouts: the PPO-clipped ratio of each trained step's transition probability under
θ to the one θ_old sampled it with (stored in the rollout), with group-normalised advantages, and the KL of the
step's Gaussian to the reference's (:mod:`editr1.algorithms.flow_grpo`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from editr1.algorithms.flow_grpo import clipped_advantages, ppo_clipped, sde_kl, sde_step, train_steps
from editr1.objectives.base import Objective, Work
from editr1.sampling import SDESampling
from editr1.settings import FlowGRPOSettings
from editr1.training.experience import Experience
from editr1.training.rollout import Rollout

if TYPE_CHECKING:
    from editr1.module import EditR1Module


@dataclass
class _Step:
    rollout: Rollout
    idx: list[int]  # flat sample indices of the samples that get a loss
    advantages: torch.Tensor  # (G·K,) clip(A, ±c)
    steps: list[int]  # the denoising steps trained (the same for every sample, as the reference)


def rollout_experience(objective: Objective, module: EditR1Module, batch: dict) -> Experience | None:
    """The batch's experience (``None``: this process has no rollout and trains nothing), with the errors every
    objective trained on rewarded rollouts gives."""
    if "experience" not in batch:
        raise RuntimeError(
            f"no experience for this batch: the {objective.name} objective trains on rewarded rollouts, made by "
            "editr1.callbacks.RewardCallback (the `reward:` section of the config)"
        )
    exp: Experience = batch["experience"]
    if exp.rollout is None and module.sharded:
        raise RuntimeError(
            "this rank has no rollout (every prompt of its batch was banned or skipped) while others "
            "train: sharded training needs every rank to take part; use more prompts per rank or ban: false"
        )
    return exp if exp.rollout is not None else None


class FlowGRPOObjective(Objective):
    """``model.objective: flow_grpo``: SDE rollouts with per-step log-probabilities, PPO-clipped updates."""

    name = "flow_grpo"
    needs = "rollouts"
    main_metric = "loss/policy"
    settings: FlowGRPOSettings

    @property
    def keep_old(self) -> float | None:  # on-policy: θ_old = θ after every step
        return 0.0 if self.settings.on_policy else None

    @property
    def rollout_sde(self) -> SDESampling:
        return SDESampling(self.settings.noise_level, self.settings.sde_window)

    def group_settings(self) -> tuple[str, float]:
        return self.settings.std_mode, self.settings.adv_clip

    def prepare(self, module: EditR1Module, batch: dict) -> Work:
        exp = rollout_experience(self, module, batch)
        if exp is None:
            return Work(count=0, can_idle=False)
        ro = exp.rollout
        if ro.latents is None or ro.log_probs is None:
            raise RuntimeError("flow_grpo needs SDE rollouts with their trajectory (module.sample_groups makes them)")
        cfg = self.settings
        steps = train_steps(ro.sigmas.numel() - 1, cfg.timestep_fraction, cfg.sde_window)
        idx = exp.decision.train_mask.flatten().nonzero().squeeze(1).tolist()
        adv = clipped_advantages(exp.decision.r.flatten(), cfg.adv_clip).to(module.device, torch.float32)
        return Work(
            count=len(idx),
            rows=ro.num_groups,
            data=_Step(ro, idx, adv, steps),
            samples=ro.x0.shape[0],
            started=exp.started,
        )

    def micro_batch(self, module: EditR1Module, work: Work, positions: list[int], idle: bool, total: int) -> dict:
        step: _Step = work.data
        ro, cfg, policy, device = step.rollout, self.settings, module.policy, module.device
        sel = [0] if idle else [step.idx[p] for p in positions]
        sel_t = torch.tensor(sel, device=device)
        cond = ro.cond.select(ro.group_index[sel])
        adv = step.advantages[sel_t]
        sig = [float(s) for s in ro.sigmas]
        factor = 0.0 if idle else module.loss_world_scale / (total * len(step.steps))
        sums: Counter = Counter()
        for j in step.steps:  # one backward per trained step
            x, x_next = ro.latents[sel_t, j], ro.latents[sel_t, j + 1]
            t = torch.full((len(sel),), sig[j], device=device)
            v = policy.velocity(x, t, cond)
            out = sde_step(x, v, sig[j], sig[j + 1], sigma_max=sig[1], noise_level=cfg.noise_level, x_next=x_next)
            obj = ppo_clipped(out.log_prob, ro.log_probs[sel_t, j].to(device), adv, cfg.clip_range)
            kl = torch.zeros_like(obj.loss)
            if cfg.kl_weight > 0:
                with torch.no_grad(), policy.adapter(None):
                    v_ref = policy.velocity(x, t, cond)
                mean_ref = sde_step(
                    x, v_ref, sig[j], sig[j + 1], sigma_max=sig[1], noise_level=cfg.noise_level, x_next=x_next
                ).mean
                kl = sde_kl(out.mean, mean_ref, out.std_t)
            module.manual_backward((obj.loss + cfg.kl_weight * kl).sum() * factor)
            if not idle:
                log_ratio = (out.log_prob - ro.log_probs[sel_t, j].to(device)).detach()
                sums["policy"] += float(obj.loss.detach().sum())
                sums["kl"] += float(kl.detach().sum())
                sums["ratio"] += float(obj.ratio.detach().sum())
                sums["clipped"] += float(obj.clipped.sum())
                sums["approx_kl"] += float(0.5 * (log_ratio**2).sum())
        return sums

    def metrics(self, module: EditR1Module, work: Work, sums: dict) -> dict[str, float]:
        denom = max(work.count, 1) * len(work.data.steps)
        return {
            "loss": (sums["policy"] + self.settings.kl_weight * sums["kl"]) / denom,
            "loss/policy": sums["policy"] / denom,
            "loss/kl": sums["kl"] / denom,
            "policy/ratio_mean": sums["ratio"] / denom,
            "policy/clip_frac": sums["clipped"] / denom,
            "policy/approx_kl": sums["approx_kl"] / denom,
            "policy/trained_samples": float(work.count),
        }
