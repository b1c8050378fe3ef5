"""Statistics of a rollout's edited images, to see reward hacking coming (a judge pleased by ever brighter,
more saturated or blank images; edits that stop changing anything): pure torch, images (N, 3, H, W) in [0, 1].

* luma            Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)
* brightness      mean Y
* saturation      mean of (max − min) / max over the channels (HSV's S; 0 where max = 0)
* contrast        mean over images of the standard deviation of Y within the image
* frac_near_black fraction of pixels with Y < 0.05; frac_near_white: Y > 0.95
* edit_distance   mean |edit − source| (how much the edits change their sources)
"""

from __future__ import annotations

import torch

STATS = ("brightness", "saturation", "contrast", "frac_near_black", "frac_near_white", "edit_distance")
LUMA = (0.299, 0.587, 0.114)


def image_stats(edits: torch.Tensor, sources: torch.Tensor) -> dict[str, float]:
    """The statistics of :data:`STATS` over the finite edits (``sources[i]`` is the source of ``edits[i]``);
    NaN for all of them when no edit is finite."""
    if edits.shape != sources.shape or edits.dim() != 4 or edits.shape[1] != 3:
        raise ValueError(
            f"image_stats: edits and sources of one (N, 3, H, W) shape, got {tuple(edits.shape)} / "
            f"{tuple(sources.shape)}"
        )
    ok = torch.isfinite(edits).flatten(1).all(1)
    if not bool(ok.any()):
        return dict.fromkeys(STATS, float("nan"))
    e, s = edits[ok].double().clamp(0, 1), sources[ok].double()
    y = (e * torch.tensor(LUMA, dtype=torch.float64, device=e.device)[None, :, None, None]).sum(1)  # (n, H, W)
    hi, lo = e.amax(1), e.amin(1)
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi))
    return {
        "brightness": float(y.mean()),
        "saturation": float(sat.mean()),
        "contrast": float(y.flatten(1).std(1, unbiased=False).mean()),
        "frac_near_black": float((y < 0.05).double().mean()),
        "frac_near_white": float((y > 0.95).double().mean()),
        "edit_distance": float((e - s).abs().mean()),
    }


def out_of_bounds(stats: dict[str, float], limits: dict[str, list[float | None]]) -> list[str]:
    """``limits``: statistic → ``[low, high]`` (either ``None``: unbounded). The violated bounds, as text; a NaN
    statistic violates nothing (there was nothing to measure)."""
    out = []
    for name, (low, high) in limits.items():
        v = stats[name]
        if low is not None and v < low:
            out.append(f"{name} {v:.4g} < {low:g}")
        if high is not None and v > high:
            out.append(f"{name} {v:.4g} > {high:g}")
    return out


def check_limits(limits: dict[str, list[float | None]] | None) -> dict[str, list[float | None]]:
    """Validate ``reward.image_limits``: known statistics, two bounds each, low ≤ high."""
    limits = dict(limits or {})
    for name, bounds in limits.items():
        if name not in STATS:
            raise ValueError(f"image_limits: unknown statistic {name!r}; known: {', '.join(STATS)}")
        if len(bounds) != 2:
            raise ValueError(f"image_limits.{name}: give [low, high] (null for unbounded), got {bounds}")
        low, high = bounds
        if low is not None and high is not None and low > high:
            raise ValueError(f"image_limits.{name}: low {low} > high {high}")
    return {name: list(bounds) for name, bounds in limits.items()}
