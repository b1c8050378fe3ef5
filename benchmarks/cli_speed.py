"""How long the command line takes to answer, side by side with importing torch (target: `editr1 --help`
within 1.5x of `python -c "import torch"`).

    python benchmarks/cli_speed.py [--repeats 3] [--no-fit] [--src OTHER/src]

Each command runs as its own process, the commands interleaved, ``--repeats`` rounds; the best wall time of
each and its peak resident memory are printed with the ratio to importing torch. ``editr1 fit --help``
builds LightningCLI's parser (it imports Lightning and the model classes), so it is reported, not held to
the target. ``--src`` times another source tree's ``editr1`` (e.g. an older commit exported with
``git archive``) through ``python -c`` with that tree first on ``PYTHONPATH``. Exits 1 when the target is
missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

TARGET = 1.5
RUN_EDITR1 = "import sys; from editr1.cli import main; sys.argv[0] = 'editr1'; main()"


def editr1(src: str | None) -> list[str]:
    script = Path(sys.executable).parent / "editr1"
    if src is None and script.is_file():
        return [str(script)]
    return [sys.executable, "-c", RUN_EDITR1]


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of one run (which must succeed)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best of each command is kept")
    parser.add_argument("--no-fit", action="store_true", help="skip `editr1 fit --help` (about 10 s a run)")
    parser.add_argument("--src", help="time the editr1 of this source tree (its src/ folder) instead")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.src).resolve()), env.get("PYTHONPATH", "")])
    cmd = editr1(args.src)
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "editr1 --help": [*cmd, "--help"],
        "editr1 export-lora --help": [*cmd, "export-lora", "--help"],
    }
    if not args.no_fit:
        commands["editr1 fit --help"] = [*cmd, "fit", "--help"]
    best = dict.fromkeys(commands, float("inf"))
    peak = dict.fromkeys(commands, 0.0)
    for _ in range(args.repeats):
        for name, argv in commands.items():
            wall, rss = measure(argv, env)
            best[name], peak[name] = min(best[name], wall), max(peak[name], rss)
    torch_s = best['python -c "import torch"']
    print(f"best of {args.repeats}, {os.cpu_count()} CPUs" + (f", source {args.src}" if args.src else ""))
    print("| command | wall | peak memory | vs importing torch |\n|---|---|---|---|")
    for name, wall in best.items():
        print(f"| `{name}` | {wall:.2f} s | {peak[name]:.0f} MiB | {wall / torch_s:.2f}x |")
    ratio = best["editr1 --help"] / torch_s
    met = ratio <= TARGET
    print(f"`editr1 --help` is {ratio:.2f}x importing torch: target <= {TARGET}x {'met' if met else 'NOT met'}")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
