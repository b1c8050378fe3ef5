"""Two helpers of :func:`editr1.cli.function_cli` (the extra verbs' jsonargparse front end): dashed option
spellings and a command's description from its docstring. Standard library only, like ``editr1.cli``'s imports."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence


def underscored(args: Sequence[str], names: set[str]) -> list[str]:
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


def docstring_description(component: Callable) -> str | None:
    """The docstring up to its ``Args:`` section (jsonargparse alone shows only the first line)."""
    text = []
    for line in (inspect.getdoc(component) or "").splitlines():
        if line.rstrip() in ("Args:", "Arguments:", "Attributes:", "Returns:", "Raises:"):
            break
        text.append(line)
    return "\n".join(text).strip() or None
