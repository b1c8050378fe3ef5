"""Checkpoint state beyond the adapters: the global RNG states round-trip through a weights-only checkpoint, and
the emergency checkpoint lands where the error message says."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from editr1.training.state import emergency_checkpoint, rng_states, set_rng_states


@pytest.fixture(autouse=True)
def keep_global_generators():
    """These tests reseed the global generators: put them back as they were for whatever runs next."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])


def _draws() -> tuple:
    return (
        torch.rand(4).tolist(),
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),
        random.random(),
        random.gauss(0, 1),
    )


def test_rng_states_restore_every_generator():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn(1)  # leaves a cached Gaussian in NumPy's state (has_gauss = 1)
    random.gauss(0, 1)  # and in Python's (gauss_next)
    state = rng_states()
    first = _draws()
    _draws()
    set_rng_states(state)
    assert _draws() == first


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    random.gauss(0, 1)
    state = rng_states()
    expected = _draws()
    path = tmp_path / "rng.pt"
    torch.save({"rng": [state]}, path)
    loaded = torch.load(path, weights_only=True)["rng"][0]  # only tensors and plain Python values inside
    assert isinstance(loaded["torch"], torch.Tensor) and isinstance(loaded["numpy"]["keys"], torch.Tensor)
    assert loaded["numpy"]["keys"].dtype == torch.int64 and loaded["numpy"]["keys"].shape == (624,)
    assert isinstance(loaded["python"]["internal"], torch.Tensor) and loaded["python"]["internal"].shape == (625,)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    set_rng_states(loaded)
    assert _draws() == expected


def test_numpy_keys_above_the_int32_range_round_trip():
    np.random.seed(2**32 - 1)
    state = rng_states()
    keys = np.random.get_state()[1]
    assert keys.max() > 2**31  # uint32 values that do not fit int32: why the keys are stored as int64
    np.random.seed(0)
    set_rng_states(state)
    assert np.array_equal(np.random.get_state()[1], keys)


class _Trainer:
    def __init__(self, log_dir, root, step=0):
        self.log_dir, self.default_root_dir, self.global_step = log_dir, root, step
        self.saved: list[str] = []

    def save_checkpoint(self, path: str) -> None:
        self.saved.append(path)


def test_emergency_checkpoint_goes_to_the_run_folder(tmp_path):
    trainer = _Trainer(str(tmp_path / "run" / "version_0"), str(tmp_path), step=12)
    path = emergency_checkpoint(trainer, "reward")
    assert path == str(tmp_path / "run" / "version_0" / "checkpoints" / "stopped-reward-step12.ckpt")
    assert trainer.saved == [path]


def test_emergency_checkpoint_without_a_logger_uses_the_root_folder(tmp_path):
    trainer = _Trainer(None, str(tmp_path), step=3)
    assert emergency_checkpoint(trainer, "nonfinite") == str(tmp_path / "checkpoints" / "stopped-nonfinite-step3.ckpt")
