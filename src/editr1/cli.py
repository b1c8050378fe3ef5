"""The ``editr1`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``, plus
``editr1 serve-reward`` (an OpenAI-compatible server for an MLLM judge), ``editr1 export-lora`` (a
diffusers LoRA from a checkpoint) and ``editr1 make-shards`` (a data folder to WebDataset shards).

Every command parses with jsonargparse, so each has ``--help``, ``--config`` and ``--print_config``;
the three extra ones are documented functions run by :func:`function_cli` (their docstrings are the
help). ``python -m editr1 ...`` is the same command.

``editr1 fit`` with no ``--config`` runs the built-in default, ``configs/demo.yaml``: a tiny
FLUX.1-Kontext built in code, synthetic scenes and the verifiable scene reward, on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from editr1.callbacks import BenchmarkEvaluation, RewardCallback
from editr1.data.datamodule import EditDataModule
from editr1.module import EditR1Module

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def config_path(name: str = "demo.yaml") -> Path:
    """A config shipped with editr1 (the repository's ``configs/`` folder, installed as ``editr1.configs``)."""
    path = Path(str(resources.files("editr1.configs").joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"editr1 config {name} not found at {path}")
    return path


class EditR1CLI(LightningCLI):
    """LightningCLI plus top-level ``reward:`` (:class:`RewardCallback`) and ``benchmark:``
    (:class:`BenchmarkEvaluation`, used by ``test``) sections, so reward and benchmark configs compose
    with ``-c`` without replacing the trainer's callback list."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RewardCallback, "reward")
        parser.add_lightning_class_args(BenchmarkEvaluation, "benchmark")

    def before_instantiate_classes(self) -> None:
        """``fit --ckpt_path last``: continue the newest run of this config's logger name, in its own run
        folder (Lightning alone would look for last.ckpt in a new, empty version folder)."""
        if self.subcommand not in SUBCOMMANDS:
            return
        cfg = self.config[self.subcommand]
        if cfg.get("weights_only") is None and "weights_only" in cfg:
            cfg.weights_only = True  # checkpoints are read back with torch.load(weights_only=True)
        if cfg.model.get("objective") == "sft" and cfg.data.get("targets") == "auto":
            cfg.data.targets = "require"  # supervised training uses only the rows that have a target
        if self.subcommand != "fit" or cfg.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(cfg.trainer)
        if found is None:
            raise FileNotFoundError(
                "--ckpt_path last: no checkpoints/last.ckpt in any run folder of this logger "
                f"({_logger_root(cfg.trainer)}); give the checkpoint's path instead"
            )
        path, version = found
        cfg.ckpt_path = str(path)
        logger = cfg.trainer.get("logger")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            logger["init_args"]["version"] = version
        print(f"resuming {path}")


def _logger_root(trainer_cfg) -> Path:
    logger = trainer_cfg.get("logger")
    init = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    save_dir = init.get("save_dir") or trainer_cfg.get("default_root_dir") or "."
    return Path(save_dir) / (init.get("name") or "lightning_logs")


def find_last_checkpoint(trainer_cfg) -> tuple[Path, int] | None:
    """The newest ``version_N/checkpoints/last.ckpt`` under the configured TensorBoard logger."""
    root = _logger_root(trainer_cfg)
    best = None
    for ckpt in root.glob("version_*/checkpoints/last.ckpt"):
        try:
            version = int(ckpt.parent.parent.name.split("_", 1)[1])
        except ValueError:
            continue
        if best is None or version > best[1]:
            best = (ckpt, version)
    return best


# Config keys that moved: an old key stops the run with the new name instead of jsonargparse's generic error.
RENAMED_KEYS = {
    "model.rollout.lower_order_second": (
        "model.rollout.first_order_second_to_last (inverted: the old default `lower_order_second: true` is "
        "`first_order_second_to_last: true`; the new default, false, gives the reference code's solver orders)"
    ),
}


def _flat_keys(tree, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return []
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.append(key)
        out += _flat_keys(v, key + ".")
    return out


def check_renamed_keys(args: list[str]) -> None:
    """Raise ``SystemExit`` with the new name when a config file or an option uses a renamed key."""
    import yaml

    keys: list[str] = []
    for i, a in enumerate(args):
        path = (
            args[i + 1]
            if a in ("-c", "--config") and i + 1 < len(args)
            else (a.split("=", 1)[1] if a.startswith("--config=") else None)
        )
        if path is not None and Path(path).is_file():
            with contextlib.suppress(yaml.YAMLError):  # jsonargparse reports the file's syntax error itself
                keys += _flat_keys(yaml.safe_load(Path(path).read_text()) or {})
        elif a.startswith("--"):
            keys.append(a[2:].split("=", 1)[0])
    for key in keys:
        for old, new in RENAMED_KEYS.items():
            if key == old or key.endswith("." + old):
                raise SystemExit(f"editr1: the config key `{old}` was renamed: use {new}")


def _has_config(args: list[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in args)


def with_default_config(args: list[str]) -> list[str]:
    """Insert ``--config configs/demo.yaml`` after the subcommand when no config is given."""
    if not args or args[0] not in SUBCOMMANDS or _has_config(args[1:]):
        return args
    if any(a in ("-h", "--help") for a in args[1:]):
        return args
    return [args[0], "--config", str(config_path())] + args[1:]


PROG = "editr1"
# The commands that are not Trainer methods: name → "module:function" taking the command's arguments.
VERBS = {
    "serve-reward": "editr1.cli:serve_reward_main",
    "export-lora": "editr1.export:export_lora_main",
    "make-shards": "editr1.data.shards:make_shards_main",
}
DESCRIPTION = (
    "Post-train image-editing models with RL (DiffusionNFT and MLLM rewards). Commands: fit, validate, test and "
    "predict (below; with no --config they run configs/demo.yaml), and serve-reward (serve an MLLM judge), "
    "export-lora (a diffusers LoRA from a checkpoint), make-shards (a data folder to WebDataset shards). "
    f"Run `{PROG} COMMAND --help` for a command's options."
)


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (each option's type and default), with the description kept as written."""


def _underscored(args: Sequence[str], names: set[str]) -> list[str]:
    """``--vae-steps 3`` → ``--vae_steps 3`` for these parameter names, so the dashed spellings of the
    earlier argparse commands keep working (jsonargparse names options after the parameters)."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--":
            break
        key, eq, value = a.partition("=")
        if key.startswith("--") and "-" in key[2:] and key[2:].replace("-", "_") in names:
            out[i] = "--" + key[2:].replace("-", "_") + eq + value
    return out


def _description(component: Callable) -> str | None:
    """The docstring up to its ``Args:`` section (jsonargparse alone shows only the first line)."""
    text = []
    for line in (inspect.getdoc(component) or "").splitlines():
        if line.rstrip() in ("Args:", "Arguments:", "Attributes:", "Returns:", "Raises:"):
            break
        text.append(line)
    return "\n".join(text).strip() or None


def function_cli(
    component: Callable,
    args: Sequence[str],
    prog: str,
    *,
    description: str | None = None,
    as_positional: bool = True,
    user_errors: tuple[type[Exception], ...] = (),
):
    """Run ``component`` (a documented function, or a dataclass to build) as a command through jsonargparse
    and return what it returns. Its parameters are the options (the required ones positional when
    ``as_positional``), the docstring's ``Args:`` lines their help; ``--config FILE`` and
    ``--print_config`` come with it, and ``--some-option`` is read as ``--some_option``. A bad option
    exits with jsonargparse's message naming it; exceptions of the ``user_errors`` types (a missing file,
    a bad value) exit with ``prog: error: message`` instead of a traceback."""
    from jsonargparse import auto_cli

    names = set(inspect.signature(component).parameters)
    dashed = sorted("--" + n.replace("_", "-") for n in names if "_" in n)
    epilog = f"Options can also be spelled with dashes (e.g. {dashed[0]})." if dashed else None
    try:
        return auto_cli(
            component,
            args=_underscored(args, names),
            as_positional=as_positional,
            prog=prog,
            description=description or _description(component),
            epilog=epilog,
            formatter_class=HelpFormatter,
        )
    except user_errors as e:
        raise SystemExit(f"{prog}: error: {e.args[0] if len(e.args) == 1 else e}") from None


def serve_reward_main(args: list[str]) -> None:
    """``editr1 serve-reward [--model ...] [--port ...]``: see :func:`editr1.rewards.server.serve_reward`."""
    from editr1.rewards.server import serve_reward

    function_cli(serve_reward, args, f"{PROG} serve-reward", as_positional=False)


def _run_verb(name: str, args: list[str]) -> None:
    from importlib import import_module

    module, function = VERBS[name].split(":")
    getattr(import_module(module), function)(args)


def cli_main(args: list[str] | None = None, run: bool = True) -> EditR1CLI | None:
    """Entry point. Tests call it in-process with ``args``; with ``run=False`` there is no
    subcommand: ``args`` are the options only and nothing runs (``cli.trainer``, ``cli.model`` and
    ``cli.datamodule`` are built, as in Lightning's own testing recipe)."""
    raw = list(sys.argv[1:] if args is None else args)
    if raw[:1] and raw[0] in VERBS:
        _run_verb(raw[0], raw[1:])
        return None
    if run and raw and not raw[0].startswith("-") and raw[0] not in SUBCOMMANDS:
        raise SystemExit(
            f"{PROG}: error: unknown command {raw[0]!r}; the commands are "
            f"{', '.join([*SUBCOMMANDS, *VERBS])} (`{PROG} COMMAND --help` for each)"
        )
    check_renamed_keys(raw[1:] if raw[:1] and raw[0] in SUBCOMMANDS else raw)
    if not run:
        argv = list(args or [])
        argv = argv if _has_config(argv) else ["--config", str(config_path())] + argv
    elif args is None:
        sys.argv = [sys.argv[0]] + with_default_config(sys.argv[1:])  # LightningCLI reads sys.argv
        argv = None
    else:
        argv = with_default_config(list(args))
    return EditR1CLI(
        EditR1Module,
        EditDataModule,
        args=argv,
        run=run,
        auto_configure_optimizers=False,  # the module builds its own optimiser (the optim: section)
        save_config_kwargs={"overwrite": True},
        # the same name in usage lines whether started as `editr1` or `python -m editr1`
        parser_kwargs={"prog": PROG, "description": DESCRIPTION},
    )


def main() -> None:
    cli_main()


if __name__ == "__main__":
    main()
