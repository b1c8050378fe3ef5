"""The reward stage's evaluation half: validation and test edits scored by the reward model (``val/reward``,
``test/reward``), and by a held-out gold reward when one is configured, with the gold alarm. A mixin of
:class:`editr1.callbacks.reward.RewardCallback`, which holds the settings (``model``, ``gold``, ``gold_alarm``,
``gold_patience``) and the state (``gold_history``)."""

from __future__ import annotations

import logging

import torch
from torchmetrics import MeanMetric, SumMetric

from editr1.algorithms.reward_hacking import diverging
from editr1.callbacks.tensorboard import add_image, log_step
from editr1.images import to_tensor_masks
from editr1.rewards.base import RewardInputs
from editr1.training.guards import RunStopped
from editr1.training.state import emergency_checkpoint
from editr1.visualize import captioned_grid

log = logging.getLogger("editr1.callbacks.reward")


def _masks(batch: dict | None, keep: list[int], edits: torch.Tensor) -> torch.Tensor | None:
    """The edit masks of the batch's rows ``keep`` at the edits' size (see :class:`RewardInputs`), or ``None``."""
    masks = (batch or {}).get("mask")
    if masks is None:
        return None
    return to_tensor_masks([masks[i] for i in keep], *edits.shape[-2:]).to(edits.device)


def check_rewards(rewards: torch.Tensor, n: int) -> None:
    if rewards.shape != (n,):
        raise ValueError(f"reward model returned shape {tuple(rewards.shape)} for {n} edits")
    bad = torch.isfinite(rewards) & ((rewards < 0) | (rewards > 1))
    if bad.any():
        raise ValueError(f"reward model returned values outside [0, 1]: {rewards[bad][:4].tolist()}")


class EvalScoring:
    """Scoring of validation and test edits (see the module docstring)."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset_eval(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset_eval(pl_module)

    def _reset_eval(self, pl_module) -> None:
        self.model.step_stats()  # judgements before this evaluation are not its own
        self._eval = {
            "reward": MeanMetric(nan_strategy="ignore").to(pl_module.device),
            "failed": SumMetric().to(pl_module.device),
            "gold": MeanMetric(nan_strategy="ignore").to(pl_module.device),
            "logged_images": False,
        }

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._score_eval(trainer, pl_module, outputs, "val", batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._score_eval(trainer, pl_module, outputs, "test", batch)

    def _score_eval(self, trainer, pl_module, outputs: dict, prefix: str, batch: dict | None = None) -> None:
        if not self._eval:
            self._reset_eval(pl_module)
        if outputs["edits"] is None:
            return  # nothing readable in this batch
        if outputs["targets"] is None and getattr(self.model, "needs_targets", False):
            if not self._eval.get("warned"):
                log.info("%s/reward not computed: %s needs data with targets", prefix, type(self.model).__name__)
                self._eval["warned"] = True
            return
        keep = [i for i, m in enumerate(outputs.get("meta") or [{}] * len(outputs["keys"])) if not m.get("padding")]
        if not keep:
            return
        sel = torch.tensor(keep)
        inputs = RewardInputs(
            sources=outputs["sources"][sel],
            edits=outputs["edits"][sel],
            instructions=[outputs["prompts"][i] for i in keep],
            requirements=[outputs["requirements"][i] for i in keep],
            targets=None if outputs["targets"] is None else outputs["targets"][sel],
            references=[outputs["references"][i] for i in keep] if any(outputs.get("references") or []) else None,
            masks=_masks(batch, keep, outputs["edits"]),
        )
        rewards = self.model.score(inputs).float().reshape(-1)
        check_rewards(rewards, inputs.edits.shape[0])
        rewards = rewards.to(pl_module.device)
        outputs["rewards"] = rewards
        self._eval["reward"].update(rewards)
        self._eval["failed"].update((~torch.isfinite(rewards)).sum().float())
        if self.gold is not None and not (inputs.targets is None and getattr(self.gold, "needs_targets", False)):
            gold = self.gold.score(inputs).float().reshape(-1)
            check_rewards(gold, inputs.edits.shape[0])
            self._eval["gold"].update(gold.to(pl_module.device))
        if not self._eval["logged_images"] and not trainer.sanity_checking:
            n = min(8, rewards.numel())
            rows = [[outputs["sources"][i].cpu(), outputs["edits"][i].cpu()] for i in range(n)]
            caps = [["source", f"{float(rewards[i]):.3f}"] for i in range(n)]
            add_image(trainer, f"{prefix}/source_edit", captioned_grid(rows, caps), log_step(trainer))
            self._eval["logged_images"] = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log_eval(pl_module, "val")
        if self.gold is not None and self._eval and not self._eval.get("warned") and not trainer.sanity_checking:
            self._check_gold(trainer)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log_eval(pl_module, "test")

    def _log_eval(self, pl_module, prefix: str) -> None:
        if not self._eval or self._eval.get("warned"):
            return  # nothing scored (the reward needs targets this data does not have)
        pl_module.log(f"{prefix}/reward", self._eval["reward"].compute(), prog_bar=prefix == "val")
        pl_module.log(f"{prefix}/failed", self._eval["failed"].compute())
        for k, v in self.model.step_stats().items():  # this evaluation's judgements (e.g. digit mass)
            pl_module.log(f"{prefix}/reward_model/{k}", v)
        if self.gold is not None:
            gold, reward = self._eval["gold"].compute(), self._eval["reward"].compute()
            pl_module.log(f"{prefix}/gold_reward", gold)
            pl_module.log(f"{prefix}/reward_gap", reward - gold)

    def _check_gold(self, trainer) -> None:
        self.gold_history.append((float(self._eval["reward"].compute()), float(self._eval["gold"].compute())))
        if not diverging(self.gold_history, self.gold_patience, self.gold_min_delta):
            return
        (r0, g0), (r1, g1) = self.gold_history[-self.gold_patience - 1], self.gold_history[-1]
        what = (
            f"over the last {self.gold_patience} validations val/reward rose {r0:.4f} → {r1:.4f} while the gold "
            f"reward fell {g0:.4f} → {g1:.4f}: the policy may be hacking the training reward"
        )
        if self.gold_alarm == "stop":
            raise RunStopped(
                f"{what} (reward.gold_alarm: stop); checkpoint saved to {emergency_checkpoint(trainer, 'gold')}"
            )
        if trainer.is_global_zero:
            log.warning("%s (reward.gold_alarm: warn)", what)
