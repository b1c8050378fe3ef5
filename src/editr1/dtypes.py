"""The ``torch_dtype`` names configs may use, and their torch dtypes (one table for policies and judges)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name``; a ValueError listing the choices for any other name."""
    if name not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point parameters in ``dtype`` inside the block (no float32 copy of a large model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
