"""Reward models used only by the multi-process tests (imported by the spawned `editr1 fit` processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from editr1.rewards import SceneReward
from editr1.rewards.base import RewardInputs


class RankOneSaturated(SceneReward):
    """The scene reward on rank 0; a constant 1.0 on rank 1, so every group of rank 1 has mean 1 and
    std 0 and the low-variance filter drops all of them."""

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        if dist.is_initialized() and dist.get_rank() == 1:
            return torch.ones(len(inputs.instructions))
        return super().score(inputs)
