"""Rewards of a group → advantages → optimality probability r, and the low-variance group filter.

Pure torch, no Lightning. Rewards of one optimisation step are a ``(G, K)`` tensor: G groups (one
prompt each) of K edits. NaN marks a sample that could not be judged; it never becomes a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

STD_EPS = 1e-4

StdMode = Literal["global", "group"]
FilterRule = Literal["paper", "strict", "none"]
NanPolicy = Literal["group", "sample"]


def group_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and population std (ddof = 0) of ``(G, K)`` rewards, ignoring NaN.

    A group with no finite reward gets NaN for both.
    """
    _check_rewards(rewards)
    finite = torch.isfinite(rewards)
    count = finite.sum(dim=1)
    filled = torch.where(finite, rewards, torch.zeros_like(rewards))
    mean = filled.sum(dim=1) / count.clamp(min=1)
    sq = torch.where(finite, (rewards - mean[:, None]) ** 2, torch.zeros_like(rewards))
    std = (sq.sum(dim=1) / count.clamp(min=1)).sqrt()
    empty = count == 0
    nan = torch.full_like(mean, float("nan"))
    return torch.where(empty, nan, mean), torch.where(empty, nan, std)


def global_std(rewards: torch.Tensor) -> torch.Tensor:
    """Population std over every finite reward (NaN when there is none)."""
    finite = rewards[torch.isfinite(rewards)]
    return finite.std(unbiased=False) if finite.numel() > 0 else rewards.new_tensor(float("nan"))


def advantages(
    rewards: torch.Tensor, std_mode: StdMode = "global", step_std: torch.Tensor | None = None
) -> torch.Tensor:
    """``A = (R − mean of its group) / (std + 1e-4)`` for ``(G, K)`` rewards.

    ``std_mode="global"``: std over all finite rewards of the step (population std) — the default;
    pass ``step_std`` when the step's rewards span several processes (gathered first).
    ``std_mode="group"``: each group's own std. NaN rewards give NaN advantages.
    """
    mean, group_std = group_stats(rewards)
    if std_mode == "global":
        std = global_std(rewards) if step_std is None else step_std.to(rewards)
        denom = std + STD_EPS
    elif std_mode == "group":
        denom = group_std[:, None] + STD_EPS
    else:
        raise ValueError(f"std_mode must be 'global' or 'group', got {std_mode!r}")
    return (rewards - mean[:, None]) / denom


def optimality_probability(adv: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """``r = clamp(clip(A, ±c) / (2c) + 0.5, 0, 1)``; NaN stays NaN."""
    if clip <= 0:
        raise ValueError(f"advantage clip must be positive, got {clip}")
    r = adv.clamp(-clip, clip) / (2 * clip) + 0.5
    return r.clamp(0.0, 1.0)


def low_variance_drop(
    mean: torch.Tensor,
    std: torch.Tensor,
    rule: FilterRule = "paper",
    mean_threshold: float = 0.9,
    std_threshold: float = 0.05,
) -> torch.Tensor:
    """Which groups the low-variance filter drops (bool, shape ``(G,)``).

    ``paper``: drop when ``mean > τμ and std < τσ`` (all high and nearly equal).
    ``strict`` (the reference code): keep only when ``std > τσ and mean < τμ``.
    ``none``: drop nothing. A group whose statistics are NaN is not judged here (see ``nan_policy``).
    """
    finite = torch.isfinite(mean) & torch.isfinite(std)
    if rule == "paper":
        drop = (mean > mean_threshold) & (std < std_threshold)
    elif rule == "strict":
        drop = ~((std > std_threshold) & (mean < mean_threshold))
    elif rule == "none":
        drop = torch.zeros_like(mean, dtype=torch.bool)
    else:
        raise ValueError(f"filter rule must be 'paper', 'strict' or 'none', got {rule!r}")
    return drop & finite


@dataclass
class GroupDecision:
    """What one step trains on. All tensors are on the rewards' device.

    ``r``: ``(G, K)`` optimality probability (NaN where the reward is NaN).
    ``train_mask``: ``(G, K)`` samples that get a loss.
    ``dropped_low_variance`` / ``dropped_nan``: ``(G,)`` groups removed and why.
    """

    r: torch.Tensor
    train_mask: torch.Tensor
    dropped_low_variance: torch.Tensor
    dropped_nan: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.r.shape[0])

    @property
    def frac_groups_dropped(self) -> float:
        dropped = self.dropped_low_variance | self.dropped_nan
        return float(dropped.float().mean()) if self.num_groups else 0.0


def decide(
    rewards: torch.Tensor,
    *,
    std_mode: StdMode = "global",
    adv_clip: float = 5.0,
    rule: FilterRule = "paper",
    mean_threshold: float = 0.9,
    std_threshold: float = 0.05,
    nan_policy: NanPolicy = "group",
    step_std: torch.Tensor | None = None,
) -> GroupDecision:
    """Advantages, r and the filter for one step's ``(G, K)`` rewards (all ranks gathered).

    ``nan_policy="group"`` drops every group that holds a NaN reward; ``"sample"`` drops only the
    NaN samples and keeps the rest of their group. Either way a NaN sample gets no loss.
    Statistics (group means, the global std) are computed over finite rewards only; ``step_std``
    overrides the global std (all ranks' rewards).
    """
    if nan_policy not in ("group", "sample"):
        raise ValueError(f"nan_policy must be 'group' or 'sample', got {nan_policy!r}")
    mean, std = group_stats(rewards)
    r = optimality_probability(advantages(rewards, std_mode, step_std), adv_clip)
    finite = torch.isfinite(rewards)
    if nan_policy == "group":
        dropped_nan = ~finite.all(dim=1)
    else:
        dropped_nan = ~finite.any(dim=1)
    dropped_lv = low_variance_drop(mean, std, rule, mean_threshold, std_threshold) & ~dropped_nan
    keep_group = ~(dropped_lv | dropped_nan)
    train_mask = keep_group[:, None] & finite
    return GroupDecision(r, train_mask, dropped_lv, dropped_nan, mean, std)


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (groups, group_size), got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
