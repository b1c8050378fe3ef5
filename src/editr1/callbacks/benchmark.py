"""``editr1 test`` under a benchmark protocol (ImgEdit Basic, GEdit-Bench): layout, judging, summaries."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback

from editr1.callbacks.image_writer import safe_name
from editr1.callbacks.tensorboard import add_image, add_text, log_step
from editr1.evaluation.judges import TextJudge
from editr1.images import tensor_to_image, thumbnail
from editr1.training.guards import RunStopped
from editr1.visualize import captioned_grid

log = logging.getLogger(__name__)


def _file_name(key: str) -> str:
    """A benchmark key as a file name: unchanged when it is already safe (ImgEdit ids, GEdit keys)."""
    return key if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}", key) else safe_name(key)


def strict_json(obj):
    """``obj`` with every NaN or infinite number (and 0-d tensor) made JSON-safe: non-finite → ``null``."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class BenchmarkEvaluation(Callback):
    """``editr1 test`` on ImgEdit Basic or GEdit-Bench: writes every edit in the benchmark's own layout,
    judges it with ``judge`` under the benchmark's protocol, and reports per-category and overall scores
    (``summary.json``, ``summary.md``, per-sample ``samples.jsonl``, TensorBoard scalars, a per-category
    table and the best and worst edits). Inert unless ``protocol`` is set (and only in ``test``).

    Args:
        protocol: ``none``, ``imgedit`` or ``gedit`` (match ``data.test_format``; ``jsonl`` data is
            judged with either protocol, its ``task`` field naming the category).
        judge: the judge (:class:`editr1.evaluation.judges.ServedJudge` or ``LocalJudge``); ``null``
            writes the edits in the benchmark layout without judging them (for the official scripts).
        output_dir: where edits and summaries go; ``null`` = ``<run folder>/<protocol>``.
        rubric_dir: ImgEdit rubric files (``<edit_type>.txt``); ``null`` = editr1's own.
        prompts_json: the official ImgEdit ``prompts.json`` instead of rubric files.
        sc_prompt_file: GEdit semantic-consistency prompt (``<instruction>`` placeholder); ``null`` = ours.
        pq_prompt_file: GEdit perceptual-quality prompt; ``null`` = ours.
        max_attempts: judge calls per judgement before it is reported as failed (unparsable answers and
            transport failures both count).
        show: best and worst edits shown in TensorBoard.
    """

    def __init__(
        self,
        protocol: Literal["none", "imgedit", "gedit"] = "none",
        judge: TextJudge | None = None,
        output_dir: str | None = None,
        rubric_dir: str | None = None,
        prompts_json: str | None = None,
        sc_prompt_file: str | None = None,
        pq_prompt_file: str | None = None,
        max_attempts: int = 3,
        show: int = 4,
    ) -> None:
        if protocol not in ("none", "imgedit", "gedit"):
            raise ValueError(f"benchmark.protocol must be none, imgedit or gedit, got {protocol!r}")
        if judge is not None and not isinstance(judge, TextJudge):
            raise TypeError(
                f"benchmark.judge must be a TextJudge (LocalJudge, ServedJudge), got {type(judge).__name__}"
            )
        if max_attempts < 1:
            raise ValueError(f"benchmark.max_attempts must be >= 1, got {max_attempts}")
        self.protocol_name = protocol
        self.judge = judge
        self.output_dir = output_dir
        self.rubric_dir = rubric_dir
        self.prompts_json = prompts_json
        self.sc_prompt_file = sc_prompt_file
        self.pq_prompt_file = pq_prompt_file
        self.max_attempts = max_attempts
        self.show = show
        self.protocol = None
        self.active = False

    # ------------------------------------------------------------------------------ set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.active = stage == "test" and self.protocol_name != "none"
        if not self.active:
            return
        from editr1.data.datamodule import EditDataModule
        from editr1.evaluation.benchmark import make_protocol

        self.protocol = make_protocol(
            self.protocol_name,
            self.max_attempts,
            rubric_dir=self.rubric_dir,
            prompts_json=self.prompts_json,
            sc_prompt_file=self.sc_prompt_file,
            pq_prompt_file=self.pq_prompt_file,
        )
        dm = getattr(trainer, "datamodule", None)
        if isinstance(dm, EditDataModule):
            ds = dm.dataset("test")
            self.languages, self.skipped_rows = list(dm.test_languages), dm.skipped_rows("test")
        else:  # some other datamodule: nothing known about its test set before the edits
            ds, self.languages, self.skipped_rows = None, ["en"], {}
        tasks = ds.tasks() if hasattr(ds, "tasks") else None
        if tasks is not None:  # every category must be known before any edit is made
            for t in sorted(set(tasks)):
                self.protocol.category(t)

    def on_test_start(self, trainer, pl_module) -> None:
        if not self.active:
            return
        if self.judge is not None:
            self.judge.to(pl_module.device)  # a local judge joins the policy on its device
        root = self.output_dir or str(Path(trainer.log_dir or trainer.default_root_dir) / self.protocol_name)
        self.out = Path(root)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = self.protocol.metrics(pl_module.device, self.languages)
        self.samples_file = self.out / f"samples.rank{trainer.global_rank}.jsonl"
        self.samples_file.unlink(missing_ok=True)
        self.extremes: list[tuple] = []
        self.written = 0
        self.missing = 0
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------ per batch
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.active:
            return
        from editr1.evaluation.benchmark import Sample, SampleResult

        lines = []
        for m in batch.get("missing") or []:
            cat = self.protocol.category(m["task"])
            self.protocol.update_missing(self.metrics, cat, m["meta"])
            lines.append({"key": m["key"], "category": cat, "failure": f"missing:{m['reason']}", "scores": None})
            self.missing += 1
        samples, files = [], []
        for i, key in enumerate(outputs["keys"]):
            meta = outputs["meta"][i]
            if meta.get("padding"):
                continue
            cat = self.protocol.category(outputs["tasks"][i])
            lang = meta.get("language", "en")
            rel = self.protocol.output_path(_file_name(key), outputs["tasks"][i], lang)
            path = self.out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            edit = tensor_to_image(outputs["edits"][i])
            edit.save(path)
            samples.append(
                Sample(key, cat, outputs["prompts"][i], batch["image"][i], edit, lang, bool(meta.get("intersection")))
            )
            files.append(rel)
            self.written += 1
        if not samples and not lines:
            return
        if self.judge is not None and samples:
            results = self.protocol.judge(self.judge, samples)
        else:
            results = [SampleResult(s.key, s.category, {}, "not_judged") for s in samples]
        for s, r, rel in zip(samples, results, files):
            if self.judge is not None:
                self.protocol.update(self.metrics, r, {"language": s.language, "intersection": s.intersection})
            lines.append(dict(r.to_json(), file=rel))
            if r.headline == r.headline:  # finite: a candidate for the best / worst lists
                self.extremes.append((r.headline, s.key, s.category, s.prompt, thumbnail(s.source), thumbnail(s.edit)))
        self.extremes.sort(key=lambda e: e[0])
        if len(self.extremes) > 2 * self.show:
            self.extremes = self.extremes[: self.show] + self.extremes[-self.show :]
        with self.samples_file.open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------------------ summary
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if not self.active:
            return
        judged = self.judge is not None
        results = {k: m.compute() for k, m in self.metrics.items()} if judged else {}  # reduced over processes
        extremes, counts = self.extremes, Counter(getattr(self.judge, "counts", {}) or {})
        written, missing = self.written, self.missing
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (extremes, counts, written, missing))
            extremes = sorted((e for g in gathered for e in g[0]), key=lambda e: e[0])
            counts = sum((Counter(g[1]) for g in gathered), Counter())
            written, missing = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
        trainer.strategy.barrier()
        summary = self._summary(results, counts, written, missing, pl_module)
        self._log(trainer, pl_module, summary, extremes)
        if trainer.is_global_zero:
            self._write(summary)
        if self.judge is not None and summary["samples"] and not summary["judged"]:
            raise RunStopped(  # on every process alike: the summary is the same everywhere
                f"{self.protocol_name}: not one of {summary['samples']} edits could be judged (failed "
                f"{summary['failed']}, missing {summary['missing']}) by {summary['judge']}; judge calls "
                f"{summary['judge_calls']}. Is the judge running? The edits and summary are in {self.out}"
            )

    def _summary(self, results: dict, counts: dict, written: int, missing: int, pl_module) -> dict:
        from editr1.evaluation.benchmark import SummaryParts

        parts = self.protocol.summary(results) if results else SummaryParts()
        tables, headline, totals = parts.tables, parts.headline, parts.totals
        judged = self.judge is not None
        return {
            "protocol": self.protocol_name,
            "judge": self.judge.info() if judged else None,
            "judge_calls": dict(sorted(counts.items())),
            "policy": {
                "pipeline": type(getattr(pl_module.policy, "pipe", None)).__name__,
                "adapter": pl_module.evaluation.adapter,
                "steps": pl_module.evaluation.steps,
                "solver": pl_module.evaluation.solver,
                "seed": pl_module.seed,
            },
            "samples": written + missing,
            "edits_written": written,
            "judged": int(totals["samples"]),
            "failed": int(totals["failed"]),
            "missing": missing,
            "skipped_rows": self.skipped_rows,
            "formula": parts.formula,
            "headline": headline if judged else None,
            # categories that had samples but not one judged: the overall above is over the others only
            "categories_without_scores": sorted(
                {
                    c
                    for t in tables.values()
                    for c, row in t["rows"].items()
                    if row["samples"] == 0 and row["failed"] + row["missing"] > 0
                }
            ),
            "tables": tables if judged else {},
            "max_attempts": self.max_attempts,
            "output_dir": str(self.out),
            "wall_s": round(time.perf_counter() - self.started, 1),
        }

    def _log(self, trainer, pl_module, summary: dict, extremes: list) -> None:
        if summary["headline"] is None:
            return
        prefix = f"test/{self.protocol_name}"
        for table in summary["tables"].values():
            tag = "" if table["id"] is None else "/" + table["id"].replace("/", "_")  # e.g. /en_fullset
            for col, v in table["overall"].items():
                pl_module.log(f"{prefix}{tag}/overall_{col}", float(v), sync_dist=False, rank_zero_only=True)
            for cat, row in table["rows"].items():
                for col in table["columns"]:
                    if row[col] == row[col]:
                        pl_module.log(
                            f"{prefix}{tag}/{cat}_{col}", float(row[col]), sync_dist=False, rank_zero_only=True
                        )
        from editr1.evaluation.benchmark import summary_markdown

        step = log_step(trainer)
        add_text(trainer, f"{prefix}/table", summary_markdown(summary), step)
        n = min(self.show, len(extremes) // 2 if len(extremes) < 2 * self.show else self.show)
        for name, picks in (("best", list(reversed(extremes))[:n]), ("worst", extremes[:n])):
            if not picks:
                continue
            rows = [[p[4], p[5]] for p in picks]
            caps = [[f"{p[2]} #{p[1]}", f"{p[0]:.2f}"] for p in picks]
            add_image(trainer, f"{prefix}/{name}_edits", captioned_grid(rows, caps), step)
            listing = "\n".join(f"- {p[0]:.3f} · {p[2]} · `{p[1]}` · {p[3]}" for p in picks)
            add_text(trainer, f"{prefix}/{name}_edits", listing, step)

    def _write(self, summary: dict) -> None:
        from editr1.evaluation.benchmark import summary_markdown

        lines = []
        for f in sorted(self.out.glob("samples.rank*.jsonl")):
            lines.extend(json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip())
            f.unlink()
        lines.sort(key=lambda x: x["key"])
        with (self.out / "samples.jsonl").open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(strict_json(line), ensure_ascii=False, allow_nan=False) + "\n")
        text = json.dumps(strict_json(summary), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        (self.out / "summary.json").write_text(text, encoding="utf-8")
        if summary["headline"] is not None:
            (self.out / "summary.md").write_text(summary_markdown(summary) + "\n", encoding="utf-8")
        log.info("%s: wrote %s", self.protocol_name, self.out / "summary.json")
        print(f"{self.protocol_name}: edits and summary in {self.out}")
        if summary["judge"] is not None:
            print(
                f"{self.protocol_name}: {summary['samples']} samples, judged {summary['judged']}, failed "
                f"{summary['failed']}, missing {summary['missing']}"
            )
        if summary["headline"] is not None:
            print(json.dumps(strict_json(summary["headline"]), indent=1))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.judge is not None:
            self.judge.close()
