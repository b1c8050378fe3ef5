"""The ``editr1`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``, plus
``editr1 serve-reward`` (an OpenAI-compatible server for an MLLM judge), ``editr1 export-lora`` (a
diffusers LoRA from a checkpoint) and ``editr1 make-shards`` (a data folder to WebDataset shards).

Every command parses with jsonargparse, so each has ``--help``, ``--config`` and ``--print_config``;
the three extra ones are documented functions run by :func:`function_cli` (their docstrings are the
help). ``python -m editr1 ...`` is the same command.

``editr1 fit`` with no ``--config`` runs ``configs/demo.yaml``, given as jsonargparse's default config file
(so ``--help`` and ``--print_config`` show its values); a ``-c`` file replaces it. Only the standard library
is imported up front: top-level help, an unknown command, a YAML error and the extra verbs skip Lightning.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import logging
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from editr1.cli_options import docstring_description, underscored
from editr1.config_errors import check_renamed_keys, explain, sources

PROG = "editr1"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# The commands that are not Trainer methods: name → "module:function" taking the command's arguments.
VERBS = {
    "serve-reward": "editr1.cli:serve_reward_main",
    "export-lora": "editr1.export:export_lora_main",
    "make-shards": "editr1.data.shards:make_shards_main",
    "plan": "editr1.planning.command:plan_main",
}
COMMANDS = {  # every command with its one-line help, in the order `editr1 --help` lists them
    "fit": "train (Edit-R1, or supervised with model.objective: sft)",
    "validate": "edit the validation prompts and score them (val/reward)",
    "test": "evaluate on the test set or a benchmark protocol",
    "predict": "write edited images (the ImageWriter callback)",
    "serve-reward": "serve an MLLM judge (OpenAI-compatible API) or any reward (--reward)",
    "export-lora": "write a checkpoint's adapter as a diffusers LoRA",
    "make-shards": "convert a UniWorld-format folder into WebDataset shards",
    "plan": "will a run fit? per-GPU memory of a config, built on the meta device",
}
DESCRIPTION = "Post-train image-editing models with RL (DiffusionNFT and MLLM rewards)."
EPILOG = (
    "fit, validate, test and predict run configs/demo.yaml when no --config is given.\n"
    f"Run `{PROG} COMMAND --help` for a command's options."
)


def config_path(name: str = "demo.yaml") -> Path:
    """A config shipped with editr1 (the repository's ``configs/`` folder, installed as ``editr1.configs``)."""
    path = Path(str(resources.files("editr1.configs").joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"editr1 config {name} not found at {path}")
    return path


# ------------------------------------------------------------------------------------------ plain-text help
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")  # `text <url>`_
_ROLE = re.compile(r":(?:[\w-]+:)+`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")  # :class:`~a.B`, :ref:`text <target>`
_LITERAL = re.compile(r"``(.+?)``")


def plain(text: str, one_line: bool = True) -> str:
    """Docstring text without reStructuredText markup (``x`` → x, :class:`~a.B` → B), on one line."""
    text = _LINK.sub(r"\1", text)
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = _LITERAL.sub(r"\1", text)
    return " ".join(text.split()) if one_line else text


def _define_formatters() -> None:
    from jsonargparse import DefaultHelpFormatter

    class PlainHelpFormatter(DefaultHelpFormatter):
        """jsonargparse's help (each option's type and default) as plain text, one paragraph an option."""

        def _expand_help(self, action) -> str:
            return plain(super()._expand_help(action))

        def start_section(self, heading) -> None:
            super().start_section(plain(heading) if heading else heading)

        def add_text(self, text) -> None:
            super().add_text(plain(text, one_line=False) if isinstance(text, str) else text)

    class HelpFormatter(PlainHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """The same, with the description kept as written (line breaks and all)."""

    _publish(PlainHelpFormatter, HelpFormatter)


def _publish(*classes: type) -> None:
    for cls in classes:  # module attributes, named as if defined at the top level
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name: str):
    """``EditR1CLI`` and the help formatters are built on first use: they need Lightning / jsonargparse."""
    lazy = {"HelpFormatter": _define_formatters, "PlainHelpFormatter": _define_formatters, "EditR1CLI": _define_cli}
    if name not in lazy:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in globals():
        lazy[name]()
    return globals()[name]


# ------------------------------------------------------------------------------------------ fast checks
USAGE = f"usage: {PROG} COMMAND [options]"


def top_level_help() -> str:
    """``editr1 --help``: every command with one line each (no imports beyond the standard library)."""
    width = max(map(len, COMMANDS)) + 4
    lines = [USAGE, "", DESCRIPTION, "", "commands:"]
    lines += [f"  {name:<{width}}{text}" for name, text in COMMANDS.items()]
    lines += ["", "options:", f"  {'-h, --help':<{width}}show this help and exit", "", EPILOG]
    return "\n".join(lines) + "\n"


def unknown_command(name: str) -> str:
    """The error for a command that does not exist: every command, and the nearest one."""
    close = difflib.get_close_matches(name.replace("_", "-"), COMMANDS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown command {name!r} (invalid choice; choose from {', '.join(COMMANDS)}){hint}"


def is_empty_run(folder: Path) -> bool:
    """Whether a run folder holds only config files, hparams and TensorBoard files without any summary but
    the hyperparameters (what a run that failed before its first step leaves)."""
    for path in folder.rglob("*"):
        if path.is_dir() or path.name in ("config.yaml", "hparams.yaml"):
            continue
        if not path.name.startswith("events.out.tfevents."):
            return False
        try:
            from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

            for event in EventFileLoader(str(path)).Load():
                tags = [v.tag for v in event.summary.value]
                if any(t != "hp_metric" and not t.startswith("_hparams_/") for t in tags):
                    return False
        except Exception:  # unreadable: keep the folder
            return False
    return True


def _logger_root(trainer_cfg) -> Path:
    logger = trainer_cfg.get("logger")
    init = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    save_dir = init.get("save_dir") or trainer_cfg.get("default_root_dir") or "."
    return Path(save_dir) / (init.get("name") or "lightning_logs")


def find_last_checkpoint(trainer_cfg) -> tuple[Path, int] | None:
    """The newest ``version_N/checkpoints/last.ckpt`` under the configured TensorBoard logger."""
    found = []
    for ckpt in _logger_root(trainer_cfg).glob("version_*/checkpoints/last.ckpt"):
        with contextlib.suppress(ValueError):
            found.append((int(ckpt.parent.parent.name.split("_", 1)[1]), ckpt))
    return (max(found)[1], max(found)[0]) if found else None


def describe_weights(
    sub: str, ckpt_path: str | None, lora_weights: str | None, last: bool = False, newest: Path | None = None
) -> str:
    """Which weights ``validate`` / ``test`` / ``predict`` edit with, in one line (``newest``: a run's last
    checkpoint the user may have meant, named when the base is used)."""
    if ckpt_path:
        return f"{sub}: checkpoint {ckpt_path}" + (" (the newest run's last.ckpt)" if last else "")
    if lora_weights:
        return f"{sub}: the base model with the LoRA {lora_weights} (model.lora_weights)"
    hint = f"; `--ckpt_path last` edits with the newest run's {newest}" if newest else ""
    return f"{sub}: the base model with fresh adapters (no --ckpt_path, no model.lora_weights){hint}"


NOISE = ("litlogger", "will override existing callbacks passed to Trainer: RichProgressBar")


def _quiet() -> None:
    """Silence what is noise for editr1 (before Lightning and peft are imported)."""
    # peft imports bitsandbytes, which logs that an optional CPU kernel package is missing; editr1 uses
    # bitsandbytes only for adamw8bit and quantised judges.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Lightning 2.6's own pytree helper builds torch's deprecated LeafSpec on every step (torch >= 2.10).
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # Wrong for editr1: Lightning only asks whether the DataLoader object is stateful, but the datamodule saves
    # its epoch and batch position in every checkpoint (EditDataModule.state_dict) and resumes the training
    # stream from there (load_state_dict), so a mid-epoch resume continues exactly.
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_litlogger_tip)  # (once)


def _no_litlogger_tip(record: logging.LogRecord) -> bool:  # Lightning's advertisement, and its note that our
    return not any(n in record.getMessage() for n in NOISE)  # StepProgressBar takes the default bar's place


# ------------------------------------------------------------------------------------------ LightningCLI
def _define_cli() -> None:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from editr1.callbacks import BenchmarkEvaluation, RewardCallback
    from editr1.training.guards import RunStopped

    class EditR1ArgumentParser(LightningArgumentParser):
        """Errors with a short usage line, the file a bad key came from, the nearest key and known classes."""

        args: list[str] = []  # the command line being parsed (set by EditR1CLI.parse_arguments)

        def error(self, message: str, ex: Exception | None = None):
            parser = getattr(ex, "subcommand_parser", None) or self
            message = re.sub(
                r"invalid choice: '([^']*)' \(choose from [^)]*\)", lambda m: unknown_command(m[1]), message
            )
            with contextlib.suppress(Exception):  # never let the explanation hide the error itself
                message = explain(parser, message, EditR1ArgumentParser.args)
            super().error(message, ex)

    class EditR1CLI(LightningCLI):
        """LightningCLI plus top-level ``reward:`` (:class:`RewardCallback`) and ``benchmark:`` sections, so their
        configs compose with ``-c`` without replacing the trainer's callback list. ``user_errors`` raised before
        the first step end with a one-line message; a run folder a failed run left empty is removed."""

        def __init__(self, *args, user_errors: tuple[type[Exception], ...] = (), **kwargs) -> None:
            kwargs.setdefault("parser_class", EditR1ArgumentParser)
            self._existing_runs: set[Path] = set()
            try:
                super().__init__(*args, **kwargs)
            except BaseException as e:
                trainer = getattr(self, "trainer", None)
                if trainer is not None and trainer.global_step == 0 and trainer.is_global_zero:
                    self._remove_empty_runs(trainer)
                prog = " ".join(filter(None, [PROG, getattr(self, "subcommand", None)]))
                if isinstance(e, user_errors) and (trainer is None or trainer.global_step == 0):
                    raise SystemExit(f"{prog}: error: {e}") from None
                if isinstance(e, RunStopped):  # a guard's reason, at any step: the message, no traceback
                    raise SystemExit(f"{prog}: stopped: {e}") from None
                raise

        def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            for parser in getattr(self, "_subcommand_parsers", {}).values() if add_subcommands else [self.parser]:
                parser.usage = "%(prog)s [options]"  # the options are in --help, not in every error message

        def parse_arguments(self, parser, args) -> None:
            EditR1ArgumentParser.args = sys.argv[1:] if args is None else [str(a) for a in args]
            super().parse_arguments(parser, args)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(RewardCallback, "reward")
            parser.add_lightning_class_args(BenchmarkEvaluation, "benchmark")

        def before_instantiate_classes(self) -> None:
            """``--ckpt_path last``: the newest run of this config's logger name (``fit`` continues it in its own
            run folder; Lightning alone would look for last.ckpt in a new, empty version folder)."""
            if self.subcommand not in SUBCOMMANDS:
                return
            sub, cfg = self.subcommand, self.config[self.subcommand]
            if cfg.get("weights_only") is None and "weights_only" in cfg:
                cfg.weights_only = True  # checkpoints are read back with torch.load(weights_only=True)
            if cfg.model.get("objective") == "sft" and cfg.data.get("targets") == "auto":
                cfg.data.targets = "require"  # supervised training uses only the rows that have a target
            self._existing_runs = {p.resolve() for p in _logger_root(cfg.trainer).glob("version_*")}
            last = cfg.get("ckpt_path") == "last"
            if last:
                found = find_last_checkpoint(cfg.trainer)
                if found is None:
                    raise FileNotFoundError(
                        "--ckpt_path last: no checkpoints/last.ckpt in any run folder of this logger "
                        f"({_logger_root(cfg.trainer)}); give the checkpoint's path instead"
                    )
                path, version = found
                cfg.ckpt_path = str(path)
                logger = cfg.trainer.get("logger")
                if sub == "fit" and (isinstance(logger, dict) or hasattr(logger, "init_args")):
                    logger["init_args"]["version"] = version
            if sub != "fit":  # evaluation writes no checkpoints: the restored ModelCheckpoint state is moot
                warnings.filterwarnings("ignore", "The dirpath has changed from", UserWarning)
            if sub != "fit" or last:
                lora = cfg.model.get("lora_weights")
                newest = None if cfg.ckpt_path or lora else (find_last_checkpoint(cfg.trainer) or (None,))[0]
                print(
                    f"resuming {cfg.ckpt_path}"
                    if sub == "fit"
                    else describe_weights(sub, cfg.ckpt_path, lora, last, newest)
                )

        def _remove_empty_runs(self, trainer) -> None:
            for logger in trainer.loggers:
                with contextlib.suppress(Exception):
                    folder = Path(logger.log_dir)
                    if folder.is_dir() and folder.resolve() not in self._existing_runs and is_empty_run(folder):
                        shutil.rmtree(folder)
                        print(f"{PROG}: removed {folder}: the run failed before its first step", file=sys.stderr)

    _publish(EditR1ArgumentParser, EditR1CLI)


# ------------------------------------------------------------------------------------------ the extra verbs
def function_cli(
    component: Callable,
    args: Sequence[str],
    prog: str,
    *,
    description: str | None = None,
    as_positional: bool = True,
    user_errors: tuple[type[Exception], ...] = (),
):
    """Run ``component`` (a documented function, or a dataclass to build) as a command through jsonargparse and
    return what it returns. Its parameters are the options (the required ones positional when ``as_positional``),
    the docstring's ``Args:`` lines their help, with ``--config FILE`` and ``--print_config``; ``--some-option``
    is read as ``--some_option``. A bad option exits with jsonargparse's message naming it; ``user_errors``
    (a missing file, a bad value) exit with ``prog: error: message`` instead of a traceback."""
    from jsonargparse import auto_cli

    names = set(inspect.signature(component).parameters)
    dashed = sorted("--" + n.replace("_", "-") for n in names if "_" in n)
    epilog = f"Options can also be spelled with dashes (e.g. {dashed[0]})." if dashed else None
    try:
        return auto_cli(
            component,
            args=underscored(args, names),
            as_positional=as_positional,
            prog=prog,
            description=description or docstring_description(component),
            epilog=epilog,
            formatter_class=__getattr__("HelpFormatter"),
        )
    except user_errors as e:
        raise SystemExit(f"{prog}: error: {e.args[0] if len(e.args) == 1 else e}") from None


def serve_reward_main(args: list[str]) -> None:
    """``editr1 serve-reward [--model ...] [--port ...]``: see :func:`editr1.rewards.server.serve_reward`."""
    from editr1.rewards.server import serve_reward

    function_cli(serve_reward, args, f"{PROG} serve-reward", as_positional=False)


# ------------------------------------------------------------------------------------------ entry point
def cli_main(args: list[str] | None = None, run: bool = True):
    """Entry point. Tests call it in-process with ``args``; with ``run=False`` there is no
    subcommand: ``args`` are the options only and nothing runs (``cli.trainer``, ``cli.model`` and
    ``cli.datamodule`` are built, as in Lightning's own testing recipe)."""
    raw = list(sys.argv[1:] if args is None else args)
    if run and (not raw or raw[0] in ("-h", "--help")):
        if raw:
            sys.stdout.write(top_level_help())
            raise SystemExit(0)
        print(USAGE, file=sys.stderr)
        raise SystemExit(f"{PROG}: error: a command is required: {', '.join(COMMANDS)}")
    if run and raw[0] in VERBS:  # import only what the verb needs
        module, function = VERBS[raw[0]].split(":")
        return getattr(importlib.import_module(module), function)(raw[1:])
    if run and not raw[0].startswith("-") and raw[0] not in SUBCOMMANDS:
        raise SystemExit(f"{PROG}: error: {unknown_command(raw[0])}")
    check_renamed_keys(raw)
    _quiet()
    from editr1.data.datamodule import EditDataModule
    from editr1.module import EditR1Module

    # the built-in default when no config file is given, as jsonargparse's default config (shown by --help)
    formatter = __getattr__("PlainHelpFormatter")  # subcommands get the main parser's (jsonargparse)
    sub = {"formatter_class": formatter, "default_config_files": [str(config_path())]}
    if any(kind == "file" for kind, _ in sources(raw)):  # a config file replaces the built-in default
        sub["default_config_files"] = []
    kwargs = {"prog": PROG, "description": DESCRIPTION, "formatter_class": formatter}
    kwargs |= {s: dict(sub) for s in SUBCOMMANDS} if run else sub  # not the main parser's: one section a command
    return __getattr__("EditR1CLI")(
        EditR1Module,
        EditDataModule,
        args=None if args is None else raw,
        run=run,
        auto_configure_optimizers=False,  # the module builds its own optimiser (the optim: section)
        save_config_kwargs={"overwrite": True},
        parser_kwargs=kwargs,  # the same name in usage lines whether started as `editr1` or `python -m editr1`
        user_errors=(OSError,),  # before the first step: a missing folder or file, a model not in the local cache
    )


def main() -> None:
    cli_main()


if __name__ == "__main__":
    main()
