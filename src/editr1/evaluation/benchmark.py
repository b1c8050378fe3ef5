"""The ImgEdit Basic and GEdit-Bench protocols: prompt files, judge requests, per-sample scores, the
output layouts and the summary (JSON and Markdown).

* ImgEdit: one request per edit (the rubric of its edit type, ``<edit_prompt>`` replaced; the original,
  then the edit); three 1–5 criteria; the sample's score is their mean; **overall = the unweighted mean
  of the per-type means**. Outputs ``<key>.png``.
* GEdit-Bench: two requests per edit — semantic consistency (original + edit, ``<instruction>``
  replaced) and perceptual quality (the edit alone), each answering ``{"score": [a, b], …}``; SC and PQ
  are the minima, O = √(SC·PQ); **G_SC, G_PQ, G_O = unweighted means over the task groups**, for the
  full set and for the Intersection subset. Outputs ``fullset/<task>/<lang>/<key>.png``.

Each protocol is a :class:`BenchmarkProtocol` (``PROTOCOLS`` maps ``imgedit`` / ``gedit`` to the classes): it owns
its categories, layout, judge calls, metrics and its part of the summary, so that the ``editr1 test`` callback
(:class:`editr1.callbacks.BenchmarkEvaluation`) never needs to know which benchmark it runs.

Our own prompt texts ship in ``editr1/evaluation/prompts`` (same structure as the benchmarks': criteria,
scales, answer format). Point ``rubric_dir`` / ``prompts_json`` / ``sc_prompt_file`` / ``pq_prompt_file``
at the official files to reproduce published numbers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image
from torchmetrics import Metric

from editr1.evaluation.judges import JudgeRequest, TextJudge, ask_parsed
from editr1.evaluation.protocols import (
    GEDIT_GROUPS,
    IMGEDIT_TYPES,
    CategoryMean,
    GEditScore,
    imgedit_sample_score,
    parse_rubric_lines,
    parse_rubric_scores,
    parse_viescore,
    viescore_sample,
)

IMGEDIT_ALIASES = {"alter": "adjust", "compose": "hybrid"}  # names used in basic_edit.json → the paper's


def imgedit_type(name: str) -> str:
    """The canonical ImgEdit type of an ``edit_type`` value (``alter`` → ``adjust``, ``compose`` → ``hybrid``)."""
    t = str(name).strip().lower()
    return IMGEDIT_ALIASES.get(t, t)


def builtin_prompt(*parts: str) -> Path:
    return Path(str(resources.files("editr1.evaluation").joinpath("prompts", *parts)))


def read_prompt_file(path: str | Path) -> tuple[str, dict[str, str]]:
    """A prompt file's text and its header fields: leading lines starting with ``#`` are not sent; a
    header line ``# key: value`` sets a field (``criteria: A | B | C``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} not found")
    lines = p.read_text(encoding="utf-8").splitlines()
    fields: dict[str, str] = {}
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        m = re.match(r"#\s*([A-Za-z_]+)\s*:\s*(.+)$", lines[i])
        if m and m.group(1).lower() == "criteria":
            fields["criteria"] = m.group(2).strip()
        i += 1
    text = "\n".join(lines[i:]).strip()
    if not text:
        raise ValueError(f"prompt file {p} has no text after its header")
    return text, fields


@dataclass
class Rubric:
    """One edit type's judge prompt and the names of its three criteria (``None``: any three
    ``Name: <int>`` lines, as the official prompts' answers are read)."""

    text: str
    criteria: list[str] | None = None

    def parse(self, answer: str) -> list[int] | None:
        if self.criteria:
            return parse_rubric_scores(answer, self.criteria)
        return parse_rubric_lines(answer, 3)


def load_imgedit_rubrics(rubric_dir: str | None = None, prompts_json: str | None = None) -> dict[str, Rubric]:
    """Rubrics by canonical type: ``<type>.txt`` files of ``rubric_dir`` (ours when ``None``), or the
    official ``prompts.json`` (``{edit_type: prompt}``) when given."""
    rubrics: dict[str, Rubric] = {}
    if prompts_json is not None:
        data = json.loads(Path(prompts_json).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{prompts_json}: expected a JSON object of edit type → prompt text")
        for name, text in data.items():
            rubrics[imgedit_type(name)] = Rubric(text)
    else:
        folder = Path(rubric_dir) if rubric_dir is not None else builtin_prompt("imgedit")
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no <edit_type>.txt rubric files in {folder}")
        for f in files:
            text, fields = read_prompt_file(f)
            criteria = [c.strip() for c in fields["criteria"].split("|")] if "criteria" in fields else None
            if criteria is not None and (len(criteria) != 3 or not all(criteria)):
                raise ValueError(
                    f"{f}: '# criteria:' must name three criteria separated by |, got {fields['criteria']!r}"
                )
            rubrics[imgedit_type(f.stem)] = Rubric(text, criteria)
    for name, r in rubrics.items():
        if "<edit_prompt>" not in r.text:
            raise ValueError(f"the {name!r} rubric has no <edit_prompt> placeholder for the instruction")
    return rubrics


@dataclass
class Sample:
    """One benchmark edit to judge."""

    key: str
    category: str
    prompt: str
    source: Image.Image
    edit: Image.Image
    language: str = "en"
    intersection: bool = False


@dataclass
class SampleResult:
    key: str
    category: str
    scores: dict[str, float]
    failure: str | None = None  # None, or why some judgement failed (e.g. "parse", "pq:transport")
    attempts: int = 0
    answers: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> float:
        """The score the best/worst lists rank by (NaN when failed)."""
        return self.scores.get("score", self.scores.get("O", math.nan))

    def to_json(self) -> dict:
        scores = {k: (None if not math.isfinite(v) else v) for k, v in self.scores.items()}
        return {
            "key": self.key,
            "category": self.category,
            **self.extra,
            "scores": scores,
            "failure": self.failure,
            "attempts": self.attempts,
            "answers": self.answers,
        }


@dataclass
class SummaryParts:
    """A protocol's share of ``summary.json``: its score tables (display title → ``{"id", "columns", "rows",
    "overall", "totals"}``), its headline numbers, the formula behind them and the totals (``samples``,
    ``failed``) the summary's ``judged`` and ``failed`` come from. The defaults are those of an unjudged run."""

    tables: dict[str, dict] = field(default_factory=dict)
    headline: dict | None = None
    formula: str = ""
    totals: dict = field(default_factory=lambda: {"samples": 0, "failed": 0})


class BenchmarkProtocol:
    """What a benchmark protocol knows, so that :class:`editr1.callbacks.BenchmarkEvaluation` needs to know
    none of it: its categories (:meth:`category`), its output layout (:meth:`output_path`), its judge calls
    (:meth:`judge`), its metrics (:meth:`metrics`, keyed by :meth:`metric_keys`, fed by :meth:`update` and
    :meth:`update_missing`) and its summary (:meth:`summary`)."""

    name: ClassVar[str]
    formula: ClassVar[str]
    categories: list[str]

    @classmethod
    def from_options(cls, max_attempts: int = 3, **options: Any) -> BenchmarkProtocol:
        """The protocol from the callback's options (``rubric_dir``, ``prompts_json``, ``sc_prompt_file``,
        ``pq_prompt_file``); those of other protocols are ignored."""
        raise NotImplementedError

    def category(self, task: str) -> str:
        """The category a sample's ``task`` counts under; raises ``ValueError`` for an unknown one."""
        raise NotImplementedError

    @staticmethod
    def output_path(key: str, task: str, language: str) -> str:
        """Where an edit goes under the output folder, in the benchmark's own layout."""
        raise NotImplementedError

    def judge(self, judge: TextJudge, samples: list[Sample]) -> list[SampleResult]:
        """Judge ``samples`` with ``judge`` under the protocol: one result each, in order."""
        raise NotImplementedError

    def metrics(self, device: Any, languages: list[str]) -> dict[str, Metric]:
        """Fresh metrics on ``device``, by metric key (the test set's instruction ``languages`` may matter)."""
        raise NotImplementedError

    def metric_keys(self, meta: dict) -> list[str]:
        """The metrics a sample counts in, from its ``meta`` (``language``, ``intersection``)."""
        raise NotImplementedError

    def update(self, metrics: dict[str, Metric], result: SampleResult, meta: dict) -> None:
        """Count one judged sample (a failed judgement's NaN scores count as failed)."""
        raise NotImplementedError

    def update_missing(self, metrics: dict[str, Metric], category: str, meta: dict) -> None:
        """Count one sample that has no edit to judge."""
        for k in self.metric_keys(meta):
            metrics[k].update_missing([category])

    def summary(self, results: dict[str, dict]) -> SummaryParts:
        """Tables, headline, formula and totals from the computed metrics (``{key: metric.compute()}``)."""
        raise NotImplementedError


def _row_counts(r: dict, c: str) -> dict[str, float]:
    return {"samples": r[f"samples/{c}"], "failed": r[f"failed/{c}"], "missing": r[f"missing/{c}"]}


def _totals(r: dict) -> dict[str, float]:
    return {k: r[k] for k in ("samples", "failed", "missing")}


class ImgEditProtocol(BenchmarkProtocol):
    """ImgEdit Basic: a rubric per edit type, three 1–5 criteria, overall = mean of the type means."""

    name = "imgedit"
    formula = (
        "sample = mean of its three 1-5 criteria; type = mean of its samples; "
        "overall = unweighted mean of the type means"
    )

    def __init__(self, rubric_dir: str | None = None, prompts_json: str | None = None, max_attempts: int = 3) -> None:
        self.rubrics = load_imgedit_rubrics(rubric_dir, prompts_json)
        self.max_attempts = max_attempts
        known = [t for t in IMGEDIT_TYPES if t in self.rubrics]
        self.categories = known + sorted(t for t in self.rubrics if t not in IMGEDIT_TYPES)

    @classmethod
    def from_options(
        cls, max_attempts: int = 3, rubric_dir: str | None = None, prompts_json: str | None = None, **_: Any
    ) -> ImgEditProtocol:
        return cls(rubric_dir, prompts_json, max_attempts)

    def category(self, task: str) -> str:
        t = imgedit_type(task)
        if t not in self.rubrics:
            raise ValueError(f"no ImgEdit rubric for edit type {task!r} (rubrics: {sorted(self.rubrics)})")
        return t

    @staticmethod
    def output_path(key: str, task: str, language: str) -> str:
        return f"{key}.png"

    def judge(self, judge: TextJudge, samples: list[Sample]) -> list[SampleResult]:
        requests, parsers = [], []
        for s in samples:
            rubric = self.rubrics[s.category]
            text = rubric.text.replace("<edit_prompt>", s.prompt)
            requests.append(JudgeRequest([s.source, s.edit], text, text_first=True))
            parsers.append(rubric.parse)
        judged = ask_parsed(judge, requests, parsers, self.max_attempts)
        out = []
        for s, j in zip(samples, judged):
            scores = {"score": imgedit_sample_score(j.value)}
            if j.value is not None:
                names = self.rubrics[s.category].criteria or ["criterion_1", "criterion_2", "criterion_3"]
                scores.update({n: float(v) for n, v in zip(names, j.value)})
            out.append(SampleResult(s.key, s.category, scores, j.failure, j.attempts, j.answers, {"prompt": s.prompt}))
        return out

    def metrics(self, device: Any, languages: list[str]) -> dict[str, CategoryMean]:
        return {"all": CategoryMean(self.categories).to(device)}  # one table whatever the languages

    def metric_keys(self, meta: dict) -> list[str]:
        return ["all"]

    def update(self, metrics: dict[str, Metric], result: SampleResult, meta: dict) -> None:
        for k in self.metric_keys(meta):
            metrics[k].update([result.category], [result.scores["score"]])

    def summary(self, results: dict[str, dict]) -> SummaryParts:
        r = results["all"]
        rows = {c: {"score": r[f"category/{c}"], **_row_counts(r, c)} for c in self.categories}
        tables = {
            "ImgEdit Basic": {
                "id": None,
                "columns": ["score"],
                "rows": rows,
                "overall": {"score": r["macro"]},
                "totals": _totals(r),
            }
        }
        return SummaryParts(tables, {"overall": r["macro"], "micro": r["micro"]}, self.formula, r)


class GEditProtocol(BenchmarkProtocol):
    """GEdit-Bench with VIEScore: SC and PQ calls, per-sample O = √(SC·PQ), group macro means, per
    instruction language for the full set and the Intersection subset (metric keys ``<lang>/fullset``,
    ``<lang>/intersection``)."""

    name = "gedit"
    formula = (
        "SC = min of the two 0-10 scores of the call with both images; PQ = min of the two of the call "
        "with the edit; O = sqrt(SC*PQ) per sample; G_SC, G_PQ, G_O = unweighted means over the groups"
    )
    subsets = ("fullset", "intersection")

    def __init__(
        self,
        sc_prompt_file: str | None = None,
        pq_prompt_file: str | None = None,
        max_attempts: int = 3,
        groups: list[str] | None = None,
    ) -> None:
        self.sc_prompt, _ = read_prompt_file(sc_prompt_file or builtin_prompt("gedit", "sc.txt"))
        self.pq_prompt, _ = read_prompt_file(pq_prompt_file or builtin_prompt("gedit", "pq.txt"))
        if "<instruction>" not in self.sc_prompt:
            raise ValueError("the semantic-consistency prompt has no <instruction> placeholder")
        self.max_attempts = max_attempts
        self.categories = list(groups or GEDIT_GROUPS)

    @classmethod
    def from_options(
        cls, max_attempts: int = 3, sc_prompt_file: str | None = None, pq_prompt_file: str | None = None, **_: Any
    ) -> GEditProtocol:
        return cls(sc_prompt_file, pq_prompt_file, max_attempts)

    def category(self, task: str) -> str:
        if task not in self.categories:
            raise ValueError(f"unknown GEdit-Bench task type {task!r} (groups: {self.categories})")
        return task

    @staticmethod
    def output_path(key: str, task: str, language: str) -> str:
        return f"fullset/{task}/{language}/{key}.png"

    def judge(self, judge: TextJudge, samples: list[Sample]) -> list[SampleResult]:
        requests = []
        for s in samples:
            requests.append(JudgeRequest([s.source, s.edit], self.sc_prompt.replace("<instruction>", s.prompt)))
            requests.append(JudgeRequest([s.edit], self.pq_prompt))
        judged = ask_parsed(judge, requests, parse_viescore, self.max_attempts)
        out = []
        for i, s in enumerate(samples):
            sc_j, pq_j = judged[2 * i], judged[2 * i + 1]
            sc, pq, o = viescore_sample(sc_j.value, pq_j.value)
            failures = [f"{n}:{j.failure}" for n, j in (("sc", sc_j), ("pq", pq_j)) if j.value is None]
            out.append(
                SampleResult(
                    s.key,
                    s.category,
                    {"SC": sc, "PQ": pq, "O": o},
                    ",".join(failures) or None,
                    sc_j.attempts + pq_j.attempts,
                    [{"sc": sc_j.answers, "pq": pq_j.answers}],
                    {"prompt": s.prompt, "language": s.language, "intersection": s.intersection},
                )
            )
        return out

    def metrics(self, device: Any, languages: list[str]) -> dict[str, GEditScore]:
        """``<lang>/fullset`` and ``<lang>/intersection`` per language, in the order of ``languages`` (the
        first language's full set gives the summary's totals)."""
        return {
            f"{lang}/{subset}": GEditScore(self.categories).to(device) for lang in languages for subset in self.subsets
        }

    def metric_keys(self, meta: dict) -> list[str]:
        lang = meta.get("language", "en")
        return [f"{lang}/fullset"] + ([f"{lang}/intersection"] if meta.get("intersection") else [])

    def update(self, metrics: dict[str, Metric], result: SampleResult, meta: dict) -> None:
        for k in self.metric_keys(meta):
            metrics[k].update([result.category], [result.scores["SC"]], [result.scores["PQ"]])

    def summary(self, results: dict[str, dict]) -> SummaryParts:
        tables: dict[str, dict] = {}
        headline: dict = {}
        for key, r in results.items():
            lang, subset = key.split("/")
            rows = {
                c: {"SC": r[f"SC/{c}"], "PQ": r[f"PQ/{c}"], "O": r[f"O/{c}"], **_row_counts(r, c)}
                for c in self.categories
            }
            tables[f"GEdit-Bench-{lang.upper()} {subset}"] = {
                "id": key,
                "columns": ["SC", "PQ", "O"],
                "rows": rows,
                "overall": {"SC": r["G_SC"], "PQ": r["G_PQ"], "O": r["G_O"]},
                "totals": _totals(r),
            }
            headline[key] = {"G_SC": r["G_SC"], "G_PQ": r["G_PQ"], "G_O": r["G_O"]}
        first = next(k for k in results if k.endswith("/fullset"))  # the first language's full set
        return SummaryParts(tables, headline, self.formula, results[first])


PROTOCOLS: dict[str, type[BenchmarkProtocol]] = {p.name: p for p in (ImgEditProtocol, GEditProtocol)}


def make_protocol(name: str, max_attempts: int = 3, **options: Any) -> BenchmarkProtocol:
    """The protocol called ``name`` (``imgedit``, ``gedit``) from the callback's options."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown benchmark protocol {name!r} (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name].from_options(max_attempts=max_attempts, **options)


# ------------------------------------------------------------------------------------------ summary
def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """The summary as Markdown tables (one per category table)."""
    judge = summary.get("judge") or {}
    lines = [f"# {summary['protocol']} results", ""]
    lines.append(
        f"- judge: {judge.get('model', 'none (edits written, not judged)')}"
        + (f" ({judge.get('kind')})" if judge else "")
    )
    lines.append(
        f"- samples: {summary['samples']}, judged: {summary['judged']}, failed: {summary['failed']}, "
        f"missing: {summary['missing']}"
    )
    lines.append(f"- formula: {summary['formula']}")
    if summary.get("categories_without_scores"):
        empty = ", ".join(summary["categories_without_scores"])
        lines.append(
            f"- **not comparable to a full run**: no judged sample in {empty} "
            "(the overall is over the other categories)"
        )
    lines.append("")
    for title, table in summary["tables"].items():
        heads = table["columns"]
        lines.append(f"## {title}")
        lines.append("")
        lines.append("| category | " + " | ".join(heads) + " | samples | failed | missing |")
        lines.append("|---" * (len(heads) + 4) + "|")
        for name, row in table["rows"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(_fmt(row.get(h)) for h in heads)
                + f" | {row['samples']:.0f} | {row['failed']:.0f} | {row['missing']:.0f} |"
            )
        overall = " | ".join(f"**{_fmt(table['overall'].get(h))}**" for h in heads)
        totals = table["totals"]
        lines.append(
            f"| **overall (mean of categories)** | {overall} | {totals['samples']:.0f} | "
            f"{totals['failed']:.0f} | {totals['missing']:.0f} |"
        )
        lines.append("")
    return "\n".join(lines)
