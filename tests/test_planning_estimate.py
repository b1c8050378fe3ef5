"""The per-process arithmetic of ``editr1 plan`` (editr1.planning.estimate) against figures worked by hand."""

from __future__ import annotations

import pytest

from editr1.planning.estimate import (
    GiB,
    ModelSizes,
    Parallel,
    Peak,
    largest_micro_batch,
    linear,
    parse_size,
    per_device,
)

SIZES = ModelSizes(
    components={"transformer": (1000, 2000), "vae": (10, 20), "text_encoder": (300, 600)},
    sharded=("transformer", "text_encoder"),
    largest_unit=100,
    lora=50,
    adapters=("default", "old", "ema"),
)


def test_parse_size():
    assert parse_size("80GB") == parse_size("80 GiB") == parse_size("80g") == parse_size(80) == 80 * GiB
    assert parse_size("24000MB") == 24000 * 2**20 and parse_size("1.5TB") == int(1.5 * 2**40)
    assert parse_size("512 b") == 512 and parse_size("141") == 141 * GiB
    for bad in ("", "eighty GB", "80 PB", "-1GB"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_size(bad)


def test_parallel():
    assert Parallel(8, 2, True).world == 16 and Parallel(8, 2, True).sharded
    assert not Parallel(1, 1, True).sharded and not Parallel(4, 1, False).sharded
    with pytest.raises(ValueError):
        Parallel(0, 1)


def test_one_process_holds_everything():
    state = per_device(SIZES, Parallel(), "adamw")
    assert state.parts == {"transformer": 2000, "vae": 20, "text_encoder": 600}
    assert state.weights == 2620  # no unit is gathered: nothing is sharded
    assert (state.lora, state.grads, state.optimizer) == (50 * 4 * 3, 50 * 4, 50 * 8)
    assert state.total == 2620 + 600 + 200 + 400
    assert per_device(SIZES, Parallel(devices=4, shard=False)).total == state.total  # replicated


def test_fsdp2_shards_the_transformer_text_encoders_and_lora_not_the_vae():
    state = per_device(SIZES, Parallel(devices=2, num_nodes=2, shard=True), "adamw8bit")
    assert state.parts == {"transformer": 500, "vae": 20, "text_encoder": 150}
    assert state.weights == 500 + 20 + 150 + 2 * 100  # plus the running and the prefetched unit
    lora = 13  # ceil(50 / 4)
    assert (state.lora, state.grads, state.optimizer) == (lora * 4 * 3, lora * 4, lora * 2)
    with pytest.raises(ValueError, match="optimizer"):
        per_device(SIZES, Parallel(), "sgd")


def test_linear_activations():
    assert linear(10, 10, 1)(4) == 40  # one point: through the origin
    line = linear(10, 40, 4)  # slope 10 through (1, 10)
    assert [line(b) for b in (1, 2, 4, 8)] == [10, 20, 40, 80]
    assert linear(12, 30, 4)(7) == 48  # a fixed part of 6: 6 + 6·b


def test_peak_is_the_larger_phase_on_top_of_the_state():
    assert Peak(persistent=100, rollout_data=10, training=50, rollout=70).total == 180
    assert Peak(100, 10, 90, 70).total == 200


def test_largest_micro_batch():
    act = linear(10, 20, 2)  # 10 per sample
    # 100 persistent + 5 data + max(10·b, 15): b = 8 gives 185, b = 9 gives 195, b = 10 gives 205
    assert largest_micro_batch(200, 100, 5, 15, act, most=64) == 9
    assert largest_micro_batch(200, 100, 5, 15, act, most=4) == 4  # never more than the step's samples
    assert largest_micro_batch(110, 100, 5, 15, act, most=64) == 0  # the rollout alone does not fit
