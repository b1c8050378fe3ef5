"""The one object the reward stage hands ``training_step``: a process's rollout, its rewards and the
filter's decision for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editr1.algorithms.grouping import GroupDecision, decide
from editr1.training.rollout import Rollout


@dataclass
class Experience:
    """What one process trains on in one step, made by :class:`editr1.callbacks.RewardCallback` and put in
    the batch under ``"experience"``; ``training_step`` only reads it.

    Attributes:
        rollout: this process's groups (K edits per prompt, their clean latents and conditions); ``None``
            when the process had no prompt left in the batch (all banned or unreadable) — it still takes part
            in the step's collectives and trains nothing.
        rewards: ``(G, K)`` rewards of this process's groups, NaN where the reward model could not judge.
        decision: this process's rows of the step's decision, made over every process's rewards: the
            optimality probability ``r``, the ``train_mask`` of samples that get a loss, which groups were
            dropped and why, which are banned, and the group statistics.
        components: under a combined reward's ``combine: advantage_sum``, each component's ``(G, K)`` scores of
            this process's groups (``rewards`` is then their weighted mean and ``decision.r`` comes from the
            sum of their advantages); ``None`` otherwise.
    """

    rollout: Rollout | None
    rewards: torch.Tensor
    decision: GroupDecision
    started: float | None = None  # time.perf_counter() when the reward stage began (for time/step_s)
    components: dict[str, torch.Tensor] | None = None

    @classmethod
    def nothing(cls, group_size: int) -> Experience:
        """A process with no rollout this step."""
        empty = torch.empty(0, group_size)
        return cls(None, empty, decide(empty))

    @property
    def trainable(self) -> int:
        """Samples of this process that get a loss."""
        return int(self.decision.train_mask.sum()) if self.rollout is not None else 0
