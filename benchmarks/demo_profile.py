"""Where the time of a demo run goes: `editr1 fit` (configs/demo.yaml) in this process, with timers around
each phase of a step and of the run, and optionally cProfile.

Each timer measures its function's own time, without the time of timed functions it calls (so the rows add up
to the run's wall time, the rest being "other": Lightning's loop, logging, data). Transformer forwards are
split by where they were called from (rollout, training, evaluation) and by gradient mode; backward passes are
``manual_backward``.

    python benchmarks/demo_profile.py                                  # the whole demo (about as long as editr1 fit)
    python benchmarks/demo_profile.py --trainer.max_steps=10           # a few steps (any editr1 fit option)
    python benchmarks/demo_profile.py --threads 1 --trainer.max_steps=10
    python benchmarks/demo_profile.py --cprofile /tmp/demo.prof --trainer.max_steps=10   # plus cProfile's top 25
    python benchmarks/demo_profile.py --events runs/demo/version_0     # a finished run's own timers (TensorBoard)
    python benchmarks/demo_profile.py --curve 30 45 60 75              # also the held-out gains at these steps

``--curve`` runs the SceneEvaluation callback's evaluation (same prompts, seeds and solver) after the optimiser
steps named, so one run shows what shorter runs of the same config would reach (the learning rate is constant
and every random draw is per sample and per step, so the first N steps of a run are those of a run of N steps).
Its evaluations are timed as "curve" and are not part of the demo's own time.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import sys
import time
from collections import defaultdict

START = time.perf_counter()


class Timers:
    """Exclusive wall and CPU time (the process's, all threads) and calls per (phase, name); a call's phase is
    its own, else that of the innermost running timed call that has one."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.cpu: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.stack: list[list] = []  # [name, phase, start, start CPU, wall and CPU in nested timers]

    def wrap(self, owner, attr: str, name: str | None = None, phase: str | None = None, label=None) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            key = label() if label is not None else (name or attr)
            outer = phase or next((f[1] for f in reversed(self.stack) if f[1]), key)
            frame = [key, outer, time.perf_counter(), time.process_time(), 0.0, 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                total, cpu = time.perf_counter() - frame[2], time.process_time() - frame[3]
                self.seconds[(outer, key)] += total - frame[4]
                self.cpu[(outer, key)] += cpu - frame[5]
                self.calls[(outer, key)] += 1
                if self.stack:
                    self.stack[-1][4] += total
                    self.stack[-1][5] += cpu

        setattr(owner, attr, timed)

    def table(self, wall: float, cpu: float) -> str:
        lines = [f"{'phase':<14} {'what':<26} {'calls':>6} {'wall s':>8} {'share':>6} {'CPU s':>8} {'share':>6}"]
        for phase in sorted({p for p, _ in self.seconds}, key=lambda p: -sum(self._phase(p).values())):
            for name, s in sorted(self._phase(phase).items(), key=lambda kv: -kv[1]):
                c = self.cpu[(phase, name)]
                lines.append(
                    f"{phase:<14} {name:<26} {self.calls[(phase, name)]:>6} {s:>8.1f} {s / wall:>6.1%} {c:>8.1f} "
                    f"{c / cpu:>6.1%}"
                )
        lines.append(f"{'total':<14} {'fit':<26} {'':>6} {wall:>8.1f} {1:>6.1%} {cpu:>8.1f} {1:>6.1%}")
        return "\n".join(lines)

    def _phase(self, phase: str) -> dict[str, float]:
        return {n: s for (p, n), s in self.seconds.items() if p == phase}


def instrument(timers: Timers) -> None:
    import torch
    from lightning.pytorch import Trainer

    from editr1.callbacks import reward as reward_cb
    from editr1.callbacks import scene_evaluation
    from editr1.callbacks.export_lora import ExportLora
    from editr1.module import EditR1Module
    from editr1.policies.flux_kontext import FluxKontextPolicy
    from editr1.rewards.scenes import SceneReward

    def grad_mode() -> str:
        return "forward (grad)" if torch.is_grad_enabled() else "forward (no grad)"

    timers.wrap(FluxKontextPolicy, "velocity", label=grad_mode)
    timers.wrap(FluxKontextPolicy, "decode", "VAE decode")
    timers.wrap(FluxKontextPolicy, "encode", "encode (text, VAE)")
    timers.wrap(FluxKontextPolicy, "encode_images", "VAE encode")
    timers.wrap(SceneReward, "score", "reward")
    timers.wrap(EditR1Module, "sample_groups", "rollout (rest)", phase="rollout")
    timers.wrap(EditR1Module, "training_step", "training (rest)", phase="training")
    timers.wrap(EditR1Module, "manual_backward", "backward")
    timers.wrap(EditR1Module, "validation_step", "validation (rest)", phase="validation")
    timers.wrap(reward_cb.RewardCallback, "_log_rollout_images", "rollout grids", phase="image logging")
    timers.wrap(reward_cb.RewardCallback, "_log_step", "step metrics", phase="logging")
    timers.wrap(scene_evaluation.SceneEvaluation, "_run", "scene eval (rest)", phase="scene eval")
    timers.wrap(Trainer, "save_checkpoint", "checkpoint", phase="checkpoint")
    timers.wrap(ExportLora, "on_train_end", "LoRA export", phase="checkpoint")


def curve_callback(steps: list[int], timers: Timers):
    """A callback that evaluates the held-out scenes as the run's SceneEvaluation does, after these steps."""
    from lightning.pytorch.callbacks import Callback

    from editr1.callbacks.scene_evaluation import SceneEvaluation
    from editr1.evaluation.scenes import evaluate_scenes

    class Curve(Callback):
        def __init__(self) -> None:
            self.done: set[int] = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step not in steps or step in self.done:
                return
            self.done.add(step)
            ev = next(c for c in trainer.callbacks if isinstance(c, SceneEvaluation))
            line = []
            for split in ev.splits:
                with pl_module.policy.adapter("default"):
                    res = evaluate_scenes(
                        pl_module.policy,
                        ev._scenes(trainer),
                        split,
                        ev.count,
                        ev.group_size,
                        ev.steps,
                        ev.solver,
                        ev.seed,
                    )
                before = ev.results["before"][split]["mean"]
                line.append(f"{split} {before:.3f} -> {res.mean:.3f} ({res.mean - before:+.3f})")
            print(f"curve: step {step}: " + ", ".join(line), flush=True)

    timers.wrap(Curve, "on_train_batch_end", "curve evaluation", phase="curve (not demo)")
    return Curve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--interop", type=int, default=None, help="torch.set_num_interop_threads")
    ap.add_argument("--cprofile", default=None, help="also run under cProfile, save the stats here, print the top 25")
    ap.add_argument("--events", default=None, help="summarise a finished run's time/* scalars and exit")
    ap.add_argument(
        "--curve", type=int, nargs="*", default=[], help="also evaluate the held-out scenes after these steps"
    )
    known, rest = ap.parse_known_args()
    if known.events:
        print(run_timers(known.events))
        return
    import torch

    if known.threads is not None:
        torch.set_num_threads(known.threads)
    if known.interop is not None:
        torch.set_num_interop_threads(known.interop)
    from lightning.pytorch import Trainer

    from editr1.cli import cli_main

    imported = time.perf_counter()
    timers = Timers()
    instrument(timers)
    print(
        f"torch {torch.__version__}: {torch.get_num_threads()} threads, {torch.get_num_interop_threads()} interop; "
        f"imports {imported - START:.1f} s",
        flush=True,
    )
    prof = cProfile.Profile() if known.cprofile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof is not None:
        prof.enable()
    if known.curve:
        fit = Trainer.fit

        def fit_with_curve(self, *args, **kwargs):
            self.callbacks.append(curve_callback(known.curve, timers))
            return fit(self, *args, **kwargs)

        Trainer.fit = fit_with_curve
    timers.wrap(Trainer, "fit", "Lightning loop (rest)", phase="loop")
    timers.wrap(sys.modules[__name__], "_fit", "parse, build model", phase="start-up")
    sys.modules[__name__]._fit(cli_main, rest)
    if prof is not None:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"\nfit: {wall:.1f} s wall, {cpu:.1f} s CPU (imports before it: {imported - START:.1f} s wall, {c0:.1f} s CPU)"
    )
    print(timers.table(wall, cpu))
    if prof is not None:
        prof.dump_stats(known.cprofile)
        pstats.Stats(known.cprofile).sort_stats("tottime").print_stats(25)


def run_timers(folder: str) -> str:
    """Totals of a run's own per-step timers (``time/rollout_s``, ``time/reward_s``, ``time/train_s``,
    ``time/step_s``) and the filter's counts, from its TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(folder, size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    lines = [f"{'timer':<18} {'values':>7} {'sum s':>9} {'mean s':>8}"]
    for tag in ("time/rollout_s", "time/reward_s", "time/train_s", "time/step_s"):
        if tag in tags:
            v = [e.value for e in ea.Scalars(tag)]
            lines.append(f"{tag:<18} {len(v):>7} {sum(v):>9.1f} {sum(v) / len(v):>8.2f}")
    if "filter/frac_groups_dropped" in tags:
        v = [e.value for e in ea.Scalars("filter/frac_groups_dropped")]
        lines.append(
            f"groups dropped by the filter: {sum(v) / len(v):.0%} over {len(v)} rollouts, "
            f"{sum(x == 1.0 for x in v)} rollouts with every group dropped"
        )
    if "nft/trained_samples" in tags:
        v = [e.value for e in ea.Scalars("nft/trained_samples")]
        lines.append(f"trained samples per optimiser step: {sum(v) / len(v):.1f} (over {len(v)} steps)")
    for tag in sorted(t for t in tags if t.startswith("val/reward")):
        lines.append(f"{tag}: " + ", ".join(f"step {e.step}: {e.value:.3f}" for e in ea.Scalars(tag)))
    return "\n".join(lines)


def _fit(cli_main, rest: list[str]) -> None:
    sys.argv = sys.argv[:1]  # the options go in as args (LightningCLI warns when it sees both)
    cli_main(["fit", *rest])


if __name__ == "__main__":
    main()
