"""Hand-computed checks of the training-timestep selection (DESIGN §2, "Training timesteps")."""

from __future__ import annotations

import math

import pytest
import torch

from editr1.algorithms.timesteps import continuous_timesteps, num_train_timesteps, rollout_timesteps, train_timesteps

SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.55, 0.3, 0.1])  # 6 solver steps, terminal 0 dropped
KEYS = torch.tensor(
    [
        # argsort: 0.1(1) 0.2(5) 0.3(3) 0.5(0) 0.7(4) 0.9(2) → order [1, 5, 3, 0, 4, 2]
        [0.5, 0.1, 0.9, 0.3, 0.7, 0.2],
        # argsort: 0.05(0) 0.15(2) 0.25(4) 0.75(5) 0.85(3) 0.95(1) → order [0, 2, 4, 5, 3, 1]
        [0.05, 0.95, 0.15, 0.85, 0.25, 0.75],
    ]
)
# first 5 of each permutation: sample 0 → σ[1, 5, 3, 0, 4] = [0.9, 0.1, 0.55, 1.0, 0.3]
#                              sample 1 → σ[0, 2, 4, 5, 3] = [1.0, 0.75, 0.3, 0.1, 0.55]
# returned as (count, batch): row j = every sample's timestep at round j
EXPECTED_ROLLOUT = torch.tensor([[0.9, 1.0], [0.1, 0.75], [0.55, 0.3], [1.0, 0.1], [0.3, 0.55]])


# ---------------------------------------------------------------------------------------------- num_train_timesteps


@pytest.mark.parametrize(
    "steps, expected",
    [
        (6, 5),  # int(5.94)
        (2, 1),  # int(1.98)
        (10, 9),  # int(9.9)
        (28, 27),  # int(27.72)
        (100, 99),  # 100 × 0.99 is exactly 99.0 in floating point
        (200, 198),  # int(198.0)
    ],
)
def test_num_train_timesteps(steps, expected):
    assert num_train_timesteps(steps) == expected


def test_num_train_timesteps_fraction():
    assert num_train_timesteps(6, 1.0) == 6
    assert num_train_timesteps(6, 0.5) == 3
    assert num_train_timesteps(10, 0.3) == 3  # 10 × 0.3 = 3.0000000000000004 → 3
    # the reference code's rule, int(steps × fraction) on the float product: 100 × 0.29 = 28.999999999999996
    assert num_train_timesteps(100, 0.29) == 28
    assert num_train_timesteps(100, 0.57) == 56  # 56.99999999999999
    assert num_train_timesteps(6, 0.17) == 1  # 1.02


def test_num_train_timesteps_zero_is_an_error():
    """int(1 × 0.99) = 0 would train nothing (the reference divides by it): a clear error names the fix."""
    with pytest.raises(ValueError, match="timestep_fraction"):
        num_train_timesteps(1)
    with pytest.raises(ValueError, match="at least 0.1667"):
        num_train_timesteps(6, 0.01)


@pytest.mark.parametrize("steps, fraction", [(0, 0.99), (-3, 0.99), (6, 0.0), (6, -0.5), (6, 1.01)])
def test_num_train_timesteps_errors(steps, fraction):
    with pytest.raises(ValueError):
        num_train_timesteps(steps, fraction)


# ---------------------------------------------------------------------------------------------- rollout_timesteps


def test_rollout_timesteps_hand_permutation():
    ts = rollout_timesteps(SIGMAS, KEYS, 5)
    assert ts.shape == (5, 2)
    assert ts.dtype == torch.float32
    torch.testing.assert_close(ts, EXPECTED_ROLLOUT)
    # count 2: just the first two rounds
    torch.testing.assert_close(rollout_timesteps(SIGMAS, KEYS, 2), EXPECTED_ROLLOUT[:2])
    # count = all: the whole permutation
    full = rollout_timesteps(SIGMAS, KEYS, 6)
    torch.testing.assert_close(full[:, 0], SIGMAS[[1, 5, 3, 0, 4, 2]])
    torch.testing.assert_close(full[:, 1], SIGMAS[[0, 2, 4, 5, 3, 1]])


def test_rollout_timesteps_rows_are_subsets_without_repeats():
    g = torch.Generator().manual_seed(123)
    keys = torch.rand(64, 6, generator=g)
    ts = rollout_timesteps(SIGMAS, keys, 5)
    assert ts.shape == (5, 64)
    allowed = set(SIGMAS.tolist())
    for b in range(64):
        col = ts[:, b].tolist()
        assert set(col) <= allowed
        assert len(set(col)) == 5  # no repeats
    # the permutation really varies between samples
    assert len({tuple(ts[:, b].tolist()) for b in range(64)}) > 10


def test_rollout_timesteps_sample_depends_only_on_its_keys():
    a = rollout_timesteps(SIGMAS, KEYS, 5)
    b = rollout_timesteps(SIGMAS, KEYS[[1]], 5)
    torch.testing.assert_close(b[:, 0], a[:, 1])


def test_rollout_timesteps_errors():
    with pytest.raises(ValueError):  # terminal 0 left in
        rollout_timesteps(torch.tensor([1.0, 0.5, 0.0]), torch.rand(2, 3), 2)
    with pytest.raises(ValueError):  # keys width ≠ len(sigmas)
        rollout_timesteps(SIGMAS, torch.rand(2, 5), 3)
    with pytest.raises(ValueError):  # keys not 2-d
        rollout_timesteps(SIGMAS, torch.rand(6), 3)
    with pytest.raises(ValueError):  # count 0
        rollout_timesteps(SIGMAS, KEYS, 0)
    with pytest.raises(ValueError):  # count > steps
        rollout_timesteps(SIGMAS, KEYS, 7)
    with pytest.raises(ValueError):  # empty sigmas
        rollout_timesteps(torch.tensor([]), torch.rand(2, 0), 1)
    with pytest.raises(ValueError):  # 2-d sigmas
        rollout_timesteps(SIGMAS[None], KEYS, 3)


# ---------------------------------------------------------------------------------------------- continuous_timesteps


def test_continuous_uniform_maps_into_range():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(continuous_timesteps(u), u)  # default [0, 1]
    # t_min + (t_max − t_min)·u with [0.2, 0.6]: [0.2, 0.3, 0.4, 0.6]
    torch.testing.assert_close(continuous_timesteps(u, "uniform", 0.2, 0.6), torch.tensor([0.2, 0.3, 0.4, 0.6]))
    u2 = torch.rand(3, 7, generator=torch.Generator().manual_seed(1))
    t = continuous_timesteps(u2, "uniform", 0.1, 0.9)
    assert t.shape == (3, 7)
    assert (t >= 0.1).all() and (t <= 0.9).all()


def test_continuous_logit_normal():
    half = torch.tensor([0.5])
    # erfinv(0) = 0 → t = sigmoid(logit_mean)
    torch.testing.assert_close(continuous_timesteps(half, "logit_normal"), torch.tensor([0.5]))
    sig1 = 1 / (1 + math.exp(-1.0))  # 0.7310585786
    torch.testing.assert_close(continuous_timesteps(half, "logit_normal", logit_mean=1.0), torch.tensor([sig1]))
    # mapped into [t_min, t_max]: 0.2 + 0.4·sigmoid(1)
    torch.testing.assert_close(
        continuous_timesteps(half, "logit_normal", 0.2, 0.6, logit_mean=1.0), torch.tensor([0.2 + 0.4 * sig1])
    )
    # u = Φ(1) = 0.8413447461 → z = 1 → sigmoid(std·1 + mean) = sigmoid(2·1 − 0.5) = sigmoid(1.5)
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    t = continuous_timesteps(torch.tensor([phi1], dtype=torch.float64), "logit_normal", logit_mean=-0.5, logit_std=2.0)
    assert float(t) == pytest.approx(1 / (1 + math.exp(-1.5)), abs=1e-6)
    # extreme u stays finite and inside (0, 1)
    t = continuous_timesteps(torch.tensor([0.0, 1.0]), "logit_normal")
    assert torch.isfinite(t).all() and (t > 0).all() and (t < 1).all()


def test_continuous_errors():
    u = torch.tensor([0.5])
    with pytest.raises(ValueError):
        continuous_timesteps(u, "uniform", 0.6, 0.6)
    with pytest.raises(ValueError):
        continuous_timesteps(u, "uniform", 0.7, 0.2)
    with pytest.raises(ValueError):
        continuous_timesteps(u, "uniform", -0.1, 1.0)
    with pytest.raises(ValueError):
        continuous_timesteps(u, "uniform", 0.0, 1.1)
    with pytest.raises(ValueError):
        continuous_timesteps(u, "beta")


# ---------------------------------------------------------------------------------------------- train_timesteps


def test_train_timesteps_rollout_dispatch():
    ts = train_timesteps("rollout", SIGMAS, KEYS)  # 6 steps → ⌊5.94⌋ = 5 rounds
    assert ts.shape == (5, 2)
    torch.testing.assert_close(ts, EXPECTED_ROLLOUT)
    assert train_timesteps("rollout", SIGMAS, KEYS, fraction=0.5).shape == (3, 2)


def test_train_timesteps_uniform_dispatch():
    ts = train_timesteps("uniform", SIGMAS, KEYS, t_min=0.2, t_max=0.6)
    # first 5 keys per sample, 0.2 + 0.4·u:
    #   sample 0: [0.5, 0.1, 0.9, 0.3, 0.7]     → [0.4, 0.24, 0.56, 0.32, 0.48]
    #   sample 1: [0.05, 0.95, 0.15, 0.85, 0.25] → [0.22, 0.58, 0.26, 0.54, 0.3]
    expected = torch.tensor([[0.4, 0.24, 0.56, 0.32, 0.48], [0.22, 0.58, 0.26, 0.54, 0.3]]).T
    assert ts.shape == (5, 2)
    torch.testing.assert_close(ts, expected)


def test_train_timesteps_logit_normal_dispatch():
    keys = torch.full((3, 6), 0.5)
    ts = train_timesteps("logit_normal", SIGMAS, keys, logit_mean=1.0)
    assert ts.shape == (5, 3)
    torch.testing.assert_close(ts, torch.full((5, 3), 1 / (1 + math.exp(-1.0))))


def test_train_timesteps_bad_mode():
    with pytest.raises(ValueError):
        train_timesteps("discrete", SIGMAS, KEYS)
