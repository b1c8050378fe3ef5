"""Benchmark aggregation and strict parsing against hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from editr1.evaluation.protocols import (
    CategoryMean,
    GEditScore,
    imgedit_sample_score,
    parse_rubric_scores,
    parse_viescore,
    viescore_sample,
)

CRITERIA = ["Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity"]


def test_imgedit_overall_is_the_mean_of_type_means_not_of_samples():
    m = CategoryMean(["add", "remove", "style"])
    # add: samples (5,5,4) -> 14/3 and (1,2,3) -> 2; remove: (3,3,3) -> 3; style: nothing
    m.update(
        ["add", "add", "remove"],
        [imgedit_sample_score([5, 5, 4]), imgedit_sample_score([1, 2, 3]), imgedit_sample_score([3, 3, 3])],
    )
    m.update(["remove"], [imgedit_sample_score(None)])  # a failed judgement
    out = m.compute()
    add = (14 / 3 + 2) / 2  # 3.3333
    assert out["category/add"] == pytest.approx(add) and out["category/remove"] == pytest.approx(3.0)
    assert math.isnan(out["category/style"])
    assert out["macro"] == pytest.approx((add + 3.0) / 2)  # 3.1667: types weigh the same
    assert out["micro"] == pytest.approx((14 / 3 + 2 + 3) / 3)  # 3.2222: samples weigh the same
    assert out["failed"] == 1 and out["samples"] == 3


def test_states_merge_like_several_processes():
    a, b, whole = (CategoryMean(["x", "y"]) for _ in range(3))
    a.update(["x", "y"], [1.0, 4.0])
    b.update(["x", "x", "y"], [2.0, 3.0, float("nan")])
    whole.update(["x", "y", "x", "x", "y"], [1.0, 4.0, 2.0, 3.0, float("nan")])
    a.merge_state(b)
    assert a.compute() == whole.compute()


def test_gedit_viescore_aggregation():
    assert viescore_sample([8, 6], [9, 7]) == (6, 7, pytest.approx(math.sqrt(42)))
    sc, pq, o = viescore_sample(None, [9, 7])
    assert math.isnan(sc) and pq == 7 and math.isnan(o)
    m = GEditScore(groups=["color_alter", "text_change"])
    # color_alter: (SC 4, PQ 9) O 6 and (SC 9, PQ 4) O 6; text_change: (SC 1, PQ 1) O 1
    m.update(["color_alter", "color_alter", "text_change"], [4, 9, 1], [9, 4, 1])
    out = m.compute()
    assert out["SC/color_alter"] == pytest.approx(6.5) and out["O/color_alter"] == pytest.approx(6.0)
    assert out["G_SC"] == pytest.approx((6.5 + 1) / 2) and out["G_PQ"] == pytest.approx((6.5 + 1) / 2)
    assert out["G_O"] == pytest.approx((6 + 1) / 2)  # micro would be (6+6+1)/3 = 4.33
    m.update(["text_change"], [float("nan")], [5])
    assert m.compute()["failed"] == 1 and m.compute()["samples"] == 3


def test_unknown_category_or_length_mismatch_is_an_error():
    m = CategoryMean(["a"])
    with pytest.raises(ValueError, match="unknown"):
        m.update(["b"], [1.0])
    with pytest.raises(ValueError, match="2 categories for 1"):
        m.update(["a", "a"], torch.tensor([1.0]))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Prompt Compliance: 4\nVisual Naturalness: 5\nPhysical & Detail Integrity: 3", [4, 5, 3]),
        (
            "**Visual Naturalness**: 2\n- Prompt Compliance: 1\nPhysical & Detail Integrity: 5\nBrief reasoning...",
            [1, 2, 5],
        ),
        ("Prompt Compliance: 4\nVisual Naturalness: 5", None),  # one missing
        ("Prompt Compliance: 6\nVisual Naturalness: 5\nPhysical & Detail Integrity: 3", None),  # out of range
        ("Prompt Compliance: 4.5\nVisual Naturalness: 5\nPhysical & Detail Integrity: 3", None),  # not an integer
        (
            "Prompt Compliance: 4\nPrompt Compliance: 2\nVisual Naturalness: 5\nPhysical & Detail Integrity: 3",
            None,
        ),  # twice
        ("I would rate this edit highly.", None),
    ],
)
def test_rubric_parsing_is_strict(text, expected):
    assert parse_rubric_scores(text, CRITERIA) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"score": [7, 9], "reasoning": "fine"}', [7.0, 9.0]),
        ('```json\n{"reasoning": "ok", "score": [0, 10]}\n```', [0.0, 10.0]),
        ('{"score": [7]}', None),
        ('{"score": [7, 11]}', None),
        ('{"score": ["7", 9]}', None),
        ('{"score": [true, 9]}', None),
        ("score: 7, 9", None),
        ("[7, 9]", None),
    ],
)
def test_viescore_parsing_is_strict(text, expected):
    assert parse_viescore(text) == expected
