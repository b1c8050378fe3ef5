"""Rollout ids and per-sample seeds: stable in a sample's key and position in its group, never in its
position in the batch, and distinct per stream, rollout, occurrence and sample."""

from __future__ import annotations

import zlib

import torch

from editr1.policies.base import Condition
from editr1.seeding import ROLLOUT_NOISE, TRAIN_NOISE, TRAIN_TIMESTEPS, derive_seed
from editr1.training.rollout import Rollout, group_ids, key_hash, sample_seed


def _rollout(keys: list[str], k: int = 3, index: int = 0, base_seed: int = 7) -> Rollout:
    g = len(keys)
    return Rollout(
        prompts=[f"prompt {key}" for key in keys],
        requirements=[""] * g,
        keys=keys,
        sources=torch.zeros(g, 3, 2, 2),
        targets=None,
        cond=Condition({"e": torch.arange(g, dtype=torch.float32)[:, None]}),
        x0=torch.zeros(g * k, 4),
        edits=torch.zeros(g * k, 3, 2, 2),
        sigmas=torch.tensor([1.0, 0.5, 0.0]),
        group_size=k,
        index=index,
        base_seed=base_seed,
    )


def test_key_hash_is_crc32_of_the_utf8_key():
    assert key_hash("abc") == zlib.crc32(b"abc") == 891568578
    assert key_hash("ünï") == zlib.crc32("ünï".encode())


def test_group_ids_number_repeated_keys_by_occurrence():
    assert group_ids(["a", "b", "a", "a", "c"]) == [
        (key_hash("a"), 0),
        (key_hash("b"), 0),
        (key_hash("a"), 1),
        (key_hash("a"), 2),
        (key_hash("c"), 0),
    ]
    assert group_ids([]) == []


def test_group_ids_do_not_depend_on_the_batch_position():
    alone = dict(zip(["x"], group_ids(["x"])))
    among = dict(zip(["p", "q", "x"], group_ids(["p", "q", "x"])))
    assert alone["x"] == among["x"]


def test_sample_seed_is_derive_seed_of_its_parts():
    ids = group_ids(["a", "b"])
    # sample 4 of K = 3 is group 1 ("b"), member 1
    assert sample_seed(7, TRAIN_NOISE, 2, ids, 3, 4) == derive_seed(7, TRAIN_NOISE, 2, key_hash("b"), 0, 1)
    assert sample_seed(7, TRAIN_NOISE, 2, ids, 3, 4, 5) == derive_seed(7, TRAIN_NOISE, 2, key_hash("b"), 0, 1, 5)


def test_a_samples_seed_follows_it_to_any_batch_position():
    a = _rollout(["k1", "k2", "k3"])
    b = _rollout(["k3", "k1"])  # other batch: k3 first
    for j in range(3):
        assert a.sample_seed(ROLLOUT_NOISE, 2 * 3 + j) == b.sample_seed(ROLLOUT_NOISE, j)  # k3's member j
        assert a.sample_seed(ROLLOUT_NOISE, j) == b.sample_seed(ROLLOUT_NOISE, 3 + j)  # k1's member j


def test_seeds_are_distinct_per_stream_sample_rollout_extra_and_occurrence():
    ro = _rollout(["a", "b", "a"])
    seeds = {
        (stream, i, extra): ro.sample_seed(stream, i, *extra)
        for stream in (ROLLOUT_NOISE, TRAIN_NOISE, TRAIN_TIMESTEPS)
        for i in range(9)
        for extra in ((), (0,), (1,))
    }
    assert len(set(seeds.values())) == len(seeds)
    # the second "a" is its own group: different seeds from the first
    assert ro.sample_seed(TRAIN_NOISE, 0) != ro.sample_seed(TRAIN_NOISE, 6)
    later = _rollout(["a", "b", "a"], index=1)
    other_run = _rollout(["a", "b", "a"], base_seed=8)
    assert ro.sample_seed(TRAIN_NOISE, 0) not in (
        later.sample_seed(TRAIN_NOISE, 0),
        other_run.sample_seed(TRAIN_NOISE, 0),
    )
    assert all(0 <= s < 2**63 for s in seeds.values())


def test_group_index_num_groups_and_expand():
    ro = _rollout(["a", "b"], k=3)
    assert ro.num_groups == 2
    assert ro.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert ro.expand(["p", "q"]) == ["p", "p", "p", "q", "q", "q"]
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(ro.expand(t), torch.tensor([[1.0, 2.0]] * 3 + [[3.0, 4.0]] * 3))
    assert ro.cond.select(ro.group_index)["e"].flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
