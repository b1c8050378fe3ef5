"""Supervised flow matching of θ towards each row's target image (no rollouts, no reward)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from editr1.algorithms.flow_matching import flow_matching_loss
from editr1.algorithms.nft import add_noise
from editr1.algorithms.timesteps import continuous_timesteps
from editr1.editing import encode_padded
from editr1.objectives.base import Objective, Work
from editr1.policies.base import Condition
from editr1.seeding import TRAIN_NOISE, TRAIN_TIMESTEPS, per_sample_rand, per_sample_randn
from editr1.settings import SFTSettings
from editr1.training import distributed
from editr1.training.rollout import group_ids, sample_seed

if TYPE_CHECKING:
    from editr1.module import EditR1Module


@dataclass
class _Rows:
    cond: Condition
    x0: torch.Tensor  # (n, *latent) clean target latents
    t: torch.Tensor  # (n,) timesteps
    ids: list[tuple[int, int]]
    step: int


class SFTObjective(Objective):
    """``model.objective: sft``: needs rows with a ``target`` image; θ_old tracks θ exactly."""

    name = "sft"
    needs = "targets"
    main_metric = "loss/sft"
    keep_old = 0.0
    settings: SFTSettings

    def prepare(self, module: EditR1Module, batch: dict) -> Work:
        if batch.get("target") is None:
            raise ValueError(
                "objective 'sft' needs target images: use the synthetic scenes, give JSONL rows a `target` (shards a "
                "`tgt` image), and keep data.targets at 'require' (the CLI's choice for sft) so rows without one are "
                "skipped"
            )
        policy, world, device = module.policy, module.world_size, module.device
        prompts, keys = list(batch["prompt"]), list(batch["key"])
        n = len(prompts)
        if module.sharded and distributed.any_process(n == 0, world=world, device=device):  # on every rank at once
            raise RuntimeError(
                "a process has no readable row in this batch: sharded supervised training needs "
                "every process to train; use more rows per process (data.batch_size) or shard: false"
            )
        if n == 0:  # every row of this batch was unreadable (counted): take part in the step, train nothing
            return Work(count=0, can_idle=False)
        with torch.no_grad():  # sharded encoders: equal calls on every process
            min_prompts = int(distributed.reduce(n, "max", world=world, device=device)) if module.sharded else 0
            sources = policy.preprocess(batch["image"])
            cond = encode_padded(policy, sources, prompts, min_prompts, batch.get("references")).select(torch.arange(n))
            x0 = policy.encode_images(policy.preprocess(batch["target"]))
        ids = group_ids(keys)
        step = module.global_step
        keys_t = per_sample_rand(1, [sample_seed(int(module.seed), TRAIN_TIMESTEPS, step, ids, 1, i) for i in range(n)])
        t = continuous_timesteps(keys_t[:, 0], self.settings.timesteps)
        return Work(count=n, rows=n, data=_Rows(cond, x0, t, ids, step), samples=n)

    def micro_batch(self, module: EditR1Module, work: Work, positions: list[int], idle: bool, total: int) -> dict:
        rows: _Rows = work.data
        idx = torch.zeros(1, dtype=torch.long) if idle else torch.tensor(positions, dtype=torch.long)
        seeds = [sample_seed(int(module.seed), TRAIN_NOISE, rows.step, rows.ids, 1, int(i)) for i in idx]
        eps = per_sample_randn(rows.x0.shape[1:], seeds, module.device)
        t = rows.t[idx].to(module.device)
        x0 = rows.x0[idx.to(rows.x0.device)]
        x_t = add_noise(x0, eps, t)
        v = module.policy.velocity(x_t, t, rows.cond.select(idx))
        loss = flow_matching_loss(v, eps, x0)
        module.manual_backward(loss.sum() * (0.0 if idle else module.loss_world_scale / total))
        return {"loss": float(loss.detach().sum())}

    def metrics(self, module: EditR1Module, work: Work, sums: dict) -> dict[str, float]:
        return {"loss": sums["loss"] / work.count, "loss/sft": sums["loss"] / work.count}
