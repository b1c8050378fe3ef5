"""The reward interface: (source, edited, instruction, requirement) -> score in [0, 1] or NaN."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class RewardInputs:
    """One batch of edits to judge.

    Images are float tensors in [0, 1], shape (N, 3, H, W); ``sources[i]`` is the image that
    ``edits[i]`` was made from. ``targets`` holds the known correct result where the data has one
    (synthetic scenes, supervised pairs) and is ``None`` otherwise.
    """

    sources: torch.Tensor
    edits: torch.Tensor
    instructions: list[str]
    requirements: list[str]
    targets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.edits.shape[0]
        if self.sources.shape[0] != n or len(self.instructions) != n or len(self.requirements) != n:
            raise ValueError(
                f"RewardInputs: {n} edits but {self.sources.shape[0]} sources, {len(self.instructions)} instructions, "
                f"{len(self.requirements)} requirements"
            )
        if self.targets is not None and self.targets.shape[0] != n:
            raise ValueError(f"RewardInputs: {n} edits but {self.targets.shape[0]} targets")


class RewardModel(ABC):
    """Scores edits. Returns a float tensor of shape (N,) with values in [0, 1].

    A sample that could not be judged (a failed request, an unparsable answer) is NaN — never a
    made-up number. Training drops it and counts it.
    """

    @abstractmethod
    def score(self, inputs: RewardInputs) -> torch.Tensor: ...

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        return self.score(inputs)

    def to(self, device: torch.device | str) -> "RewardModel":  # noqa: D401 - torch-like
        """Move any model weights to ``device`` (a no-op for rewards without weights)."""
        return self
