"""What one step's rollouts hold, and the deterministic per-sample random streams they use."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from editr1.images import to_tensor_masks
from editr1.policies.base import Condition
from editr1.rewards.base import RewardInputs
from editr1.seeding import derive_seed


def key_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def group_ids(keys: list[str]) -> list[tuple[int, int]]:
    """``(hash of the key, occurrence)`` per prompt: stable ids that do not depend on the batch position
    or the process, so every draw a sample gets is the same on 1 rank or many."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        occ = seen.get(k, 0)
        seen[k] = occ + 1
        out.append((key_hash(k), occ))
    return out


def sample_seed(
    base_seed: int, stream: int, index: int, ids: list[tuple[int, int]], group_size: int, sample: int, *extra: int
) -> int:
    """Seed of sample ``sample`` (flat index over G·K) of rollout ``index`` for one kind of draw."""
    g, k = divmod(sample, group_size)
    h, occ = ids[g]
    return derive_seed(base_seed, stream, index, h, occ, k, *extra)


@dataclass
class Rollout:
    """K edits for each of G prompts, sampled by the rollout policy.

    ``cond`` has one row per prompt; ``group_index[i]`` is the prompt of sample i (``(G·K,)``,
    samples of a group are contiguous). ``x0`` are the final clean latents the NFT loss regresses to.
    SDE rollouts (Flow-GRPO) also keep every latent and each step's log-probability under θ_old.
    """

    prompts: list[str]
    requirements: list[str]
    keys: list[str]
    sources: torch.Tensor  # (G, 3, H, W) in [0, 1]
    targets: torch.Tensor | None  # (G, 3, H, W) or None
    cond: Condition
    x0: torch.Tensor  # (G·K, *latent_shape)
    edits: torch.Tensor  # (G·K, 3, H, W) in [0, 1]
    sigmas: torch.Tensor  # (steps + 1,) the rollout schedule, ending with 0
    group_size: int
    index: int  # how many rollouts came before this one in the run
    base_seed: int
    latents: torch.Tensor | None = None  # SDE rollouts: (G·K, steps + 1, *latent_shape), latents[:, 0] the noise
    log_probs: torch.Tensor | None = None  # SDE rollouts: (G·K, steps), NaN on ODE steps

    def __post_init__(self) -> None:
        self._ids = group_ids(self.keys)

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    @property
    def group_index(self) -> torch.Tensor:
        return torch.arange(self.num_groups).repeat_interleave(self.group_size)

    def sample_seed(self, stream: int, sample: int, *extra: int) -> int:
        """Seed of sample ``sample`` (flat index) for one kind of draw."""
        return sample_seed(self.base_seed, stream, self.index, self._ids, self.group_size, sample, *extra)

    def expand(self, per_group: torch.Tensor | list) -> torch.Tensor | list:
        """Repeat per-prompt values for every sample of the group."""
        if isinstance(per_group, torch.Tensor):
            return per_group.repeat_interleave(self.group_size, dim=0)
        return [v for v in per_group for _ in range(self.group_size)]


def chunk_inputs(
    batch: dict, sources: torch.Tensor, targets: torch.Tensor | None, group_size: int
) -> Callable[[torch.Tensor, torch.Tensor], RewardInputs]:
    """``make(index, images)``: the :class:`~editr1.rewards.base.RewardInputs` of a rollout chunk — the edits
    ``images`` of samples ``index`` (sample ``i`` is an edit of prompt ``i // group_size``) with their prompts'
    sources, instructions, requirements, targets, references and edit masks. ``sources``/``targets``: the
    batch's, preprocessed to the policy's resolution; the masks (``batch["mask"]``) are scaled alike."""
    prompts, requirements, refs = list(batch["prompt"]), list(batch["requirement"]), batch.get("references")
    masks = batch.get("mask")
    if masks is not None:
        masks = to_tensor_masks(masks, *sources.shape[-2:]).to(sources.device)

    def make(index: torch.Tensor, images: torch.Tensor) -> RewardInputs:
        rows = index // group_size
        g = rows.tolist()
        return RewardInputs(
            sources=sources[rows],
            edits=images,
            instructions=[prompts[i] for i in g],
            requirements=[requirements[i] for i in g],
            targets=None if targets is None else targets[rows],
            source_ids=g,
            references=[refs[i] for i in g] if any(refs or []) else None,
            masks=None if masks is None else masks[rows.to(masks.device)],
        )

    return make
