"""The demo against the tiny judge (configs/demo_judge.yaml): ablations over seeds, written to docs/results.

Arms: the default run (logit-expected score, paper filter), without the group filter, with the sampled
digit as the reward, and with the released code's stricter mask (which, under a judge whose group means stay
below τμ, drops exactly the groups whose spread is under τσ), at the paper's τσ and at one scaled to this
judge; and, as the filter is meant for, advantages over each group's own std, without and with that filter.
Each run's gold (the verifiable scene reward) is read from its SceneEvaluation table (held-out and
unseen scenes before/after) and, over training, from TensorBoard (``val/reward`` = the judge,
``val/gold_reward`` = the scene reward, on the validation prompts). A run editr1's guards stop is kept with
the reason it printed. Runs go two at a time, one core each.

    python benchmarks/judge_ablations.py --seeds 0 1 2 --out /tmp/judge_ablations
    python benchmarks/judge_ablations.py --runs sampled:0 default:1 --out /tmp/judge_ablations   # these runs
    python benchmarks/judge_ablations.py --from-json docs/results/judge_ablations.json   # the table again
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS: dict[str, tuple[str, list[str]]] = {
    "default": ("judge, logit-expected score, paper filter", []),
    "no_filter": ("judge, without group filtering", ["--reward.filter.rule=none"]),
    "sampled": ("judge, a sampled digit as the reward", ["--reward.model.init_args.score=sampled"]),
    "strict": ("judge, the released code's filter (keep std > τσ and mean < τμ)", ["--reward.filter.rule=strict"]),
    "strict_scaled": (
        "judge, the released code's filter with τσ = 0.003 (this judge's typical within-group std)",
        ["--reward.filter.rule=strict", "--reward.filter.std_threshold=0.003"],
    ),
    "group_std": ("judge, advantages over each group's own std", ["--model.nft.std_mode=group"]),
    "group_std_scaled": (
        "judge, each group's own std, the strict filter with τσ = 0.003",
        ["--model.nft.std_mode=group", "--reward.filter.rule=strict", "--reward.filter.std_threshold=0.003"],
    ),
}


DROP = "filter/frac_groups_dropped"
CURVES = ("val/reward", "val/gold_reward", DROP, "reward_std")


def curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """``val/reward`` and ``val/gold_reward`` (and, per training step, the share of groups the filter dropped and
    the mean within-group std of the judge's scores) as [step, value] pairs from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    return {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in CURVES if t in tags}


def launch(arm: str, seed: int, out: Path, core: int) -> tuple[subprocess.Popen, float]:
    args = ["fit", "-c", str(ROOT / "configs" / "demo_judge.yaml"), *ARMS[arm][1], f"--seed_everything={seed}"]
    args += [f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={arm}/seed{seed}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "editr1", *args]
    log = open(out / f"{arm}-seed{seed}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env), time.perf_counter()


def collect(arm: str, seed: int, out: Path, wall: float, returncode: int) -> dict:
    """One run's figures; a run that stopped (editr1's guards) is kept with the reason it printed."""
    run_dir = sorted((out / arm / f"seed{seed}").glob("version_*"))[-1]
    r = {"arm": arm, "seed": seed, "wall_s": wall, "curves": curves(run_dir)}
    if returncode != 0:
        lines = (out / f"{arm}-seed{seed}.log").read_text(errors="replace").splitlines()
        stops = [ln.strip() for ln in lines if "stopped:" in ln]
        if not stops:
            raise SystemExit(f"{arm}/seed{seed} failed; see {out / f'{arm}-seed{seed}.log'}")
        return {**r, "stopped": stops[-1]}
    return {**r, "scene_eval": json.loads((run_dir / "scene_eval.json").read_text())}


def dropped(rs: list[dict]) -> str:
    """The share of groups the filter dropped over the run, over the runs that logged it ("–": none did)."""
    drops = [statistics.mean(v for _, v in r["curves"][DROP]) for r in rs if DROP in r["curves"]]
    return f"{100 * statistics.mean(drops):.1f}% ({len(drops)} run{'s' * (len(drops) > 1)})" if drops else "–"


def stop_reason(message: str) -> str:
    """``editr1 fit: stopped: <why>; stopped. Last: step N: …`` → ``stopped after N trained steps: <why>``."""
    why = message.split("stopped: ", 1)[-1].split("; stopped.")[0]
    step = re.search(r"Last: step (\d+)", message)
    return f"stopped after {step.group(1)} trained steps: {why}" if step else f"stopped: {why}"


def table(results: list[dict]) -> str:
    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    rows = [
        "| arm | gold held-out before → after | gold unseen after | judge val/reward first → last | groups dropped |"
    ]
    rows.append("|---|---|---|---|---|")
    for arm, (label, _) in ARMS.items():
        stopped = [r for r in results if r["arm"] == arm and "stopped" in r]
        for r in stopped:
            rows.append(f"| {label}, seed {r['seed']} | {stop_reason(r['stopped'])} | | | {dropped([r])} |")
        rs = [r for r in results if r["arm"] == arm and "stopped" not in r]
        if not rs:
            continue
        before = [r["scene_eval"]["before"]["heldout"]["mean"] for r in rs]
        after = [r["scene_eval"]["after"]["heldout"]["mean"] for r in rs]
        unseen = [r["scene_eval"]["after"]["unseen"]["mean"] for r in rs]
        j0 = [r["curves"]["val/reward"][0][1] for r in rs]
        j1 = [r["curves"]["val/reward"][-1][1] for r in rs]
        rows.append(f"| {label} | {ms(before)} → {ms(after)} | {ms(unseen)} | {ms(j0)} → {ms(j1)} | {dropped(rs)} |")
    return "\n".join(rows)


def curves_table(results: list[dict]) -> str:
    """Judge (``val/reward``) and gold (``val/gold_reward``) at each validation, mean over an arm's seeds."""
    rows = ["| arm | seeds | judge val/reward at each validation | gold val/gold_reward at each validation |"]
    rows.append("|---|---|---|---|")
    for arm, (label, _) in ARMS.items():
        rs = [r for r in results if r["arm"] == arm and "val/reward" in r["curves"]]
        if not rs:
            continue
        cols = []
        for tag in ("val/reward", "val/gold_reward"):
            n = min(len(r["curves"][tag]) for r in rs)
            cols.append(" → ".join(f"{statistics.mean(r['curves'][tag][i][1] for r in rs):.3f}" for i in range(n)))
        rows.append(f"| {label} | {len(rs)} | {cols[0]} | {cols[1]} |")
    return "\n".join(rows)


def save(path: Path, commands: list[str], results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = sorted(results, key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))
    path.write_text(json.dumps({"command": commands, "runs": runs}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", type=Path, default=Path("/tmp/judge_ablations"))
    p.add_argument("--runs", nargs="+", default=None, metavar="ARM:SEED", help="these runs, in this order")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each pinned to its own core")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "judge_ablations.json")
    p.add_argument("--from-json", type=Path, default=None, help="print the table of saved results")
    a = p.parse_args(argv)
    if a.from_json:
        runs = json.loads(a.from_json.read_text())["runs"]
        print(table(runs), curves_table(runs), sep="\n\n")
        return
    todo = [(arm, s) for s in a.seeds for arm in a.arms]
    if a.runs:
        pairs = [r.partition(":") for r in a.runs]
        if bad := [r for r, (arm, _, seed) in zip(a.runs, pairs) if arm not in ARMS or not seed.isdigit()]:
            p.error(f"--runs takes ARM:SEED (e.g. sampled:0), got {bad}; arms: {list(ARMS)}")
        todo = [(arm, int(seed)) for arm, _, seed in pairs]
    a.out.mkdir(parents=True, exist_ok=True)
    # runs already in --json for other (arm, seed) pairs are kept: seeds can be added a few at a time
    prev = json.loads(a.json.read_text()) if a.json.exists() else {"command": [], "runs": []}
    results = [r for r in prev["runs"] if (r["arm"], r["seed"]) not in todo]
    commands = prev["command"]
    running: dict[int, tuple] = {}
    while todo or running:
        for core in range(a.jobs):
            if core not in running and todo:
                arm, seed = todo.pop(0)
                running[core] = (arm, seed, *launch(arm, seed, a.out, core))
        time.sleep(2)
        for core, (arm, seed, proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[core]
            r = collect(arm, seed, a.out, time.perf_counter() - t0, proc.returncode)
            if "stopped" in r:
                print(f"{arm}/seed{seed}: {r['wall_s']:.0f}s  {r['stopped']}", flush=True)
            else:
                ev = r["scene_eval"]
                print(
                    f"{arm}/seed{seed}: {r['wall_s']:.0f}s  gold heldout {ev['before']['heldout']['mean']:.3f} -> "
                    f"{ev['after']['heldout']['mean']:.3f}",
                    flush=True,
                )
            results.append(r)
            save(a.json, [*commands, " ".join(sys.argv)], results)  # after every run: nothing finished is lost
    print(table(results), curves_table(results), sep="\n\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
