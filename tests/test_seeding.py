"""Deterministic per-sample seeds and noise."""

from __future__ import annotations

import torch

from editr1.seeding import derive_seed, per_sample_rand, per_sample_randn


def test_derive_seed_matches_splitmix64_reference():
    # derive_seed(0) = splitmix64 applied to 0 once. The reference SplitMix64 (Vigna) seeded with 0
    # yields 0xE220A8397B1DCDAF first; masked to 63 bits that is 0x6220A8397B1DCDAF.
    assert derive_seed(0) == 0x6220A8397B1DCDAF


def test_derive_seed_regression_pins():
    # Regression pins: values computed once with this implementation. Seeds feed every random draw
    # of a run (rollout noise, training noise, timesteps); if these change, resumed runs and
    # recorded experiments stop being reproducible. Change only deliberately.
    assert derive_seed(1, 2, 3) == 5797055558538453683
    assert derive_seed(3, 2, 1) == 6208915147396738916
    assert derive_seed(12345, 1, 7) == 6409174487825538307


def test_derive_seed_stable_and_order_sensitive():
    assert derive_seed(7, 3, 11) == derive_seed(7, 3, 11)
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(0, 0) != derive_seed(0)  # the number of parts matters
    assert derive_seed(5, 1) != derive_seed(5, 2)


def test_derive_seed_range():
    seeds = [
        derive_seed(base, step, i, s)
        for base in (0, 42, 2**40)
        for step in range(5)
        for i in range(8)
        for s in (1, 2, 3, 4)
    ]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(seeds)  # no collisions in a small grid
    assert 0 <= derive_seed(-1, 2**70, -(2**65)) < 2**63  # negative / oversized parts are masked, not errors
    # usable as a torch seed
    torch.Generator().manual_seed(derive_seed(2**64 - 1, 3))


def test_per_sample_randn_rows_follow_their_seeds():
    seeds = [11, 22, 33]
    shape = (2, 3)
    x = per_sample_randn(shape, seeds)
    assert x.shape == (3, 2, 3)
    assert x.dtype == torch.float32
    for i, s in enumerate(seeds):
        expected = torch.randn(shape, generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(x[i], expected, rtol=0, atol=0)
    # same seeds permuted → rows permuted
    y = per_sample_randn(shape, [33, 11, 22])
    torch.testing.assert_close(y, x[[2, 0, 1]], rtol=0, atol=0)
    # a row does not depend on which other samples share the batch
    torch.testing.assert_close(per_sample_randn(shape, [22])[0], x[1], rtol=0, atol=0)
    # different seeds → different rows; a repeated seed → the same row
    assert not torch.equal(x[0], x[1])
    z = per_sample_randn(shape, [11, 11])
    torch.testing.assert_close(z[0], z[1], rtol=0, atol=0)


def test_per_sample_randn_dtype_and_empty():
    x = per_sample_randn((4,), [5, 6], dtype=torch.float64)
    assert x.dtype == torch.float64
    torch.testing.assert_close(
        x[1], torch.randn(4, generator=torch.Generator().manual_seed(6), dtype=torch.float64), rtol=0, atol=0
    )
    empty = per_sample_randn((2, 3), [])
    assert empty.shape == (0, 2, 3)
    assert empty.dtype == torch.float32


def test_per_sample_rand():
    u = per_sample_rand(4, [9, 8])
    assert u.shape == (2, 4)
    torch.testing.assert_close(u[0], torch.rand(4, generator=torch.Generator().manual_seed(9)), rtol=0, atol=0)
    torch.testing.assert_close(per_sample_rand(4, [8, 9]), u[[1, 0]], rtol=0, atol=0)
    assert ((u >= 0) & (u < 1)).all()
    assert per_sample_rand(4, []).shape == (0, 4)
