"""One command-line style: every `editr1` command (and the developer scripts) parses with jsonargparse, so
each has --help that explains its options, --config and --print_config, and a bad option is a one-line
error naming it, not a traceback. `python -m editr1 VERB` is the same command as `editr1 VERB`."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import yaml
from jsonargparse import capture_parser

from editr1.cli import cli_main
from editr1.cli_options import underscored as _underscored

# Each verb, its documented function, and an invocation that parses (positionals where it has them).
VERBS = {
    "serve-reward": ("editr1.rewards.server:serve_reward", []),
    "export-lora": ("editr1.export:export_lora", ["run/last.ckpt", "out/lora"]),
    "make-shards": ("editr1.data.shards:make_shards", ["data/edits", "shards/e-%06d.tar"]),
    "plan": ("editr1.planning.command:plan", []),
}


@pytest.fixture(autouse=True)
def _fixed_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # help is wrapped to the terminal; the same width everywhere


def _function(verb: str):
    from importlib import import_module

    module, name = VERBS[verb][0].split(":")
    return getattr(import_module(module), name)


def _exit(args: list[str], main=cli_main) -> tuple[int | str | None, str, str]:
    """Run a command that must exit; its exit code, stdout and stderr."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("verb", VERBS)
def test_help_lists_and_explains_every_option(verb):
    code, out, _ = _exit([verb, "--help"])
    assert code == 0
    assert out.startswith(f"usage: editr1 {verb} ")
    assert "--config" in out and "--print_config" in out
    assert not any(markup in out for markup in ("``", ":class:", ":func:", ":meth:")), out  # plain text
    params = inspect.signature(_function(verb)).parameters
    for name, p in params.items():
        assert (name if p.default is inspect.Parameter.empty and verb != "serve-reward" else f"--{name}") in out
    parser = capture_parser(lambda: cli_main([verb, *VERBS[verb][1]]))
    undocumented = [a.dest for a in parser._actions if a.dest in params and not (a.help or "").strip()]
    assert not undocumented, f"{verb}: options without a help text: {undocumented}"


def test_developer_scripts_have_help_too():
    from editr1 import demo_base
    from editr1.data import mini_benchmarks

    code, out, _ = _exit(["--help"], demo_base.main)
    assert code == 0 and out.startswith("usage: python -m editr1.demo_base")
    assert "--vae_steps VAE_STEPS" in out and "optimiser steps of stage 1" in out and "with dashes" in out
    code, out, _ = _exit(["--help"], mini_benchmarks.main)
    assert code == 0 and "where imgedit_mini/ and gedit_mini/ are written" in out


COMMANDS = ("fit", "validate", "test", "predict", *VERBS)


def test_top_level_help_names_every_command():
    code, out, _ = _exit(["--help"])
    assert code == 0 and out.startswith("usage: editr1 COMMAND")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "--help" not in line}
    assert tuple(rows) == COMMANDS and all(len(row.split()) > 2 for row in rows.values())  # with what each does
    code, _, err = _exit([])
    assert code == "editr1: error: a command is required: " + ", ".join(COMMANDS)


FAST = """
import json, sys
from editr1.cli import cli_main
def run(args):
    try:
        cli_main(args)
    except SystemExit as e:
        return str(e.code)
seen = {}
for args in (["--help"], ["fitt"], [], ["fit", "-c", sys.argv[1]]):
    seen[" ".join(args)] = [run(args), "torch" in sys.modules, "lightning" in sys.modules]
seen["export-lora --help"] = [run(["export-lora", "--help"]), "torch" in sys.modules, "lightning" in sys.modules]
print(json.dumps(seen))
"""


def test_help_and_argument_errors_import_neither_lightning_nor_torch_unless_needed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, "-c", FAST, str(bad)], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = yaml.safe_load(out.stdout.splitlines()[-1])
    assert seen["--help"] == ["0", False, False]
    assert seen["fitt"][0].startswith("editr1: error: unknown command 'fitt'") and seen["fitt"][1:] == [False, False]
    assert seen[""][1:] == [False, False]
    assert f"YAML syntax error in config file {bad}" in seen[f"fit -c {bad}"][0] and seen[f"fit -c {bad}"][1:] == [
        False,
        False,
    ]
    assert seen["export-lora --help"] == ["0", True, False]  # the verb's own imports (torch), never Lightning


def test_print_config_of_each_command():
    from editr1 import demo_base
    from editr1.data import mini_benchmarks

    code, out, _ = _exit(["serve-reward", "--port", "0", "--max-batch", "2", "--print_config"])
    assert code == 0
    cfg = yaml.safe_load(out)
    assert (cfg["port"], cfg["max_batch"], cfg["host"], cfg["model"]) == (0, 2, "127.0.0.1", None)
    code, out, _ = _exit(["export-lora", "a.ckpt", "out", "--adapter", "ema", "--print_config"])
    assert code == 0 and yaml.safe_load(out) == {"checkpoint": "a.ckpt", "out_dir": "out", "adapter": "ema"}
    code, out, _ = _exit(["make-shards", "src", "e-%06d.tar", "--metadata-file", "m.jsonl", "--print_config"])
    assert code == 0 and yaml.safe_load(out) == {
        "folder": "src",
        "pattern": "e-%06d.tar",
        "maxcount": 1000,
        "metadata_file": "m.jsonl",
    }
    code, out, _ = _exit(["--vae-steps", "2", "--eval_count=3", "--print_config"], demo_base.main)
    cfg = yaml.safe_load(out)
    assert code == 0 and (cfg["vae_steps"], cfg["eval_count"], cfg["editor_steps"]) == (2, 3, 6000)
    code, out, _ = _exit(["--print_config"], mini_benchmarks.main)
    assert code == 0 and yaml.safe_load(out) == {"folder": "data/benchmarks"}


def test_a_config_file_gives_the_options(tmp_path):
    from editr1.data import mini_benchmarks

    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 0\ntorch_dtype: float32\n")
    code, out, _ = _exit(["serve-reward", "--config", str(cfg), "--print_config"])
    assert code == 0 and yaml.safe_load(out)["torch_dtype"] == "float32"
    cfg.write_text(f"folder: {tmp_path / 'bench'}\n")
    code, out, _ = _exit(["--config", str(cfg), "--print_config"], mini_benchmarks.main)
    assert yaml.safe_load(out) == {"folder": str(tmp_path / "bench")}  # the positional, read from the file


@pytest.mark.parametrize("verb", VERBS)
def test_a_bad_option_is_a_clear_error(verb):
    code, _, err = _exit([verb, *VERBS[verb][1], "--no_such_option", "1"])
    assert code == 2 and "Traceback" not in err
    assert "unrecognized arguments: --no_such_option" in err and f"editr1 {verb} --help" in err


def test_a_bad_value_names_its_option():
    code, _, err = _exit(["serve-reward", "--port", "eighty"])
    assert code == 2 and 'key "port"' in err and "eighty" in err
    code, _, err = _exit(["export-lora", "a.ckpt", "out", "--adapter", "best"])
    assert code == 2 and 'key "adapter"' in err
    code, _, err = _exit(["export-lora", "a.ckpt"])
    assert code == 2 and "required: out_dir" in err
    code, _, err = _exit(["make-shards", "src", "e-%06d.tar", "--maxcount", "many"])
    assert code == 2 and 'key "maxcount"' in err


def test_an_unknown_command_lists_the_commands():
    with pytest.raises(SystemExit) as e:
        cli_main(["export_lora", "a.ckpt", "out"])
    assert e.value.code == (
        "editr1: error: unknown command 'export_lora' (invalid choice; choose from "
        "fit, validate, test, predict, serve-reward, export-lora, make-shards, plan); did you mean 'export-lora'?"
    )


def test_dashed_spellings_of_the_argparse_commands_still_parse():
    names = {"vae_steps", "eval_count", "out"}
    assert _underscored(
        ["--vae-steps", "2", "--eval-count=4", "--out", "my-dir", "--other-opt", "--", "--vae-steps"], names
    ) == ["--vae_steps", "2", "--eval_count=4", "--out", "my-dir", "--other-opt", "--", "--vae-steps"]


def test_python_dash_m_is_the_same_command():
    code, expected, _ = _exit(["export-lora", "--help"])
    assert code == 0
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="120")
    out = subprocess.run(
        [sys.executable, "-m", "editr1", "export-lora", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == expected
