"""DiffusionNFT, Flow-GRPO and AWM (and SFT on the true targets as the baseline) on the demo, compared by the
held-out and unseen scene reward they reach in the same training wall time.

Every run starts from the shipped demo base with the demo's reward and scenes (configs/demo.yaml), each
objective with its config (configs/objectives/<name>.yaml; SFT: configs/sft_demo.yaml), one run at a time with
the same thread count. A callback (:class:`RewardCurve`) evaluates the held-out and unseen splits (the demo's
SceneEvaluation protocol: fixed prompts and seeds, Euler) before training, every ``--every-steps`` optimiser
steps and every ``--every-s`` seconds of training wall time (rollouts, rewards and updates; the evaluations
themselves are not counted), and stops the run at ``--budget-s``. Written: a JSON of every point, a PNG (held-out
reward against seconds and against steps, mean ± std over seeds) and a Markdown table with the final rewards and
the time NFT needs to reach Flow-GRPO's final held-out reward divided by Flow-GRPO's time.

    python benchmarks/compare_objectives.py                                   # 4 arms x 3 seeds x 10 min ≈ 2.5 h
    python benchmarks/compare_objectives.py --seeds 0 --budget-s 30 --every-s 15 --every-steps 2 --count 4 \\
        --out /tmp/compare                                                    # a minutes-long check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "nft": "DiffusionNFT (Edit-R1)",
    "flow_grpo": "Flow-GRPO",
    "awm": "AWM",
    "sft": "SFT on the true targets",
}


class RewardCurve(L.Callback):
    """Held-out/unseen scene reward at step and wall-time marks; stops the run at ``budget_s`` of training time.

    Training time runs from the start of training and leaves out the time of these evaluations. A point is
    taken at the first batch end at or past each mark (``step_mark``/``time_mark`` record which it answers).
    """

    def __init__(
        self,
        path: str,
        budget_s: float = 600.0,
        every_s: float = 60.0,
        every_steps: int = 10,
        count: int = 64,
        group_size: int = 2,
        steps: int = 8,
    ) -> None:
        self.path, self.budget_s, self.every_s, self.every_steps = Path(path), budget_s, every_s, every_steps
        self.count, self.group_size, self.steps = count, group_size, steps
        self.points: list[dict] = []
        self.start = 0.0
        self.paused = 0.0
        self.next_time = every_s
        self.next_step = every_steps

    def train_s(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def _evaluate(self, trainer, pl_module, step_mark=None, time_mark=None) -> None:
        from editr1.evaluation.scenes import evaluate_scenes

        t0, train_s = time.perf_counter(), self.train_s() if self.start else 0.0
        point = {"step": trainer.global_step, "train_s": train_s, "step_mark": step_mark, "time_mark": time_mark}
        scenes = trainer.datamodule.scenes
        with pl_module.policy.adapter("default"):
            for split in ("heldout", "unseen"):
                res = evaluate_scenes(pl_module.policy, scenes, split, self.count, self.group_size, self.steps)
                point[split] = res.mean
        self.points.append(point)
        print(json.dumps(point), flush=True)
        self.paused += time.perf_counter() - t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.points, indent=1) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module, step_mark=0, time_mark=0.0)
        self.start, self.paused = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, train_s = trainer.global_step, self.train_s()
        step_mark = time_mark = None
        if step >= self.next_step:
            step_mark = self.next_step
            while self.next_step <= step:
                self.next_step += self.every_steps
        if train_s >= min(self.next_time, self.budget_s):
            time_mark = min(self.next_time, self.budget_s)
            while self.next_time <= train_s:
                self.next_time += self.every_s
        if step_mark is not None or time_mark is not None:
            self._evaluate(trainer, pl_module, step_mark, time_mark)
        if train_s >= self.budget_s:
            trainer.should_stop = True


def run(arm: str, seed: int, args) -> list[dict]:
    """One training run in its own process; returns its points."""
    out = Path(args.out)
    points_path = out / arm / f"seed{seed}" / "points.json"
    callback = {
        "class_path": "compare_objectives.RewardCurve",
        "init_args": {
            "path": str(points_path),
            "budget_s": args.budget_s,
            "every_s": args.every_s,
            "every_steps": args.every_steps,
            "count": args.count,
        },
    }
    cfg = out / arm / f"seed{seed}" / "callbacks.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({"trainer": {"callbacks": [callback]}}))  # JSON is YAML
    configs = ["configs/sft_demo.yaml"] if arm == "sft" else ["configs/demo.yaml", f"configs/objectives/{arm}.yaml"]
    cmd = [sys.executable, "-m", "editr1", "fit"]
    for c in configs:
        cmd += ["-c", str(ROOT / c)]
    cmd += [
        "-c",
        str(cfg),
        f"--seed_everything={seed}",
        "--trainer.max_steps=1000000",  # the callback stops the run at its budget
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={arm}/seed{seed}",
        *args.extra,
    ]
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    points = json.loads(points_path.read_text())
    last = points[-1]
    print(
        f"{arm} seed {seed}: {last['step']} steps in {last['train_s']:.0f} s of training "
        f"({time.perf_counter() - t0:.0f} s in all): heldout {points[0]['heldout']:.3f} -> {last['heldout']:.3f}, "
        f"unseen {points[0]['unseen']:.3f} -> {last['unseen']:.3f}",
        flush=True,
    )
    return points


def curve(runs: list[list[dict]], mark: str, split: str = "heldout") -> list[tuple[float, float, float, int]]:
    """``(x, mean, std, seeds)`` over the runs' points that answer each mark (``time_mark`` or ``step_mark``); x is
    the step mark, or for time marks the mean training time the points were actually taken at (the first batch
    end past the mark)."""
    by_mark: dict[float, list[dict]] = {}
    for points in runs:
        for p in points:
            if p[mark] is not None:
                by_mark.setdefault(p[mark], []).append(p)
    out = []
    for m, pts in sorted(by_mark.items()):
        v = [p[split] for p in pts]
        x = statistics.mean(p["train_s"] for p in pts) if mark == "time_mark" else m
        out.append((x, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)))
    return out


def time_to_reach(points: list[tuple[float, float, float, int]], target: float) -> float | None:
    """The first time the mean curve reaches ``target`` (linear between marks); ``None``: never."""
    for (t0, r0, *_), (t1, r1, *_) in zip(points, points[1:]):
        if r0 >= target:
            return t0
        if r1 >= target:
            return t0 + (t1 - t0) * (target - r0) / (r1 - r0)
    return points[-1][0] if points and points[-1][1] >= target else None


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def summarise(results: dict[str, list[list[dict]]], budget_s: float) -> str:
    lines = [
        "| objective | seeds | steps in budget | held-out before | held-out final | unseen final |",
        "|---|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        lines.append(
            f"| {ARMS[arm]} | {len(runs)} | {statistics.mean(r[-1]['step'] for r in runs):.0f} | "
            f"{mean_std([r[0]['heldout'] for r in runs])} | {mean_std([r[-1]['heldout'] for r in runs])} | "
            f"{mean_std([r[-1]['unseen'] for r in runs])} |"
        )
    if "nft" in results and "flow_grpo" in results:
        grpo = curve(results["flow_grpo"], "time_mark")
        target, t_grpo = grpo[-1][1], grpo[-1][0]
        t_nft = time_to_reach(curve(results["nft"], "time_mark"), target)
        if t_nft is None:
            lines.append(
                f"\nNFT did not reach Flow-GRPO's final held-out reward ({target:.3f}, after {t_grpo:.0f} s) within "
                f"its {budget_s:.0f} s of training."
            )
        else:
            t_first = time_to_reach(grpo, target)
            lines.append(
                f"\nTime for NFT to reach Flow-GRPO's final held-out reward ({target:.3f}) / Flow-GRPO's time: "
                f"{t_nft:.0f} s / {t_grpo:.0f} s = **{t_nft / t_grpo:.2f}** (goal: ≤ 0.33); against the time "
                f"Flow-GRPO's mean curve first reached it ({t_first:.0f} s): {t_nft / t_first:.2f}"
            )
    return "\n".join(lines)


def plot(results: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm, runs in results.items():
        for ax, mark, label in ((axes[0], "time_mark", "training wall time (s)"), (axes[1], "step_mark", "steps")):
            pts = curve(runs, mark)
            x = [p[0] for p in pts]
            m = [p[1] for p in pts]
            s = [p[2] for p in pts]
            ax.plot(x, m, marker="o", ms=3, label=ARMS[arm])
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
            ax.set_xlabel(label)
    axes[1].set_xscale("symlog", linthresh=30)  # SFT takes several times the steps of the RL arms
    axes[0].set_ylabel("held-out scene reward")
    axes[0].legend()
    seeds = max(len(r) for r in results.values())
    fig.suptitle(f"Objectives on the demo (mean ± std over {seeds} seed{'s' * (seeds > 1)})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objectives", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget-s", type=float, default=600.0, help="training wall time per run")
    p.add_argument("--every-s", type=float, default=60.0, help="evaluate every this many seconds of training")
    p.add_argument("--every-steps", type=int, default=10, help="and every this many optimiser steps")
    p.add_argument("--count", type=int, default=64, help="prompts per split per evaluation (2 edits each)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    p.add_argument("--out", default=str(ROOT / "runs" / "compare_objectives"), help="run folders and points")
    p.add_argument("--json", default=None, help="every point (default: <out>/compare_objectives.json)")
    p.add_argument("--png", default=None, help="the plot (default: <out>/compare_objectives.png)")
    p.add_argument("extra", nargs="*", help="more overrides for every run, after --")
    p.add_argument("--from-json", default=None, help="only redraw the plot and the table from this JSON")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results = {arm: list(runs.values()) for arm, runs in saved["points"].items()}
        png = Path(args.png) if args.png else Path(args.from_json).with_suffix(".png")
        plot(results, png)
        print(summarise(results, saved["settings"]["budget_s"]) + f"\n\nplot: {png}")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[list[dict]]] = {arm: [] for arm in args.objectives}
    for seed in args.seeds:  # seed-major: a cut-short comparison still has every objective
        for arm in args.objectives:
            results[arm].append(run(arm, seed, args))
    json_path = Path(args.json) if args.json else out / "compare_objectives.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "png", "from_json")}
    points = {arm: dict(zip(map(str, args.seeds), runs)) for arm, runs in results.items()}
    json_path.write_text(json.dumps({"settings": settings, "points": points}, indent=1) + "\n")
    png = Path(args.png) if args.png else out / "compare_objectives.png"
    plot(results, png)
    print(summarise(results, args.budget_s))
    print(f"\npoints: {json_path}\nplot: {png}")


if __name__ == "__main__":
    main()
