"""A preservation reward: how much of the source image an edit keeps, for pairing a judge with "don't change the
rest". The structural similarity (SSIM, torchmetrics) of edit and source, clamped to [0, 1]; NaN where the edit is
not finite."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from editr1.rewards.base import RewardInputs, RewardModel


def preservation(sources: torch.Tensor, edits: torch.Tensor, kernel_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(N,) SSIM of each edit to its source (images (N, 3, H, W) in [0, 1], Gaussian window), clamped to [0, 1];
    NaN for an edit with a non-finite pixel."""
    if sources.shape != edits.shape or edits.dim() != 4:
        raise ValueError(
            f"preservation: sources and edits of one (N, C, H, W) shape, got {tuple(sources.shape)} / "
            f"{tuple(edits.shape)}"
        )
    if min(edits.shape[-2:]) < kernel_size:
        raise ValueError(
            f"preservation: images of {tuple(edits.shape[-2:])} are smaller than the {kernel_size}-pixel window"
        )
    bad = ~torch.isfinite(edits).flatten(1).all(1)
    e = torch.where(bad[:, None, None, None], 0.0, edits).double()
    ssim = structural_similarity_index_measure(
        e, sources.double(), data_range=1.0, kernel_size=kernel_size, sigma=sigma, reduction="none"
    )
    return torch.where(bad, torch.nan, ssim.clamp(0, 1)).float()


class PreservationReward(RewardModel):
    """SSIM between each edit and its source (1 = nothing changed). Alone it rewards doing nothing; combine it
    with a judge of the instruction (:class:`editr1.rewards.combined.CombinedReward`) at a small weight.

    Args:
        kernel_size: side of the Gaussian window in pixels (odd).
        sigma: the window's standard deviation.
    """

    def __init__(self, kernel_size: int = 11, sigma: float = 1.5) -> None:
        if kernel_size < 3 or kernel_size % 2 == 0 or not sigma > 0:
            raise ValueError(f"PreservationReward: kernel_size odd >= 3 and sigma > 0, got {kernel_size}, {sigma}")
        self.kernel_size, self.sigma = kernel_size, sigma

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        return preservation(inputs.sources, inputs.edits, self.kernel_size, self.sigma)
