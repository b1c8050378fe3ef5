"""A preservation reward: how much of the source image an edit keeps, for pairing a judge with "don't change the
rest". The structural similarity (SSIM, torchmetrics) of edit and source, clamped to [0, 1] — over the whole image,
or only outside the row's edit mask; NaN where the edit is not finite.

torchmetrics' Gaussian SSIM derives its window from ``sigma`` alone: ``2·int(3.5σ + 0.5) + 1`` pixels (11 for
σ = 1.5) whatever ``kernel_size`` it is given, so here ``kernel_size`` is either left out (the window ``sigma``
gives) or must equal that size (a mismatch is an error, not a setting that silently does nothing).
"""

from __future__ import annotations

import threading

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from editr1.rewards.base import RewardInputs, RewardModel


def gaussian_window(sigma: float) -> int:
    """The side in pixels of torchmetrics' Gaussian SSIM window for ``sigma``."""
    return int(3.5 * sigma + 0.5) * 2 + 1


def preservation(
    sources: torch.Tensor,
    edits: torch.Tensor,
    kernel_size: int | None = None,
    sigma: float = 1.5,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N,) SSIM of each edit to its source (images (N, 3, H, W) in [0, 1], Gaussian window of ``sigma``),
    clamped to [0, 1]; NaN for an edit with a non-finite pixel.

    ``masks`` ((N, 1, H, W), 1 = the region to edit): the mean of the SSIM map (torchmetrics'
    ``return_full_image``; each pixel's SSIM over the window around it, averaged over the channels) over the
    pixels outside the mask only. A row whose mask covers every pixel has nothing outside it and gets the
    whole image's SSIM, as without a mask. ``kernel_size``: see the module's docstring.
    """
    window = gaussian_window(sigma)
    if kernel_size is not None and kernel_size != window:
        raise ValueError(
            f"preservation: torchmetrics' Gaussian window for sigma {sigma} is {window} pixels, not kernel_size "
            f"{kernel_size}: leave kernel_size out, or choose sigma for the window you want"
        )
    if sources.shape != edits.shape or edits.dim() != 4:
        raise ValueError(
            f"preservation: sources and edits of one (N, C, H, W) shape, got {tuple(sources.shape)} / "
            f"{tuple(edits.shape)}"
        )
    if min(edits.shape[-2:]) < window:
        raise ValueError(
            f"preservation: images of {tuple(edits.shape[-2:])} are smaller than the {window}-pixel window"
        )
    if masks is not None and tuple(masks.shape) != (edits.shape[0], 1, *edits.shape[-2:]):
        raise ValueError(
            f"preservation: masks of shape (N, 1, H, W) for edits {tuple(edits.shape)}, got {tuple(masks.shape)}"
        )
    bad = ~torch.isfinite(edits).flatten(1).all(1)
    e = torch.where(bad[:, None, None, None], 0.0, edits).double()
    ssim, full = structural_similarity_index_measure(
        e, sources.double(), data_range=1.0, sigma=sigma, reduction="none", return_full_image=True
    )
    if masks is not None:
        keep = (1 - masks.to(full)).clamp(0, 1)  # (N, 1, H, W): the pixels to preserve
        kept = keep.flatten(1).sum(1)
        outside = (full * keep).flatten(1).sum(1) / (kept * full.shape[1]).clamp(min=1)
        ssim = torch.where(kept > 0, outside, ssim)
    return torch.where(bad, torch.nan, ssim.clamp(0, 1)).float()


class PreservationReward(RewardModel):
    """SSIM between each edit and its source (1 = nothing changed). Alone it rewards doing nothing; combine it
    with a judge of the instruction (:class:`editr1.rewards.combined.CombinedReward`) at a small weight.

    Args:
        kernel_size: the Gaussian window's side in pixels; torchmetrics derives it from ``sigma``
            (``2·int(3.5σ + 0.5) + 1``, 11 for σ = 1.5), so leave it out or give that value (another is an error).
        sigma: the window's standard deviation: what sets the window.
        outside_mask: with rows that carry a ``"mask"`` (white = the region to edit), measure only the pixels
            outside it (the SSIM map averaged over them): an edit is not penalised for changing what it was
            asked to change. A batch without masks is measured over the whole image, as are rows whose mask
            covers every pixel — rows without a mask in a batch with masks among them (all ones) — counted as
            ``whole_image_rows``.
    """

    def __init__(self, kernel_size: int | None = None, sigma: float = 1.5, outside_mask: bool = False) -> None:
        if not sigma > 0 or (kernel_size is not None and (kernel_size < 3 or kernel_size % 2 == 0)):
            raise ValueError(f"PreservationReward: kernel_size odd >= 3 and sigma > 0, got {kernel_size}, {sigma}")
        window = gaussian_window(sigma)
        if kernel_size is not None and kernel_size != window:
            raise ValueError(
                f"PreservationReward: torchmetrics' Gaussian window for sigma {sigma} is {window} pixels, not "
                f"kernel_size {kernel_size}: leave kernel_size out, or choose sigma for the window you want"
            )
        self.kernel_size, self.sigma, self.outside_mask = window, sigma, outside_mask
        self._lock = threading.Lock()
        self._whole = 0

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        masks = inputs.masks if self.outside_mask else None
        if masks is not None:
            with self._lock:
                self._whole += int((masks.flatten(1) >= 1).all(1).sum())
        return preservation(inputs.sources, inputs.edits, self.kernel_size, self.sigma, masks)

    def stats(self) -> dict[str, float]:
        return {"whole_image_rows": float(self._whole)} if self.outside_mask else {}
