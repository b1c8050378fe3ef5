"""Config errors explained: a renamed key names its new name, a misspelt key or class the nearest valid one and
the config file it came from, a YAML syntax error the file and position. Standard library only (``yaml`` when a
file is read), so these errors come before Lightning is imported."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Sequence
from pathlib import Path

PROG = "editr1"

# Config keys that moved: an old key stops the run with the new name instead of jsonargparse's generic error.
RENAMED_KEYS = {
    "model.rollout.lower_order_second": (
        "model.rollout.first_order_second_to_last (inverted: the old default `lower_order_second: true` is "
        "`first_order_second_to_last: true`; the new default, false, gives the reference code's solver orders)"
    ),
}


def _flat_keys(tree, prefix: str = "") -> list[str]:
    items = tree.items() if isinstance(tree, dict) else []
    return [k for key, v in items for k in (f"{prefix}{key}", *_flat_keys(v, f"{prefix}{key}."))]


def sources(args: Sequence[str]) -> list[tuple[str, str]]:
    """A command line's config files ``("file", path)`` and options ``("option", key)``, in order."""
    out = []
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            out.append(("file", args[i + 1]))
        elif a.startswith("--"):
            key, _, value = a[2:].partition("=")
            out.append(("file", value) if key == "config" else ("option", key))
    return out


def _file_keys(path: str) -> list[str]:
    """The dotted keys of a YAML config file; a syntax error stops with the file's name and position."""
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            return _flat_keys(yaml.safe_load(f) or {})
        except yaml.YAMLError as e:
            mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
            at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            why = f" ({e.context} from line {context.line + 1}, column {context.column + 1})" if context else ""
            what = getattr(e, "problem", None) or str(e)
            raise SystemExit(f"{PROG}: error: YAML syntax error in config file {path}{at}: {what}{why}") from None


def check_renamed_keys(args: list[str]) -> None:
    """Raise ``SystemExit`` with the new name when a config file or an option uses a renamed key (and with the
    file's name when a config file is not valid YAML)."""
    for kind, value in sources(args):
        keys = _file_keys(value) if kind == "file" and Path(value).is_file() else [value] * (kind == "option")
        for key, (old, new) in ((k, item) for k in keys for item in RENAMED_KEYS.items()):
            if key == old or key.endswith("." + old):
                raise SystemExit(f"{PROG}: the config key `{old}` was renamed: use {new}")


def _origin(keys: list[str], args: list[str], defaults: list[str]) -> str:
    """Which config file set one of these keys last (empty when the command line did, or nothing did)."""
    found = ""
    for kind, value in [("file", f) for f in defaults] + sources(args):
        if set(keys) & set(_file_keys(value) if kind == "file" and Path(value).is_file() else [value]):
            found = f" (in config file {value})" if kind == "file" else ""
    return found


def _nearest(value: str, options: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{near[0]}?" if near else ""


def explain(parser, message: str, args: list[str]) -> str:
    """jsonargparse's message plus the config file a bad key came from, the nearest valid key and, for a bad
    class_path, the known classes of that kind."""
    defaults = [str(f) for f in parser.default_config_files or []]
    bad = re.search(r"(?:does not accept option '|unrecognized arguments: (--))([\w.\-]+)", message)
    if bad:
        key = bad.group(2).split("=", 1)[0]
        keys = [a.dest for a in parser._actions if isinstance(a.dest, str) and "." in a.dest]
        return message + _origin([key], args, defaults) + _nearest(key, keys, bad.group(1) or "")
    head = re.match(r'Parser key "([\w.]+)":', message)
    action = parser._option_string_actions.get(f"--{head.group(1)}") if head else None
    if action is None:
        return message
    key = head.group(1)
    option = re.search(r"Option '(\w+)' is not accepted", message)
    given = re.search(r"given class_path '([\w.]+)'|import path string: (\S+)", message)
    if option and given and given.group(1):  # a misspelt init_args key of a valid class
        module, name = given.group(1).rsplit(".", 1)
        params = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
        keys = [f"{key}.init_args.{option.group(1)}", f"{key}.{option.group(1)}"]
        return message + _origin(keys, args, defaults) + _nearest(option.group(1), params)
    if given:  # a class_path that names no class
        from jsonargparse._typehints import get_all_subclass_paths  # what jsonargparse's --help lists

        known = get_all_subclass_paths(action._typehint)
        value = given.group(1) or given.group(2)
        short = {path.rsplit(".", 1)[-1]: path for path in known}
        near = difflib.get_close_matches(value.rsplit(".", 1)[-1], list(short), n=1, cutoff=0.6)
        message += _origin([f"{key}.class_path", key], args, defaults)
        message += f"; did you mean {short[near[0]]}?" if near else ""
        message += f"\n  known classes for {key}: {', '.join(known)}" if known else ""
    return message
