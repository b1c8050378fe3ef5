"""P9: the step time of a 2-process run over a 1-process run with the same global batch, on the CPU (gloo).

Each configuration is a real ``editr1 fit`` (the demo's tiny FLUX.1-Kontext, synthetic scenes, the verifiable
reward) launched as a user would: one process, or two processes by Lightning under
``editr1.strategies.FSDP2Strategy`` (sharded, and replicated with all-reduced LoRA gradients). The global batch
is the same (``--groups`` prompts a step: all on one process, or half on each). The step times are the ones the
run logs to TensorBoard (``time/step_s``: rollout, reward and training; ``time/train_s``: training alone),
median over the steps after the first.

    python benchmarks/multiprocess.py [--groups 4] [--steps 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, name: str, devices: int, shard: bool | None, groups: int, steps: int, threads: int) -> dict:
    trainer: dict = {"accelerator": "cpu", "devices": devices, "callbacks": []}
    if shard is not None:
        trainer["strategy"] = {"class_path": "editr1.strategies.FSDP2Strategy", "init_args": {"shard": shard}}
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": trainer}))
    args = [sys.executable, "-m", "editr1", "fit", "-c", str(ROOT / "configs" / "demo.yaml")]
    args += ["-c", str(ROOT / "configs" / "demo_smoke.yaml"), "-c", str(cfg)]
    args += [f"--data.batch_size={groups // devices}", f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0"]
    args += ["--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--model.rollout.steps=3"]
    args += [f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.logger.init_args.name={name}"]
    args += ["--trainer.enable_checkpointing=false"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    out = subprocess.run(args, cwd=tmp, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp / name).glob("version_*")))).Reload()
    series = {tag: [e.value for e in events.Scalars(tag)] for tag in ("time/step_s", "time/train_s")}
    return {tag: statistics.median(v[1:] or v) for tag, v in series.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4, help="global batch: prompts a step (even)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        one = run(tmp, "one", 1, None, args.groups, args.steps, args.threads)
        rows = {"1 process": one}
        for name, shard in (("2 processes, FSDP2 sharded", True), ("2 processes, replicated", False)):
            rows[name] = run(
                tmp, name.replace(" ", "_").replace(",", ""), 2, shard, args.groups, args.steps, args.threads
            )
    print(
        f"P9: tiny FLUX.1-Kontext demo, {args.groups} groups x K 8 a step (global), {args.steps} steps, "
        f"{args.threads} thread(s) a process, {os.cpu_count()} CPU(s); median over steps 2..{args.steps}"
    )
    print(f"{'':30}{'step s':>9}{'train s':>9}{'step / 1 process':>18}")
    for name, r in rows.items():
        ratio = r["time/step_s"] / one["time/step_s"]
        print(f"{name:30}{r['time/step_s']:9.3f}{r['time/train_s']:9.3f}{ratio:17.2f}x")


if __name__ == "__main__":
    main()
