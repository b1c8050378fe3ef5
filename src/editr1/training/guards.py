"""Guards that stop a run which cannot make progress, with a message that says why: a policy that diverged,
a streak of steps that trained nothing."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from editr1.training import distributed
from editr1.training.state import emergency_checkpoint

if TYPE_CHECKING:
    from editr1.module import EditR1Module


class RunStopped(RuntimeError):
    """A run stopped on purpose, for a reason its message gives (a guard tripped, a judge that judged nothing,
    …): the ``editr1`` command prints the message without a traceback and exits with status 1."""


def check_finite_rollout(module: EditR1Module, x0: torch.Tensor | None) -> None:
    """Non-finite rollout latents mean the policy has diverged (every reward would be NaN and every step
    would train nothing): stop at once, on every process together."""
    bad = x0 is not None and not bool(torch.isfinite(x0).all())
    if distributed.any_process(bad, world=module.world_size, device=module.device):
        raise RunStopped(
            f"the rollout policy θ_old produced non-finite latents at step {module.global_step} (lr "
            f"{module.optim.lr}): the adapters have diverged; stopped without saving them. Resume from the last "
            "checkpoint with a lower learning rate."
        )


def count_idle_step(module: EditR1Module) -> None:
    """Count a step that trained nothing; warn once a streak is long enough to be unusual (a quarter of the
    limit, at least 2: a healthy run whose filter drops every group of one step now and then stays quiet), and
    stop after ``optim.max_idle_steps`` in a row (a judge that stays down, weights gone bad, every prompt banned:
    the run would never end)."""
    module.idle_in_a_row += 1
    limit = module.optim.max_idle_steps
    what = (
        f"step {module.global_step}: nothing to train on any process (every group was filtered, banned, left "
        "unjudged or unreadable; see filter/* and reward_model/* in TensorBoard)"
    )
    if module.idle_in_a_row == max(2, limit // 4) and module.global_rank == 0:
        warnings.warn(f"{module.idle_in_a_row} steps in a row trained nothing; last: {what}", stacklevel=2)
    if limit and module.idle_in_a_row >= limit:
        path = emergency_checkpoint(module.trainer, "idle")
        raise RunStopped(
            f"{module.idle_in_a_row} steps in a row trained nothing (optim.max_idle_steps = {limit}); stopped. "
            f"Last: {what}. State saved to {path}."
        )


@torch.no_grad()
def check_finite_adapters(module: EditR1Module) -> None:
    """After an optimiser step every LoRA weight must be finite (a huge learning rate can overflow them
    with a finite gradient); otherwise stop before rollouts of a broken policy make every reward NaN."""
    bad = any(not bool(torch.isfinite(p).all()) for p in module.policy.trainable_parameters())
    if distributed.any_process(bad, world=module.world_size, device=module.device):
        raise RunStopped(
            f"the adapters are not finite after optimiser step {module.global_step} (lr {module.optim.lr}); "
            "stopped without saving them. Resume from the last checkpoint with a lower learning rate."
        )
