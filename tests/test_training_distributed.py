"""The cross-process helpers on one process: identities and plain values, no collective called (the
multi-process behaviour is in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from editr1.training import distributed


@pytest.fixture(autouse=True)
def no_collectives(monkeypatch):
    """Any torch.distributed collective called here is a failure."""

    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called on one process")

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast"):
        monkeypatch.setattr(torch.distributed, name, refuse, raising=False)


def test_not_initialised_in_a_plain_process():
    assert distributed.initialized() is False


def test_reduce_is_the_value_as_a_float():
    for op in ("sum", "max"):
        out = distributed.reduce(3, op, world=1)
        assert out == 3.0 and type(out) is float
    assert distributed.reduce(torch.tensor(2.5), world=1, device="cpu") == 2.5


def test_any_process_is_the_flag_itself():
    assert distributed.any_process(True, world=1) is True
    assert distributed.any_process(False, world=1) is False
    assert distributed.any_process(2, world=1) is True


def test_gather_lists_is_a_list_of_the_items():
    gen = (x * x for x in range(3))
    assert distributed.gather_lists(gen, world=1) == [0, 1, 4]
    items = ["a", "b"]
    out = distributed.gather_lists(items, world=1)
    assert out == items and out is not items
    # a world size above one without an initialised process group still answers locally
    assert distributed.gather_lists(items, world=2) == items


def test_gather_objects_is_one_entry():
    obj = {"x": 1}
    assert distributed.gather_objects(obj, world=1) == [obj]
    assert distributed.gather_objects(obj, world=1)[0] is obj
    assert distributed.gather_objects(obj, world=4) == [obj]  # not initialised


def test_gather_rows_returns_the_rows_and_offset_zero():
    rows = torch.tensor([[0.1, float("nan")], [0.3, 0.4]])
    out, offset = distributed.gather_rows(rows, world=1, rank=0, device="cpu")
    assert out is rows and offset == 0
    empty, offset = distributed.gather_rows(torch.empty(0, 4), world=1, rank=0, device="cpu")
    assert empty.shape == (0, 4) and offset == 0


def test_sum_gradients_leaves_gradients_alone():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(3))
    a.grad = torch.tensor([1.0, -2.0])
    distributed.sum_gradients([a, b], world=1)
    assert torch.equal(a.grad, torch.tensor([1.0, -2.0])) and b.grad is None  # no zeros made on one process
