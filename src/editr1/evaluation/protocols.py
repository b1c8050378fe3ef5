"""Benchmark scoring protocols: strict parsing of judge answers and the published aggregations, as
torchmetrics Metrics (sums and counts per category, so they reduce correctly over several processes).

* **ImgEdit Basic**: per edit type a rubric with three 1–5 criteria; a sample's score is the mean of its
  three; a type's score the mean over its samples; **overall = the unweighted mean of the per-type means**.
* **GEdit-Bench (VIEScore)**: SC = min of the two 0–10 scores of the call that sees both images, PQ = min of
  the two of the call that sees the edit only, O = √(SC·PQ) per sample; **G_SC, G_PQ, G_O = unweighted means
  over the task groups** of the per-group means.

A judgement that cannot be parsed is *failed* — counted per category, never given a score.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

IMGEDIT_TYPES = ("add", "adjust", "extract", "replace", "remove", "background", "style", "hybrid", "action")
GEDIT_GROUPS = (
    "background_change",
    "color_alter",
    "material_alter",
    "motion_change",
    "ps_human",
    "style_change",
    "subject-add",
    "subject-remove",
    "subject-replace",
    "text_change",
    "tone_transfer",
)


# ----------------------------------------------------------------------------------------- parsing
def parse_rubric_scores(text: str, criteria: Sequence[str], low: int = 1, high: int = 5) -> list[int] | None:
    """``"<criterion>: <integer>"`` for every criterion (case-insensitive, in any order, each exactly once,
    within ``[low, high]``) → the scores in ``criteria`` order; anything else → ``None``."""
    out = []
    for name in criteria:
        hits = re.findall(rf"(?im)^\W*{re.escape(name)}\W*[:：]\s*(-?\d+(?:\.\d+)?)\b", text)
        if len(hits) != 1:
            return None
        value = float(hits[0])
        if not value.is_integer() or not low <= value <= high:
            return None
        out.append(int(value))
    return out


def parse_rubric_lines(text: str, n: int = 3, low: int = 1, high: int = 5) -> list[int] | None:
    """For rubrics whose criteria names are not known (the official ImgEdit prompts): exactly ``n``
    lines of the form ``<name>: <integer>``, each within ``[low, high]`` → the scores in order; else ``None``."""
    hits = re.findall(r"(?m)^\W*([A-Za-z][^:：\n]{0,80}?)\W*[:：]\s*(-?\d+(?:\.\d+)?)\s*\W*$", text)
    if len(hits) != n:
        return None
    out = []
    for _, raw in hits:
        value = float(raw)
        if not value.is_integer() or not low <= value <= high:
            return None
        out.append(int(value))
    return out


def parse_viescore(text: str, n: int = 2, low: float = 0.0, high: float = 10.0) -> list[float] | None:
    """VIEScore's answer: one JSON object (optionally in a ```json fence) whose ``"score"`` is a list of ``n``
    numbers in ``[low, high]`` → those numbers; anything else → ``None``."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
    if fence:
        body = fence.group(1)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("score"), list) or len(obj["score"]) != n:
        return None
    scores = obj["score"]
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        return None
    if not all(low <= s <= high for s in scores):
        return None
    return [float(s) for s in scores]


# ----------------------------------------------------------------------------------------- metrics
class CategoryMean(Metric):
    """Per-category means over a fixed list of categories, their unweighted (macro) mean and the
    sample-weighted (micro) mean. NaN scores are failures: counted, not averaged."""

    full_state_update = False

    def __init__(self, categories: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if not categories or len(set(categories)) != len(categories):
            raise ValueError("categories must be a non-empty list without repeats")
        self.categories = list(categories)
        self._index = {c: i for i, c in enumerate(self.categories)}
        n = len(self.categories)
        self.add_state("sums", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("failed", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("missing", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, categories: Sequence[str], scores: torch.Tensor | Sequence[float]) -> None:
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
        if len(categories) != scores.numel():
            raise ValueError(f"{len(categories)} categories for {scores.numel()} scores")
        unknown = sorted({c for c in categories if c not in self._index})
        if unknown:
            raise ValueError(f"unknown categories {unknown}; known: {self.categories}")
        idx = torch.tensor([self._index[c] for c in categories], dtype=torch.long, device=self.sums.device)
        ok = torch.isfinite(scores).to(self.sums.device)
        scores = scores.to(self.sums.device)
        self.sums.index_add_(0, idx[ok], scores[ok])
        self.counts.index_add_(0, idx[ok], torch.ones_like(scores[ok]))
        self.failed.index_add_(0, idx[~ok], torch.ones_like(scores[~ok]))

    def update_missing(self, categories: Sequence[str]) -> None:
        """Count samples that have no edit to judge (an unreadable source, an edit never produced)."""
        for c in categories:
            if c not in self._index:
                raise ValueError(f"unknown category {c!r}; known: {self.categories}")
            self.missing[self._index[c]] += 1

    def compute(self) -> dict[str, float]:
        per = torch.where(
            self.counts > 0, self.sums / self.counts.clamp(min=1), torch.full_like(self.sums, float("nan"))
        )
        present = self.counts > 0
        out = {f"category/{c}": float(per[i]) for i, c in enumerate(self.categories)}
        out["macro"] = float(per[present].mean()) if present.any() else float("nan")
        out["micro"] = float(self.sums.sum() / self.counts.sum()) if self.counts.sum() > 0 else float("nan")
        out["samples"] = float(self.counts.sum())
        out["failed"] = float(self.failed.sum())
        out["missing"] = float(self.missing.sum())
        for i, c in enumerate(self.categories):
            out[f"samples/{c}"] = float(self.counts[i])
            out[f"failed/{c}"] = float(self.failed[i])
            out[f"missing/{c}"] = float(self.missing[i])
        return out


def imgedit_sample_score(criteria_scores: Sequence[int] | None) -> float:
    """A sample's ImgEdit score: the mean of its three 1–5 criteria; NaN when its judgement failed."""
    if criteria_scores is None:
        return float("nan")
    return sum(criteria_scores) / len(criteria_scores)


def viescore_sample(sc_scores: Sequence[float] | None, pq_scores: Sequence[float] | None) -> tuple[float, float, float]:
    """(SC, PQ, O) of one sample: SC = min of the semantic-consistency pair, PQ = min of the quality pair,
    O = √(SC·PQ); NaN where a judgement failed."""
    sc = min(sc_scores) if sc_scores else float("nan")
    pq = min(pq_scores) if pq_scores else float("nan")
    o = math.sqrt(sc * pq) if math.isfinite(sc) and math.isfinite(pq) else float("nan")
    return sc, pq, o


class GEditScore(Metric):
    """G_SC, G_PQ, G_O: unweighted means over GEdit-Bench's task groups of the per-group means."""

    full_state_update = False

    def __init__(self, groups: Sequence[str] = GEDIT_GROUPS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sc, self.pq, self.o = (CategoryMean(groups) for _ in range(3))

    def update(self, groups: Sequence[str], sc: Sequence[float], pq: Sequence[float]) -> None:
        o = [math.sqrt(a * b) if math.isfinite(a) and math.isfinite(b) else float("nan") for a, b in zip(sc, pq)]
        self.sc.update(groups, sc)
        self.pq.update(groups, pq)
        self.o.update(groups, o)

    def compute(self) -> dict[str, float]:
        sc, pq, o = self.sc.compute(), self.pq.compute(), self.o.compute()
        out = {
            "G_SC": sc["macro"],
            "G_PQ": pq["macro"],
            "G_O": o["macro"],
            "failed": o["failed"],
            "samples": o["samples"],
            "missing": o["missing"],
        }
        for name, res in (("SC", sc), ("PQ", pq), ("O", o)):
            out.update({f"{name}/{k.split('/', 1)[1]}": v for k, v in res.items() if k.startswith("category/")})
        out.update({k: v for k, v in o.items() if k.startswith(("samples/", "failed/", "missing/"))})
        return out

    def update_missing(self, groups: Sequence[str]) -> None:
        for m in (self.sc, self.pq, self.o):
            m.update_missing(groups)

    def reset(self) -> None:
        super().reset()
        for m in (self.sc, self.pq, self.o):
            m.reset()
