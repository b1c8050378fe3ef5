"""A verifiable reward for edits whose correct result is known (e.g. ``editr1.data.scenes``).

For each sample, with images in [0, 1]:

* per-pixel error   e = mean over channels of |edit - target|
* per-pixel score   s = clamp(1 - e / tolerance, 0, 1)
* change mask       m = (mean over channels of |source - target|) > change_threshold
* reward            0.5 * mean(s over m) + 0.5 * mean(s over not m);
                    mean(s) over all pixels if m is empty, mean(s over m) if m covers every pixel.

Pixels that should change and pixels that should stay count equally, whatever their areas. On the
synthetic scenes (palette colours >= 0.3 apart, above the default tolerance) returning the source
unchanged scores exactly 0.5 and the exact target scores 1.0.
"""

from __future__ import annotations

import torch

from editr1.rewards.base import RewardInputs, RewardModel


def _check(name: str, x: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"scene_reward: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"scene_reward: {name} must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"scene_reward: {name} must be a float tensor in [0, 1], got {x.dtype}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"scene_reward: {name} has shape {tuple(x.shape)} but edits have {tuple(like.shape)}")


def scene_reward(
    edits: torch.Tensor,
    targets: torch.Tensor,
    sources: torch.Tensor,
    tolerance: float = 0.25,
    change_threshold: float = 0.1,
) -> torch.Tensor:
    """Score edits against known targets; (N,) float32 in [0, 1], NaN where an edit contains NaN.

    All inputs are (N, 3, H, W) float tensors in [0, 1] of the same shape. See the module docstring
    for the formula. Targets and sources must be finite (they come from data, not from a model).
    """
    _check("edits", edits)
    _check("targets", targets, edits)
    _check("sources", sources, edits)
    if not tolerance > 0:
        raise ValueError(f"scene_reward: tolerance must be > 0, got {tolerance}")
    if not change_threshold >= 0:
        raise ValueError(f"scene_reward: change_threshold must be >= 0, got {change_threshold}")
    edits, targets, sources = (x.detach().to(torch.float32) for x in (edits, targets, sources))
    if not (torch.isfinite(targets).all() and torch.isfinite(sources).all()):
        raise ValueError("scene_reward: targets and sources must be finite")

    score = (1 - (edits - targets).abs().mean(dim=1) / tolerance).clamp(0, 1)  # (N, H, W)
    changed = (sources - targets).abs().mean(dim=1) > change_threshold
    n_changed = changed.sum(dim=(1, 2))
    n_kept = (~changed).sum(dim=(1, 2))
    mean_changed = torch.where(changed, score, 0).sum(dim=(1, 2)) / n_changed.clamp(min=1)
    mean_kept = torch.where(changed, 0, score).sum(dim=(1, 2)) / n_kept.clamp(min=1)
    reward = torch.where(
        n_changed == 0, mean_kept, torch.where(n_kept == 0, mean_changed, 0.5 * (mean_changed + mean_kept))
    )
    nan = torch.isnan(edits).flatten(1).any(dim=1)
    return torch.where(nan, torch.full_like(reward, float("nan")), reward.clamp(0, 1))


class SceneReward(RewardModel):
    """``scene_reward`` as a RewardModel: needs ``inputs.targets`` (data with known results).

    reward = 0.5 * mean(s over pixels that should change) + 0.5 * mean(s over pixels that should not),
    with s = clamp(1 - mean_c |edit - target| / tolerance, 0, 1) and "should change" meaning
    mean_c |source - target| > change_threshold. Returns (N,) float32 on the CPU.
    """

    needs_targets = True

    def __init__(self, tolerance: float = 0.25, change_threshold: float = 0.1) -> None:
        if not tolerance > 0:
            raise ValueError(f"SceneReward: tolerance must be > 0, got {tolerance}")
        if not change_threshold >= 0:
            raise ValueError(f"SceneReward: change_threshold must be >= 0, got {change_threshold}")
        self.tolerance = tolerance
        self.change_threshold = change_threshold

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        if inputs.targets is None:
            raise ValueError(
                "SceneReward needs data with known targets (the synthetic scenes in editr1.data.scenes, or a "
                "JSONL dataset with a `target` field); got inputs.targets=None"
            )
        cpu = [x.detach().cpu() for x in (inputs.edits, inputs.targets, inputs.sources)]
        return scene_reward(*cpu, tolerance=self.tolerance, change_threshold=self.change_threshold)
