"""Held-out evaluation on synthetic scenes, where the correct edit is known.

A fixed range of seeds of a split the training never draws from (``heldout``: the same grammar;
``unseen``: shape/colour combinations never trained on), fixed sampling seeds, a deterministic
solver. Reported with two reference points: the *identity* baseline (return the source unchanged)
and the *ceiling* (the VAE round trip of the true target — the best the policy's latent space allows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editr1.data.scenes import SceneConfig, make_example
from editr1.editing import edit_images
from editr1.policies.base import EditPolicy
from editr1.rewards.scenes import scene_reward
from editr1.sampling import Solver
from editr1.seeding import EVAL_NOISE, derive_seed


@dataclass
class SceneEvalResult:
    split: str
    rewards: torch.Tensor  # (count, K)
    identity: torch.Tensor  # (count,)
    ceiling: torch.Tensor  # (count,)
    sources: torch.Tensor  # (count, 3, H, W)
    edits: torch.Tensor  # (count·K, 3, H, W)
    prompts: list[str]
    tasks: list[str]

    @property
    def mean(self) -> float:
        return float(self.rewards.mean())

    def summary(self) -> dict[str, float]:
        out = {"mean": self.mean, "identity": float(self.identity.mean()), "ceiling": float(self.ceiling.mean())}
        for task in sorted(set(self.tasks)):
            rows = [i for i, t in enumerate(self.tasks) if t == task]
            out[f"task/{task}"] = float(self.rewards[rows].mean())
        return out


@torch.no_grad()
def evaluate_scenes(
    policy: EditPolicy,
    scenes: SceneConfig,
    split: str = "heldout",
    count: int = 64,
    group_size: int = 1,
    steps: int = 8,
    solver: Solver = "euler",
    seed: int = 0,
    start: int = 0,
    batch_size: int = 64,
) -> SceneEvalResult:
    """Edit seeds ``[start, start + count)`` of ``split`` ``group_size`` times each with the active adapter."""
    examples = [make_example(i, scenes, split) for i in range(start, start + count)]
    sources = policy.preprocess([e["image"] for e in examples])
    targets = policy.preprocess([e["target"] for e in examples])
    prompts = [e["prompt"] for e in examples]
    seeds = [derive_seed(seed, EVAL_NOISE, start + i, k) for i in range(count) for k in range(group_size)]
    edits = edit_images(
        policy, sources, prompts, seeds, steps=steps, solver=solver, batch_size=batch_size, group_size=group_size
    ).images
    rewards = scene_reward(edits, targets.repeat_interleave(group_size, 0), sources.repeat_interleave(group_size, 0))
    round_trip = torch.cat(
        [policy.decode(policy.encode_images(targets[s : s + batch_size])) for s in range(0, count, batch_size)]
    )
    return SceneEvalResult(
        split=split,
        rewards=rewards.view(count, group_size).cpu(),
        identity=scene_reward(sources, targets, sources).cpu(),
        ceiling=scene_reward(round_trip, targets, sources).cpu(),
        sources=sources.cpu(),
        edits=edits.cpu(),
        prompts=prompts,
        tasks=[e["task"] for e in examples],
    )
