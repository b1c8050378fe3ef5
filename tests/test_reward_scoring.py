"""The implicit score: expected digit from logits or from top log-probabilities (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch

from editr1.rewards.prompts import DEFAULT_TEMPLATE, load_template, render
from editr1.rewards.scoring import (
    digit_score_from_logits,
    digit_token_ids,
    expected_score_from_logits,
    expected_score_from_top_logprobs,
)
from editr1.rewards.tiny_judge import build_processor


def test_expected_score_from_logits_by_hand():
    # Digits sit at ids 7..12 of a 13-token vocabulary; other logits must not matter.
    digit_ids = [7, 8, 9, 10, 11, 12]
    logits = torch.full((3, 13), -50.0)
    logits[:, :7] = 100.0  # huge non-digit logits are ignored: the softmax is over the digits only
    logits[0, 7:] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # uniform: E = 2.5 → 0.5
    logits[1, 12] = 0.0  # all mass on "5" → 1.0
    logits[2, 7:] = torch.tensor([math.log(1), math.log(3), -50, -50, -50, math.log(4)])
    # p = (1/8, 3/8, 0, 0, 0, 4/8): E = 3/8 + 20/8 = 23/8 → 23/40
    s = expected_score_from_logits(logits, digit_ids)
    torch.testing.assert_close(s, torch.tensor([0.5, 1.0, 23 / 40]), rtol=0, atol=1e-6)


def test_non_finite_logits_give_nan_not_a_number():
    logits = torch.zeros(2, 6)
    logits[1, 3] = float("nan")
    s = expected_score_from_logits(logits, list(range(6)))
    assert s[0] == pytest.approx(0.5) and torch.isnan(s[1])


def test_greedy_and_sampled_digit_scores():
    digit_ids = [7, 8, 9, 10, 11, 12]
    logits = torch.full((3, 13), -50.0)
    logits[:, :7] = 100.0  # non-digit tokens never count
    logits[0, 7:] = torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0, 1.0])  # most likely digit 1 → 0.2
    logits[1, 11] = 0.0  # all mass on "4" → 0.8
    logits[2, 9] = float("inf")  # a broken forward pass: NaN, never a digit
    greedy = digit_score_from_logits(logits, digit_ids, "greedy")
    assert greedy[:2].tolist() == pytest.approx([0.2, 0.8]) and torch.isnan(greedy[2])
    # sampled: draws follow p = softmax over the digits; a one-digit distribution always gives that digit
    many = torch.zeros(4000, 13)
    many[:, 7:] = torch.tensor([math.log(0.5), -1e4, -1e4, math.log(0.3), -1e4, math.log(0.2)])
    g = torch.Generator().manual_seed(0)
    draws = digit_score_from_logits(many, digit_ids, "sampled", g) * 5
    share = torch.bincount(draws.round().long(), minlength=6).float() / len(draws)
    torch.testing.assert_close(share, torch.tensor([0.5, 0, 0, 0.3, 0, 0.2]), atol=0.03, rtol=0)
    assert digit_score_from_logits(logits[1:2], digit_ids, "sampled", g).item() == pytest.approx(0.8)
    # seeded: the same generator seed gives the same draws; the expected score is their mean
    again = digit_score_from_logits(many, digit_ids, "sampled", torch.Generator().manual_seed(0)) * 5
    assert torch.equal(draws, again)
    assert draws.mean().item() / 5 == pytest.approx(digit_score_from_logits(many[:1], digit_ids).item(), abs=0.02)
    with pytest.raises(ValueError, match="expected, sampled or greedy"):
        digit_score_from_logits(logits, digit_ids, "mean")


def test_expected_score_from_top_logprobs_renormalises_over_digits_present():
    # Only "1" (p = 0.2) and "4" (p = 0.6) are present, plus a word: renormalised 0.25 / 0.75.
    top = [("4", math.log(0.6)), ("yes", math.log(0.15)), ("1", math.log(0.2))]
    assert expected_score_from_top_logprobs(top) == pytest.approx((0.25 * 1 + 0.75 * 4) / 5)
    # " 3" and "3" are both the digit 3 and add up; "7" and "10" are not digits 0-5.
    top = [(" 3", math.log(0.3)), ("3", math.log(0.3)), ("7", math.log(0.2)), ("0", math.log(0.2)), ("10", -10.0)]
    assert expected_score_from_top_logprobs(top) == pytest.approx((0.6 * 3) / 0.8 / 5)
    assert math.isnan(expected_score_from_top_logprobs([("yes", -0.1), ("no", -2.5)]))
    assert math.isnan(expected_score_from_top_logprobs([]))


def test_digit_ids_come_from_the_tokenizer():
    tok = build_processor().tokenizer
    ids = digit_token_ids(tok)
    assert ids == [tok.convert_tokens_to_ids(str(d)) for d in range(6)]
    assert [tok.decode([i]) for i in ids] == ["0", "1", "2", "3", "4", "5"]

    class Splitting:
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "3" else [ord(text)]

    with pytest.raises(ValueError, match="splits the digit '3'"):
        digit_token_ids(Splitting())


def test_prompt_template_inline_file_and_validation(tmp_path):
    assert load_template() == DEFAULT_TEMPLATE
    text = render(DEFAULT_TEMPLATE, " make it red ", "")
    assert "Instruction: make it red" in text and "Requirements: none beyond the instruction" in text
    f = tmp_path / "p.txt"
    f.write_text("Edit: {instruction} / {requirement} / 0-5?")
    assert render(load_template(template_file=str(f)), "a", "b") == "Edit: a / b / 0-5?"
    with pytest.raises(ValueError, match="not both"):
        load_template("x {instruction}", str(f))
    with pytest.raises(ValueError, match="unknown fields"):
        load_template("{instruction} {score}")
    with pytest.raises(ValueError, match="instruction"):
        load_template("rate it")
    with pytest.raises(FileNotFoundError):
        load_template(template_file=str(tmp_path / "missing.txt"))


def test_digit_tokens_pooled_or_plain_and_missing_digits_renormalize_or_fail():
    from editr1.rewards.scoring import score_top_logprobs

    # " 3" (0.2) beside "3" (0.3), "5" (0.1), a word (0.4): pooled digit mass 0.6, plain 0.4
    top = [("3", math.log(0.3)), (" 3", math.log(0.2)), ("5", math.log(0.1)), ("ok", math.log(0.4))]
    s, mass = score_top_logprobs(top)
    assert mass == pytest.approx(0.6) and s == pytest.approx((0.5 * 3 + 0.1 * 5) / 0.6 / 5)
    s, mass = score_top_logprobs(top, digit_tokens="plain")  # the reference reads only the six plain ids
    assert mass == pytest.approx(0.4) and s == pytest.approx((0.3 * 3 + 0.1 * 5) / 0.4 / 5)
    # fail: four of the six digits are missing → NaN, the mass is still reported
    s, mass = score_top_logprobs(top, missing_digits="fail")
    assert math.isnan(s) and mass == pytest.approx(0.6)
    full = [(str(d), math.log(p)) for d, p in enumerate([0.05, 0.05, 0.1, 0.2, 0.3, 0.2])]
    s_fail, m_fail = score_top_logprobs(full, missing_digits="fail")
    s_ren, m_ren = score_top_logprobs(full)
    expected = (0.05 + 0.2 + 0.6 + 1.2 + 1.0) / 0.9 / 5
    assert s_fail == pytest.approx(expected) and s_ren == pytest.approx(expected) and m_fail == pytest.approx(0.9)
    assert score_top_logprobs([("yes", -0.1)]) == (pytest.approx(float("nan"), nan_ok=True), 0.0)
    with pytest.raises(ValueError, match="digit_tokens"):
        score_top_logprobs(top, digit_tokens="spaces")
    with pytest.raises(ValueError, match="missing_digits"):
        score_top_logprobs(top, missing_digits="zero")


@pytest.mark.parametrize(
    "pair, why",
    [
        ((3, -0.1), "token"),  # an integer token (no .strip())
        ((None, -0.1), "token"),
        (("3", "-0.1"), "logprob"),  # a string, not a number
        (("3", None), "logprob"),
        (("3", True), "logprob"),  # JSON true is not a number here
        (("3", 1000.0), "log-probability"),  # math.exp would overflow
        (("3", 0.5), "log-probability"),  # a probability above 1
        (("3", float("nan")), "log-probability"),
        (("3", float("inf")), "log-probability"),
    ],
)
def test_malformed_token_logprob_pairs_raise_value_error_never_a_number(pair, why):
    from editr1.rewards.scoring import digit_probabilities, score_top_logprobs

    top = [("4", math.log(0.5)), pair]
    with pytest.raises(ValueError, match=why):
        digit_probabilities(top)
    with pytest.raises(ValueError, match=why):
        score_top_logprobs(top, digit_tokens="plain")


def test_valid_edge_logprobs_are_accepted():
    from editr1.rewards.scoring import score_top_logprobs

    # -inf is probability 0; 0 is probability 1; a float32 rounding error just above 0 counts as 0
    s, mass = score_top_logprobs([("5", 0.0), ("1", float("-inf")), ("word", -30.0)])
    assert s == pytest.approx(1.0) and mass == pytest.approx(1.0)
    s, mass = score_top_logprobs([("2", 1e-7)])
    assert s == pytest.approx(0.4) and mass == pytest.approx(1.0)
    s, mass = score_top_logprobs([("2", -1e300), ("3", -(2**70))])  # integers are numbers; exp underflows to 0
    assert math.isnan(s) and mass == 0.0


def test_returned_probabilities_above_one_in_total_are_malformed():
    from editr1.rewards.scoring import score_top_logprobs

    with pytest.raises(ValueError, match="sum"):
        score_top_logprobs([("4", math.log(0.7)), ("5", math.log(0.6))])
    with pytest.raises(ValueError, match="sum"):  # non-digit tokens count towards the total too
        score_top_logprobs([("4", math.log(0.7)), ("Sure", math.log(0.6))])
