"""The ImgEdit Basic and GEdit-Bench protocols: prompt files, judge requests, per-sample scores, the
output layouts and the summary (JSON and Markdown).

* ImgEdit: one request per edit (the rubric of its edit type, ``<edit_prompt>`` replaced; the original,
  then the edit); three 1–5 criteria; the sample's score is their mean; **overall = the unweighted mean
  of the per-type means**. Outputs ``<key>.png``.
* GEdit-Bench: two requests per edit — semantic consistency (original + edit, ``<instruction>``
  replaced) and perceptual quality (the edit alone), each answering ``{"score": [a, b], …}``; SC and PQ
  are the minima, O = √(SC·PQ); **G_SC, G_PQ, G_O = unweighted means over the task groups**, for the
  full set and for the Intersection subset. Outputs ``fullset/<task>/<lang>/<key>.png``.

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
from typing import Any

from PIL import Image

from editr1.evaluation.judges import JudgeRequest, TextJudge, ask_parsed
from editr1.evaluation.protocols import (
    GEDIT_GROUPS,
    IMGEDIT_TYPES,
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
                raise ValueError(f"{f}: '# criteria:' must name three criteria separated by |, got {fields['criteria']!r}")
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
        return {"key": self.key, "category": self.category, **self.extra, "scores": scores, "failure": self.failure,
                "attempts": self.attempts, "answers": self.answers}


class ImgEditProtocol:
    """ImgEdit Basic: a rubric per edit type, three 1–5 criteria, overall = mean of the type means."""

    name = "imgedit"

    def __init__(self, rubric_dir: str | None = None, prompts_json: str | None = None, max_attempts: int = 3) -> None:
        self.rubrics = load_imgedit_rubrics(rubric_dir, prompts_json)
        self.max_attempts = max_attempts
        known = [t for t in IMGEDIT_TYPES if t in self.rubrics]
        self.categories = known + sorted(t for t in self.rubrics if t not in IMGEDIT_TYPES)

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
            requests.append(JudgeRequest([s.source, s.edit], rubric.text.replace("<edit_prompt>", s.prompt), text_first=True))
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


class GEditProtocol:
    """GEdit-Bench with VIEScore: SC and PQ calls, per-sample O = √(SC·PQ), group macro means."""

    name = "gedit"

    def __init__(self, sc_prompt_file: str | None = None, pq_prompt_file: str | None = None, max_attempts: int = 3,
                 groups: list[str] | None = None) -> None:
        self.sc_prompt, _ = read_prompt_file(sc_prompt_file or builtin_prompt("gedit", "sc.txt"))
        self.pq_prompt, _ = read_prompt_file(pq_prompt_file or builtin_prompt("gedit", "pq.txt"))
        if "<instruction>" not in self.sc_prompt:
            raise ValueError("the semantic-consistency prompt has no <instruction> placeholder")
        self.max_attempts = max_attempts
        self.categories = list(groups or GEDIT_GROUPS)

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
            out.append(SampleResult(
                s.key, s.category, {"SC": sc, "PQ": pq, "O": o}, ",".join(failures) or None,
                sc_j.attempts + pq_j.attempts, [{"sc": sc_j.answers, "pq": pq_j.answers}],
                {"prompt": s.prompt, "language": s.language, "intersection": s.intersection},
            ))
        return out


# ------------------------------------------------------------------------------------------ summary
def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """The summary as Markdown tables (one per category table)."""
    judge = summary.get("judge") or {}
    lines = [f"# {summary['protocol']} results", ""]
    lines.append(f"- judge: {judge.get('model', 'none (edits written, not judged)')}"
                 + (f" ({judge.get('kind')})" if judge else ""))
    lines.append(f"- samples: {summary['samples']}, judged: {summary['judged']}, failed: {summary['failed']}, "
                 f"missing: {summary['missing']}")
    lines.append(f"- formula: {summary['formula']}")
    if summary.get("categories_without_scores"):
        lines.append(f"- **not comparable to a full run**: no judged sample in {', '.join(summary['categories_without_scores'])} "
                     "(the overall is over the other categories)")
    lines.append("")
    for title, table in summary["tables"].items():
        heads = table["columns"]
        lines.append(f"## {title}")
        lines.append("")
        lines.append("| category | " + " | ".join(heads) + " | samples | failed | missing |")
        lines.append("|---" * (len(heads) + 4) + "|")
        for name, row in table["rows"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(h)) for h in heads)
                         + f" | {row['samples']:.0f} | {row['failed']:.0f} | {row['missing']:.0f} |")
        lines.append("| **overall (mean of categories)** | " + " | ".join(f"**{_fmt(table['overall'].get(h))}**" for h in heads)
                     + f" | {table['totals']['samples']:.0f} | {table['totals']['failed']:.0f} | "
                     f"{table['totals']['missing']:.0f} |")
        lines.append("")
    return "\n".join(lines)
