"""DiffusionNFT on rewarded rollouts (Edit-R1): the loss of :func:`editr1.algorithms.nft.nft_loss` on fresh
noisings of each kept rollout's clean latent, at the rollout's own σ's."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from editr1.algorithms.nft import add_noise, nft_loss, old_policy_eta, reference_sample_weights
from editr1.algorithms.timesteps import train_timesteps
from editr1.objectives.base import Objective, Work
from editr1.policies import lora as adapters
from editr1.seeding import TRAIN_NOISE, TRAIN_SHUFFLE, TRAIN_TIMESTEPS, per_sample_rand, per_sample_randn
from editr1.settings import NFTSettings
from editr1.training.experience import Experience
from editr1.training.rollout import Rollout

if TYPE_CHECKING:
    from editr1.module import EditR1Module


@dataclass
class _Step:
    rollout: Rollout
    idx: list[int]  # flat sample indices of the samples that get a loss
    r: torch.Tensor  # (G·K,) optimality probability
    timesteps: torch.Tensor  # (rounds, max(len(idx), 1))
    weights: torch.Tensor | None  # per kept sample (normalize: reference), else None


class NFTObjective(Objective):
    """Edit-R1's objective: needs rollouts scored by the reward stage (``batch["experience"]``)."""

    name = "nft"
    needs = "rollouts"
    main_metric = "loss/policy"
    settings: NFTSettings

    @property
    def steps_without_samples(self) -> bool:
        return self.settings.normalize == "reference"  # the released code steps on a zero gradient

    def group_settings(self) -> tuple[str, float]:
        return self.settings.std_mode, self.settings.adv_clip

    def prepare(self, module: EditR1Module, batch: dict) -> Work:
        if "experience" not in batch:
            raise RuntimeError(
                "no experience for this batch: the nft objective trains on rewarded rollouts, made by "
                "editr1.callbacks.RewardCallback (the `reward:` section of the config)"
            )
        exp: Experience = batch["experience"]
        ro = exp.rollout
        if ro is None:
            if module.sharded:
                raise RuntimeError(
                    "this rank has no rollout (every prompt of its batch was banned or skipped) while others "
                    "train: sharded training needs every rank to take part; use more prompts per rank or ban: false"
                )
            return Work(count=0, can_idle=False)
        nft = self.settings
        idx = exp.decision.train_mask.flatten().nonzero().squeeze(1).tolist()
        train_sigmas = ro.sigmas[:-1]
        keys = per_sample_rand(train_sigmas.numel(), [ro.sample_seed(TRAIN_TIMESTEPS, i) for i in idx or [0]])
        ts = train_timesteps(nft.timesteps, train_sigmas, keys, nft.timestep_fraction, t_min=nft.t_min, t_max=nft.t_max)
        weights = None  # normalize "kept": every kept sample weighs 1 / (kept samples of all processes)
        if nft.normalize == "reference":
            n_local = ro.x0.shape[0]
            order = per_sample_rand(1, [ro.sample_seed(TRAIN_SHUFFLE, i) for i in range(n_local)])[:, 0].argsort()
            weights = reference_sample_weights(
                exp.decision.train_mask.flatten().cpu(), order, nft.micro_batch_size, module.world_size
            )
            weights = weights[torch.tensor(idx, dtype=torch.long)].to(module.device)
        r = exp.decision.r.flatten().to(module.device)
        return Work(
            count=len(idx),
            rows=ro.num_groups,
            data=_Step(ro, idx, r, ts, weights),
            samples=ro.x0.shape[0],
            started=exp.started,
        )

    def micro_batch(self, module: EditR1Module, work: Work, positions: list[int], idle: bool, total: int) -> dict:
        step: _Step = work.data
        ro, nft, policy, device = step.rollout, self.settings, module.policy, module.device
        sel = [0] if idle else [step.idx[p] for p in positions]  # idle: any sample, its loss multiplied by 0
        b = len(sel)
        sel_t = torch.tensor(sel, device=device)
        cond = ro.cond.select(ro.group_index[sel])
        x0 = ro.x0[sel_t]
        r = step.r[sel_t]
        w = None if step.weights is None or idle else step.weights[positions]
        rounds = step.timesteps.shape[0]
        scale = module.loss_world_scale / (total * rounds)
        sums: Counter = Counter()
        for j in range(rounds):
            t = step.timesteps[j, positions].to(device)
            eps = per_sample_randn(x0.shape[1:], [ro.sample_seed(TRAIN_NOISE, i, j) for i in sel], device)
            x_t = add_noise(x0, eps, t)
            with torch.no_grad():
                with policy.adapter(adapters.OLD):
                    v_old = policy.velocity(x_t, t, cond)
                v_ref = None
                if nft.kl_weight > 0:
                    with policy.adapter(None):
                        v_ref = policy.velocity(x_t, t, cond)
            v_theta = policy.velocity(x_t, t, cond)
            out = nft_loss(
                v_theta,
                v_old,
                x_t,
                x0,
                t,
                r,
                beta=nft.beta,
                adv_clip=nft.adv_clip,
                v_ref=v_ref,
                kl_weight=nft.kl_weight,
                weights=w,
            )
            if w is None:
                factor = 0.0 if idle else b * scale
            else:  # out.loss is the w-weighted mean: times Σw gives Σ w·(policy + λ·kl)
                factor = float(w.sum()) * module.loss_world_scale / rounds
            module.manual_backward(out.loss * factor)
            if not idle:
                sums["policy"] += float(out.policy.detach().sum())
                sums["kl"] += float(out.kl.detach().sum())
                sums["old_deviation"] += float(out.old_deviation.sum())
        return sums

    def metrics(self, module: EditR1Module, work: Work, sums: dict) -> dict[str, float]:
        step: _Step = work.data
        denom = max(work.count, 1) * step.timesteps.shape[0]
        old = module.old_policy
        return {
            "loss": (sums["policy"] + self.settings.kl_weight * sums["kl"]) / denom,  # what the step minimised
            "loss/policy": sums["policy"] / denom,
            "loss/kl": sums["kl"] / denom,
            "nft/old_deviation": sums["old_deviation"] / denom,
            "nft/eta": old_policy_eta(module.global_step, old.rate, old.cap, old.delay),
            "nft/trained_samples": float(work.count),
        }
