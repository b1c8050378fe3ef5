"""The one ``torch_dtype`` table of policies and judges (the happy path is in test_policy_base.py)."""

from __future__ import annotations

import pytest
import torch

from editr1.dtypes import DTYPES, resolve_dtype


def test_the_table_holds_exactly_the_three_floating_dtypes():
    assert dict(DTYPES) == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert all(d.is_floating_point for d in DTYPES.values())
    assert all(resolve_dtype(name) is d for name, d in DTYPES.items())


@pytest.mark.parametrize("name", ["Float32", "fp16", "bf16", "float64", "torch.float32", ""])
def test_other_names_are_refused_with_the_sorted_choices(name):
    with pytest.raises(ValueError) as err:
        resolve_dtype(name)
    assert str(err.value) == f"torch_dtype must be one of ['bfloat16', 'float16', 'float32'], got {name!r}"


def test_default_dtype_creates_parameters_in_it_and_restores_the_default():
    from editr1.dtypes import default_dtype

    with default_dtype(torch.bfloat16):
        assert torch.nn.Linear(2, 2).weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(RuntimeError), default_dtype(torch.float16):
        raise RuntimeError("inside")
    assert torch.get_default_dtype() == torch.float32
