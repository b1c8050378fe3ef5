"""The ``editr1`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``, plus
``editr1 serve-reward`` (an OpenAI-compatible server for an MLLM judge).

``editr1 fit`` with no ``--config`` runs the built-in default, ``configs/demo.yaml``: a tiny
FLUX.1-Kontext built in code, synthetic scenes and the verifiable scene reward, on the CPU.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

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
        path = args[i + 1] if a in ("-c", "--config") and i + 1 < len(args) else (
            a.split("=", 1)[1] if a.startswith("--config=") else None)
        if path is not None and Path(path).is_file():
            try:
                keys += _flat_keys(yaml.safe_load(Path(path).read_text()) or {})
            except yaml.YAMLError:
                pass  # jsonargparse reports the file's syntax error itself
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


def serve_reward_main(args: list[str]) -> None:
    """``editr1 serve-reward [--model ...] [--port ...]``: see :func:`editr1.rewards.server.serve_reward`."""
    from jsonargparse import auto_cli

    from editr1.rewards.server import serve_reward

    auto_cli(serve_reward, args=args, as_positional=False)


def cli_main(args: list[str] | None = None, run: bool = True) -> EditR1CLI | None:
    """Entry point. Tests call it in-process with ``args``; with ``run=False`` there is no
    subcommand: ``args`` are the options only and nothing runs (``cli.trainer``, ``cli.model`` and
    ``cli.datamodule`` are built, as in Lightning's own testing recipe)."""
    raw = list(sys.argv[1:] if args is None else args)
    if raw[:1] == ["serve-reward"]:
        serve_reward_main(raw[1:])
        return None
    if raw[:1] == ["export-lora"]:
        from editr1.export import export_lora_main

        export_lora_main(raw[1:])
        return None
    if raw[:1] == ["make-shards"]:
        from editr1.data.shards import make_shards_main

        make_shards_main(raw[1:])
        return None
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
    )


def main() -> None:
    cli_main()


if __name__ == "__main__":
    main()
