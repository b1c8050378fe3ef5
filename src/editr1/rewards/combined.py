"""Several reward models as one: a weighted mean of their scores, or a sum of their advantages; each component's
statistics logged.

``total_i = Σ_c w_c · r_c,i / Σ_c w_c`` — in [0, 1] when every component is. A sample that any component could
not judge (NaN) is NaN in the total (never scored on the others alone) and counted as ``failed/<name>``. Each step
logs ``rewards/<name>/mean`` and ``rewards/<name>/std`` over the component's finite scores (trl's names) and
``rewards/<name>/nan``, the component's NaN scores of the step.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from concurrent.futures import Future
from typing import Literal

import torch

from editr1.rewards.base import RewardInputs, RewardModel


def weighted_mean(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``scores``: (C, N) per component and sample; ``weights``: (C,) ≥ 0 with a positive sum. Returns (N,)
    ``Σ_c w_c s_c / Σ_c w_c``, NaN wherever any component is NaN (also one of weight 0)."""
    if scores.dim() != 2 or weights.shape != (scores.shape[0],):
        raise ValueError(
            f"weighted_mean: scores (C, N) and weights (C,), got {tuple(scores.shape)} / {tuple(weights.shape)}"
        )
    if bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError(f"weighted_mean: weights must be >= 0 with a positive sum, got {weights.tolist()}")
    w = weights.to(torch.float64)[:, None]
    total = (scores.to(torch.float64) * w).sum(0) / w.sum()
    return torch.where(torch.isnan(scores).any(0), torch.nan, total).to(torch.float32)


COMBINE_MODES = ("weighted_mean", "advantage_sum")


class CombinedReward(RewardModel):
    """Several named reward models, combined by a weighted mean or by the sum of their advantages.

    Args:
        models: name → reward model, e.g. ``{judge: <ServedMLLMReward>, preserve: <PreservationReward>}``.
        weights: name → weight ≥ 0 (a missing name weighs 1).
        combine: how training uses the components.

            * ``weighted_mean``: the reward of an edit is ``Σ_c w_c r_c / Σ_c w_c`` (weights need not sum to 1);
              the objective normalises it within its group as it would any reward.
            * ``advantage_sum``: each component is normalised on its own by the objective's rule (its group
              mean; its std over the step or over the group, as the objective's ``std_mode`` says) and the
              advantage is ``Σ_c w_c A_c`` (:func:`editr1.algorithms.grouping.combine_advantages`; the weights
              are not renormalised, so their scale scales the advantage before its clip). A component with a
              small spread then still counts as much as one with a large spread (with the weighted mean, the
              component with the larger spread dominates the ranking inside a group). The low-variance group
              filter, the bans and the NaN drops still look at the weighted mean (``reward/mean`` and the
              thresholds τμ, τσ stay in reward units): a group whose weighted mean is all high and nearly equal
              is dropped although its components may disagree. Validation scores (``val/reward``) are the
              weighted mean in both modes.

    Every component judges every chunk (served ones in their own threads, at the same time); ``stats()`` and
    ``step_stats()`` carry each component's under ``<name>/``.
    """

    def __init__(
        self,
        models: dict[str, RewardModel],
        weights: dict[str, float] | None = None,
        combine: Literal["weighted_mean", "advantage_sum"] = "weighted_mean",
    ) -> None:
        if not models:
            raise ValueError("CombinedReward: give at least one model")
        for name, model in models.items():
            if not isinstance(model, RewardModel):
                raise TypeError(f"CombinedReward: {name!r} is a {type(model).__name__}, not a RewardModel")
            if not name or "/" in name:
                raise ValueError(f"CombinedReward: model names must be non-empty without '/', got {name!r}")
        unknown = set(weights or {}) - set(models)
        if unknown:
            raise ValueError(f"CombinedReward: weights for unknown models {sorted(unknown)}; models: {sorted(models)}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"CombinedReward: combine must be one of {COMBINE_MODES}, got {combine!r}")
        self.combine = combine
        self.models = dict(models)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.models}
        weighted_mean(torch.zeros(len(self.models), 1), torch.tensor(list(self.weights.values())))  # checks them
        self.needs_targets = any(getattr(m, "needs_targets", False) for m in self.models.values())
        self._lock = threading.Lock()
        self._failed: Counter = Counter()
        self._step: dict[str, list[torch.Tensor]] = {name: [] for name in self.models}

    def _parts(self, scores: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """Each component's ``(n,)`` CPU float scores, checked and counted."""
        parts = {}
        for name in self.models:
            s = scores[name].detach().float().reshape(-1).cpu()
            if s.shape[0] != n:
                raise ValueError(f"CombinedReward: {name!r} returned {s.shape[0]} scores for {n} edits")
            parts[name] = s
        with self._lock:
            for name, s in parts.items():
                self._failed[f"failed/{name}"] += int(torch.isnan(s).sum())
                self._step[name].append(s)
        return parts

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted mean of the components' scores (NaN wherever one of them is NaN)."""
        stacked = torch.stack([parts[name].float().reshape(-1) for name in self.models])
        return weighted_mean(stacked, torch.tensor(list(self.weights.values())))

    def score_components(self, inputs: RewardInputs) -> dict[str, torch.Tensor]:
        """Every component's ``(N,)`` scores of ``inputs`` (counted like :meth:`score`'s)."""
        return self._parts({name: m.score(inputs) for name, m in self.models.items()}, inputs.edits.shape[0])

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        return self.total(self.score_components(inputs))

    def submit_components(self, inputs: RewardInputs) -> Future:
        """Like :meth:`submit`, but the future's result is :meth:`score_components`' dict: what the reward stage
        asks for under ``combine: advantage_sum``."""
        parts = [(name, m.submit(inputs)) for name, m in self.models.items()]
        out: Future = Future()
        left = [len(parts)]
        lock = threading.Lock()

        def done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                out.set_result(self._parts({name: f.result() for name, f in parts}, inputs.edits.shape[0]))
            except BaseException as exc:  # the caller sees it when it asks for the result
                out.set_exception(exc)

        for _, f in parts:
            f.add_done_callback(done)
        return out

    def submit(self, inputs: RewardInputs) -> Future:
        out: Future = Future()

        def done(f: Future) -> None:
            try:
                out.set_result(self.total(f.result()))
            except BaseException as exc:  # the caller sees it when it asks for the result
                out.set_exception(exc)

        self.submit_components(inputs).add_done_callback(done)
        return out

    def stats(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self._failed.items()}
        for name, model in self.models.items():
            out.update({f"{name}/{k}": v for k, v in model.stats().items()})
        return out

    def step_stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with self._lock:
            step, self._step = self._step, {name: [] for name in self.models}
        for name, model in self.models.items():
            s = torch.cat(step[name]) if step[name] else torch.empty(0)
            out[f"rewards/{name}/nan"] = float(torch.isnan(s).sum())
            s = s[torch.isfinite(s)].double()
            out[f"rewards/{name}/mean"] = float(s.mean()) if s.numel() else math.nan
            out[f"rewards/{name}/std"] = float(s.std(unbiased=False)) if s.numel() else math.nan
            out.update({f"{name}/{k}": v for k, v in model.step_stats().items()})
        return out

    def close(self) -> None:
        for model in self.models.values():
            model.close()

    def to(self, device: torch.device | str) -> CombinedReward:
        for model in self.models.values():
            model.to(device)
        return self
