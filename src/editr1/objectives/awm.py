"""Advantage Weighted Matching on rewarded rollouts: the flow-matching loss of pretraining on fresh noisings of
each kept rollout's clean latent, weighted by its advantage (:func:`editr1.algorithms.awm.awm_loss`), at the
rollout's own σ's as DiffusionNFT."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from editr1.algorithms.awm import awm_loss, matching_log_prob
from editr1.algorithms.flow_grpo import clipped_advantages
from editr1.algorithms.nft import add_noise
from editr1.algorithms.timesteps import train_timesteps
from editr1.objectives.base import Objective, Work
from editr1.objectives.flow_grpo import rollout_experience
from editr1.policies import lora as adapters
from editr1.seeding import TRAIN_NOISE, TRAIN_TIMESTEPS, per_sample_rand, per_sample_randn
from editr1.settings import AWMSettings
from editr1.training.rollout import Rollout

if TYPE_CHECKING:
    from editr1.module import EditR1Module


@dataclass
class _Step:
    rollout: Rollout
    idx: list[int]  # flat sample indices of the samples that get a loss
    advantages: torch.Tensor  # (G·K,) clip(A, ±c)·advantage_max/c
    timesteps: torch.Tensor  # (rounds, max(len(idx), 1))


class AWMObjective(Objective):
    """``model.objective: awm``: ODE rollouts, advantage-weighted flow matching."""

    name = "awm"
    needs = "rollouts"
    main_metric = "loss/policy"
    settings: AWMSettings

    @property
    def keep_old(self) -> float | None:  # on-policy: θ_old = θ after every step
        return 0.0 if self.settings.on_policy else None

    def group_settings(self) -> tuple[str, float]:
        return self.settings.std_mode, self.settings.adv_clip

    def prepare(self, module: EditR1Module, batch: dict) -> Work:
        exp = rollout_experience(self, module, batch)
        if exp is None:
            return Work(count=0, can_idle=False)
        ro, cfg = exp.rollout, self.settings
        idx = exp.decision.train_mask.flatten().nonzero().squeeze(1).tolist()
        train_sigmas = ro.sigmas[:-1]
        keys = per_sample_rand(train_sigmas.numel(), [ro.sample_seed(TRAIN_TIMESTEPS, i) for i in idx or [0]])
        ts = train_timesteps(cfg.timesteps, train_sigmas, keys, cfg.timestep_fraction, t_min=cfg.t_min, t_max=cfg.t_max)
        adv = clipped_advantages(exp.decision.r.flatten(), cfg.adv_clip) * (cfg.advantage_max / cfg.adv_clip)
        return Work(
            count=len(idx),
            rows=ro.num_groups,
            data=_Step(ro, idx, adv.to(module.device), ts),
            samples=ro.x0.shape[0],
            started=exp.started,
        )

    def micro_batch(self, module: EditR1Module, work: Work, positions: list[int], idle: bool, total: int) -> dict:
        step: _Step = work.data
        ro, cfg, policy, device = step.rollout, self.settings, module.policy, module.device
        sel = [0] if idle else [step.idx[p] for p in positions]
        sel_t = torch.tensor(sel, device=device)
        cond = ro.cond.select(ro.group_index[sel])
        x0, adv = ro.x0[sel_t], step.advantages[sel_t]
        rounds = step.timesteps.shape[0]
        factor = 0.0 if idle else module.loss_world_scale / (total * rounds)
        sums: Counter = Counter()
        for j in range(rounds):
            t = step.timesteps[j, positions].to(device)
            eps = per_sample_randn(x0.shape[1:], [ro.sample_seed(TRAIN_NOISE, i, j) for i in sel], device)
            x_t = add_noise(x0, eps, t)
            old = v_ref = None
            with torch.no_grad():
                if not cfg.on_policy:
                    with policy.adapter(adapters.OLD):
                        v_old = policy.velocity(x_t, t, cond)
                    old = matching_log_prob(v_old, eps, x0, t, cfg.weighting, cfg.ghuber_power)
                if cfg.kl_weight > 0:
                    with policy.adapter(None):
                        v_ref = policy.velocity(x_t, t, cond)
            v = policy.velocity(x_t, t, cond)
            out = awm_loss(
                v,
                eps,
                x0,
                t,
                adv,
                old_log_prob=old,
                clip_range=cfg.clip_range,
                weighting=cfg.weighting,
                power=cfg.ghuber_power,
                v_ref=v_ref,
            )
            module.manual_backward((out.policy.float() + cfg.kl_weight * out.kl).sum() * factor)
            if not idle:
                sums["policy"] += float(out.policy.detach().sum())
                sums["kl"] += float(out.kl.detach().sum())
                sums["ratio"] += float(out.ratio.detach().sum())
                sums["clipped"] += float(out.clipped.sum())
                sums["matching"] += float(-out.log_prob.detach().sum())
        return sums

    def metrics(self, module: EditR1Module, work: Work, sums: dict) -> dict[str, float]:
        denom = max(work.count, 1) * work.data.timesteps.shape[0]
        return {
            "loss": (sums["policy"] + self.settings.kl_weight * sums["kl"]) / denom,
            "loss/policy": sums["policy"] / denom,
            "loss/kl": sums["kl"] / denom,
            "loss/matching": sums["matching"] / denom,  # the weighted flow-matching error w(t, ℓ)
            "policy/ratio_mean": sums["ratio"] / denom,
            "policy/clip_frac": sums["clipped"] / denom,
            "policy/trained_samples": float(work.count),
        }
