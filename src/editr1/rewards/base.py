"""The reward interface: (source, edited, instruction, requirement) -> score in [0, 1] or NaN."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass

import torch


@dataclass
class RewardInputs:
    """One batch of edits to judge.

    Images are float tensors in [0, 1], shape (N, 3, H, W); ``sources[i]`` is the image that
    ``edits[i]`` was made from. ``targets`` holds the known correct result where the data has one
    (synthetic scenes, supervised pairs) and is ``None`` otherwise. ``references[i]`` lists the further
    input images ``edits[i]`` was made from (pictures 2, 3, …: PIL images or ``(3, h, w)`` tensors, any
    size), empty or ``None`` for single-image rows; a judge shows them all. ``masks`` is ``(N, 1, H, W)`` of
    0.0 / 1.0 at the images' size, 1 where the edit is meant to change the source (the data's ``"mask"``,
    white = the region to edit), or ``None`` when no row of the batch has one; a row without a mask in a
    batch that has some is all ones (the whole image may change).
    """

    sources: torch.Tensor
    edits: torch.Tensor
    instructions: list[str]
    requirements: list[str]
    targets: torch.Tensor | None = None
    source_ids: list[int] | None = None  # edits with the same id share one source (encode it once)
    references: list[list] | None = None  # per edit: its reference images (pictures 2, 3, …)
    masks: torch.Tensor | None = None  # (N, 1, H, W): 1 = the region to edit

    def __post_init__(self) -> None:
        n = self.edits.shape[0]
        if self.sources.shape[0] != n or len(self.instructions) != n or len(self.requirements) != n:
            raise ValueError(
                f"RewardInputs: {n} edits but {self.sources.shape[0]} sources, {len(self.instructions)} instructions, "
                f"{len(self.requirements)} requirements"
            )
        if self.targets is not None and self.targets.shape[0] != n:
            raise ValueError(f"RewardInputs: {n} edits but {self.targets.shape[0]} targets")
        if self.source_ids is not None and len(self.source_ids) != n:
            raise ValueError(f"RewardInputs: {n} edits but {len(self.source_ids)} source ids")
        if self.references is not None and len(self.references) != n:
            raise ValueError(f"RewardInputs: {n} edits but {len(self.references)} reference lists")
        if self.masks is not None and tuple(self.masks.shape) != (n, 1, *self.edits.shape[-2:]):
            raise ValueError(
                f"RewardInputs: masks must be (N, 1, H, W) = {(n, 1, *self.edits.shape[-2:])}, got "
                f"{tuple(self.masks.shape)}"
            )

    def select(self, start: int, stop: int) -> RewardInputs:
        """Edits ``start:stop``."""
        return RewardInputs(
            sources=self.sources[start:stop],
            edits=self.edits[start:stop],
            instructions=self.instructions[start:stop],
            requirements=self.requirements[start:stop],
            targets=None if self.targets is None else self.targets[start:stop],
            source_ids=None if self.source_ids is None else self.source_ids[start:stop],
            references=None if self.references is None else self.references[start:stop],
            masks=None if self.masks is None else self.masks[start:stop],
        )


class RewardModel(ABC):
    """Scores edits. Returns a float tensor of shape (N,) with values in [0, 1].

    A sample that could not be judged (a failed request, an unparsable answer) is NaN — never a
    made-up number. Training drops it and counts it.

    ``submit`` starts scoring and returns a future, so a reward that waits on a server can overlap
    with generating the next rollout chunk; the default scores at once, in the caller's thread.
    """

    @abstractmethod
    def score(self, inputs: RewardInputs) -> torch.Tensor: ...

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        return self.score(inputs)

    def submit(self, inputs: RewardInputs) -> Future:
        future: Future = Future()
        try:
            future.set_result(self.score(inputs))
        except BaseException as exc:  # the caller sees it when it asks for the result
            future.set_exception(exc)
        return future

    def stats(self) -> dict[str, float]:
        """Counters worth logging (failures by reason, retries, …); empty by default."""
        return {}

    def step_stats(self) -> dict[str, float]:
        """Figures about the judgements made since the last call, then reset (e.g. the served judge's digit
        probability mass); logged once per step as ``reward_model/<name>``. Empty by default."""
        return {}

    def close(self) -> None:
        """Release connections or threads (called when training ends)."""

    def to(self, device: torch.device | str) -> RewardModel:  # noqa: D401 - torch-like
        """Move any model weights to ``device`` (a no-op for rewards without weights)."""
        return self
