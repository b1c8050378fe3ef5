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


def pool_index(labels: list) -> torch.Tensor:
    """``(G,)`` integer ids of ``labels`` (any hashable, e.g. instruction texts): rows with equal labels
    share an id, numbered by first appearance. Used to pool groups that share an instruction."""
    ids: dict = {}
    return torch.tensor([ids.setdefault(x, len(ids)) for x in labels], dtype=torch.long)


def group_stats(rewards: torch.Tensor, pool: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and population std (ddof = 0) of ``(G, K)`` rewards, ignoring NaN, in float64
    whatever the rewards' dtype (an all-equal group has std exactly 0 and mean exactly its value).

    ``pool`` (``(G,)`` ids, see :func:`pool_index`): groups with the same id share one mean and std over
    all their samples (the reference code keys its statistics by instruction text, so two rows with the
    same instruction pool). A group with no finite reward gets NaN for both.
    """
    _check_rewards(rewards)
    x = rewards.double()
    finite = torch.isfinite(x)
    filled = torch.where(finite, x, torch.zeros_like(x))
    if pool is None:
        count, total = finite.sum(dim=1), filled.sum(dim=1)
        mean = total / count.clamp(min=1)
        sq = torch.where(finite, (x - mean[:, None]) ** 2, torch.zeros_like(x)).sum(dim=1)
    else:
        pool = _check_pool(pool, x)
        n = int(pool.max()) + 1 if pool.numel() else 0
        count = torch.zeros(n, dtype=torch.long, device=x.device).index_add_(0, pool, finite.sum(dim=1))
        total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, pool, filled.sum(dim=1))
        mean = (total / count.clamp(min=1))[pool]
        dev = torch.where(finite, (x - mean[:, None]) ** 2, torch.zeros_like(x)).sum(dim=1)
        sq = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, pool, dev)[pool]
        count = count[pool]
    std = (sq / count.clamp(min=1)).sqrt()
    empty = count == 0
    nan = torch.full_like(mean, float("nan"))
    return torch.where(empty, nan, mean), torch.where(empty, nan, std)


def global_std(rewards: torch.Tensor) -> torch.Tensor:
    """Population std over every finite reward, in float64 (NaN when there is none)."""
    finite = rewards[torch.isfinite(rewards)].double()
    return finite.std(unbiased=False) if finite.numel() > 0 else rewards.new_tensor(float("nan"), dtype=torch.float64)


def advantages(
    rewards: torch.Tensor,
    std_mode: StdMode = "global",
    step_std: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A = (R − mean of its group) / (std + 1e-4)`` for ``(G, K)`` rewards, in float64.

    ``std_mode="global"``: std over all finite rewards of the step (population std) — the default;
    pass ``step_std`` when the step's rewards span several processes (gathered first).
    ``std_mode="group"``: each group's own std. NaN rewards give NaN advantages. ``pool``: see
    :func:`group_stats`.
    """
    mean, group_std = group_stats(rewards, pool)
    if std_mode == "global":
        std = global_std(rewards) if step_std is None else step_std.to(device=rewards.device, dtype=torch.float64)
        denom = std + STD_EPS
    elif std_mode == "group":
        denom = group_std[:, None] + STD_EPS
    else:
        raise ValueError(f"std_mode must be 'global' or 'group', got {std_mode!r}")
    return (rewards.double() - mean[:, None]) / denom


def combine_advantages(
    component_scores: dict[str, torch.Tensor],
    weights: dict[str, float],
    std_mode: StdMode = "global",
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A = Σ_c w_c · A_c`` for ``(G, K)`` scores of several reward components, in float64: each component is
    normalised on its own by :func:`advantages` (its group mean, its std by ``std_mode``: over the step's
    finite scores of that component, or its group's), then weighted and summed. The weights are not
    renormalised: their scale scales ``A`` (before any advantage clip).

    A sample that any component could not judge (NaN) is NaN in every component before the statistics are
    taken, so each component's mean and std are over the same samples, and its combined advantage is NaN.
    ``pool``: see :func:`group_stats`. ``component_scores`` must hold every weighted name, all of one shape.
    """
    if not component_scores:
        raise ValueError("combine_advantages: give at least one component")
    if set(component_scores) != set(weights):
        raise ValueError(f"combine_advantages: scores for {sorted(component_scores)} but weights for {sorted(weights)}")
    shapes = {tuple(s.shape) for s in component_scores.values()}
    if len(shapes) != 1:
        raise ValueError(f"combine_advantages: components of different shapes {sorted(shapes)}")
    stacked = torch.stack([component_scores[name].double() for name in weights])
    for s in stacked:
        _check_rewards(s)
    bad = torch.isnan(stacked).any(dim=0)
    total = torch.zeros_like(stacked[0])
    for w, s in zip(weights.values(), stacked):
        total = total + float(w) * advantages(torch.where(bad, torch.nan, s), std_mode, pool=pool)
    return torch.where(bad, torch.nan, total)


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

    ``r``: ``(G, K)`` optimality probability (float64; NaN where the reward is NaN).
    ``train_mask``: ``(G, K)`` samples that get a loss.
    ``dropped_low_variance`` / ``dropped_nan``: ``(G,)`` groups removed and why.
    ``ban``: ``(G,)`` groups whose prompt the ban rule says to ban (used only when bans are on).
    ``mean`` / ``std``: ``(G,)`` float64 group statistics the filter saw.
    """

    r: torch.Tensor
    train_mask: torch.Tensor
    dropped_low_variance: torch.Tensor
    dropped_nan: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    ban: torch.Tensor | None = None  # None: the groups the filter dropped for low variance

    def __post_init__(self) -> None:
        if self.ban is None:
            self.ban = self.dropped_low_variance

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
    ban_rule: FilterRule | None = None,
    pool: torch.Tensor | None = None,
    components: dict[str, torch.Tensor] | None = None,
    weights: dict[str, float] | None = None,
) -> GroupDecision:
    """Advantages, r and the filter for one step's ``(G, K)`` rewards (all ranks gathered).

    ``nan_policy="group"`` drops every group that holds a NaN reward; ``"sample"`` drops only the
    NaN samples and keeps the rest of their group. Either way a NaN sample gets no loss.
    Statistics (group means, the global std) are computed over finite rewards only, in float64;
    ``step_std`` overrides the global std (all ranks' rewards). ``ban_rule`` (default: ``rule``) marks
    the groups whose prompt is to be banned — the reference code masks with ``strict`` and bans with
    ``paper``. ``pool``: groups with equal ids share their statistics (see :func:`group_stats`).

    ``components`` (name → ``(G, K)`` scores) with their ``weights``: the advantages are
    :func:`combine_advantages` of the components (the sum of their own group-normalised advantages) instead
    of the advantages of ``rewards``; ``rewards`` (their weighted mean, NaN where any component is NaN) still
    decides the NaN drops, the low-variance filter and the bans, so τμ and τσ keep their meaning in reward
    units.
    """
    if nan_policy not in ("group", "sample"):
        raise ValueError(f"nan_policy must be 'group' or 'sample', got {nan_policy!r}")
    mean, std = group_stats(rewards, pool)
    if components is not None:
        if weights is None:
            raise ValueError("decide: components need their weights")
        adv = combine_advantages(components, weights, std_mode, pool)
        if adv.shape != rewards.shape:
            raise ValueError(f"decide: components of shape {tuple(adv.shape)} for rewards {tuple(rewards.shape)}")
    else:
        adv = advantages(rewards, std_mode, step_std, pool)
    r = optimality_probability(adv, adv_clip)
    finite = torch.isfinite(rewards)
    if nan_policy == "group":
        dropped_nan = ~finite.all(dim=1)
    else:
        dropped_nan = ~finite.any(dim=1)
    dropped_lv = low_variance_drop(mean, std, rule, mean_threshold, std_threshold) & ~dropped_nan
    keep_group = ~(dropped_lv | dropped_nan)
    train_mask = keep_group[:, None] & finite
    if ban_rule is None or ban_rule == rule:
        ban = dropped_lv
    else:
        ban = low_variance_drop(mean, std, ban_rule, mean_threshold, std_threshold) & ~dropped_nan
    return GroupDecision(r, train_mask, dropped_lv, dropped_nan, mean, std, ban)


def _check_pool(pool: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    pool = torch.as_tensor(pool, device=rewards.device)
    if pool.shape != rewards.shape[:1] or pool.dtype not in (torch.int32, torch.int64) or (pool < 0).any():
        raise ValueError(
            f"pool must be ({rewards.shape[0]},) non-negative integer ids, got {tuple(pool.shape)} {pool.dtype}"
        )
    return pool.long()


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (groups, group_size), got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
