"""The comparison script's arithmetic (benchmarks/compare_objectives.py): mean curves over seeds and the time
ratio, against hand-computed values."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_objectives as co  # noqa: E402


def _pt(step, train_s, heldout, step_mark=None, time_mark=None, unseen=0.5):
    return {
        "step": step,
        "train_s": train_s,
        "step_mark": step_mark,
        "time_mark": time_mark,
        "heldout": heldout,
        "unseen": unseen,
    }


def test_curve_averages_the_points_that_answer_each_mark():
    a = [_pt(0, 0.0, 0.5, 0, 0.0), _pt(3, 10.0, 0.7, None, 10.0)]
    b = [_pt(0, 0.0, 0.5, 0, 0.0), _pt(2, 12.0, 0.9, None, 10.0)]
    assert co.curve([a, b], "step_mark") == [(0, 0.5, 0.0, 2)]
    (x0, m0, s0, n0), (x1, m1, s1, n1) = co.curve([a, b], "time_mark")
    assert (x0, m0, s0, n0) == (0.0, 0.5, 0.0, 2)
    # x: the mean time the points were taken at; std: sample std of 0.7 and 0.9
    assert (x1, n1) == (11.0, 2) and m1 == pytest.approx(0.8) and s1 == pytest.approx(0.1414213562)


def test_time_to_reach_interpolates_between_marks():
    pts = [(0.0, 0.5, 0, 1), (10.0, 0.7, 0, 1), (20.0, 0.9, 0, 1)]
    assert co.time_to_reach(pts, 0.5) == 0.0
    assert co.time_to_reach(pts, 0.6) == pytest.approx(5.0)
    assert co.time_to_reach(pts, 0.8) == pytest.approx(15.0)
    assert co.time_to_reach(pts, 0.95) is None


def test_summary_ratio_against_flow_grpos_final_and_first_time():
    nft = [[_pt(0, 0.0, 0.5, 0, 0.0), _pt(5, 10.0, 0.9, None, 10.0), _pt(9, 20.0, 0.9, None, 20.0)]]
    grpo = [[_pt(0, 0.0, 0.5, 0, 0.0), _pt(4, 10.0, 0.7, None, 10.0), _pt(8, 20.0, 0.7, None, 20.0)]]
    text = co.summarise({"nft": nft, "flow_grpo": grpo}, budget_s=20.0)
    # NFT reaches 0.7 at 5 s (halfway from 0.5 to 0.9); Flow-GRPO ends at 20 s, first at 0.7 at 10 s
    assert "5 s / 20 s = **0.25**" in text and "(10 s): 0.50" in text
    assert "| DiffusionNFT (Edit-R1) | 1 | 9 | 0.500 | 0.900 | 0.500 |" in text
