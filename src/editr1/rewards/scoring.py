"""The implicit-feedback score: the expected 0–5 rating read from the judge's first answer token.

``score = Σ_d p(d)·d / 5`` over d = 0…5, with p the softmax of the first answer token's logits
restricted to the six digit tokens (their ids come from the tokenizer, never hard-coded). A server
that returns top-k log-probabilities gives the same value after renormalising over the digits present
(``missing_digits="renormalize"``), or none when a digit is missing (``"fail"``). The digits' share of
the returned probability (the *digit mass*) says how much the judge's answer was a digit at all.

Pairs from a server are untrusted: a token that is not a string, a log-probability that is not a
number, is NaN or is above 0 (a probability above 1), or returned probabilities that add up to more
than 1 raise ``ValueError`` — a malformed answer, never a score. Pure functions; no model here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

DIGITS = tuple(str(d) for d in range(6))
DigitTokens = Literal["pooled", "plain"]
MissingDigits = Literal["renormalize", "fail"]

# Float rounding may put the log-probability of a near-certain token a hair above 0: up to this much
# is read as log 1; more is not a log-probability. Likewise for the total of the returned probabilities.
LOGPROB_SLACK = 1e-5
MASS_SLACK = 1e-3


def digit_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens "0" … "5": each digit must encode to exactly one token."""
    ids = []
    for d in DIGITS:
        enc = tokenizer.encode(d, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"the judge's tokenizer splits the digit {d!r} into {len(enc)} tokens {enc}; "
                "the implicit score needs one token per digit"
            )
        ids.append(int(enc[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"digit tokens are not distinct: {ids}")
    return ids


def expected_score_from_logits(logits: torch.Tensor, digit_ids: list[int]) -> torch.Tensor:
    """``(N, V)`` next-token logits → ``(N,)`` expected digit / 5 in [0, 1] (float32).

    Non-finite digit logits (a broken forward pass) give NaN, never a number.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, vocab), got {tuple(logits.shape)}")
    sub = logits[:, digit_ids].float()
    p = torch.softmax(sub, dim=-1)
    values = torch.arange(len(digit_ids), dtype=torch.float32, device=logits.device)
    score = (p * values).sum(dim=-1) / (len(digit_ids) - 1)
    return torch.where(torch.isfinite(sub).all(dim=-1), score, torch.full_like(score, float("nan")))


ScoreMode = Literal["expected", "sampled", "greedy"]
SCORE_MODES: tuple[str, ...] = ("expected", "sampled", "greedy")


def digit_score_from_logits(
    logits: torch.Tensor, digit_ids: list[int], mode: ScoreMode = "expected", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(N, V)`` logits → ``(N,)`` score in [0, 1] by ``mode``: ``expected`` (Σ p(d)·d / 5, the implicit score),
    ``sampled`` (a digit drawn from p, as a judge that writes its answer at temperature 1; ``generator`` on
    the CPU seeds the draw) or ``greedy`` (the most likely digit, temperature 0). p is the softmax over the
    six digit tokens; non-finite digit logits give NaN in every mode."""
    if mode not in SCORE_MODES:
        raise ValueError(f"score mode must be expected, sampled or greedy, got {mode!r}")
    if mode == "expected":
        return expected_score_from_logits(logits, digit_ids)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, vocab), got {tuple(logits.shape)}")
    sub = logits[:, digit_ids].float().cpu()
    finite = torch.isfinite(sub).all(dim=-1)
    safe = torch.where(finite[:, None], sub, torch.zeros_like(sub))
    if mode == "greedy":
        digit = safe.argmax(dim=-1)
    else:
        digit = torch.multinomial(torch.softmax(safe, dim=-1), 1, generator=generator).squeeze(-1)
    score = digit.float() / (len(digit_ids) - 1)
    return torch.where(finite, score, torch.full_like(score, float("nan"))).to(logits.device)


def checked_pair(token, logprob) -> tuple[str, float]:
    """One ``(token, logprob)`` pair as ``(str, float <= 0)``; ``ValueError`` for anything else (a token
    that is not a string; a logprob that is not a real number, NaN, or above 0 beyond rounding).
    ``-inf`` is a valid log-probability (probability 0)."""
    if not isinstance(token, str):
        raise ValueError(f"malformed top_logprobs entry: token {token!r} is not a string")
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
        raise ValueError(f"malformed top_logprobs entry: logprob {logprob!r} of {token!r} is not a number")
    try:
        value = float(logprob)
    except OverflowError:  # an integer too large for a float
        value = math.inf if logprob > 0 else -math.inf
    if not value <= LOGPROB_SLACK:  # NaN, +inf, or a probability above 1
        raise ValueError(f"malformed top_logprobs entry: logprob {value} of {token!r} is not a log-probability")
    return token, min(value, 0.0)


def digit_probabilities(top: Iterable[tuple[str, float]], digit_tokens: DigitTokens = "pooled") -> list[float | None]:
    """Probability of each digit 0–5 among ``(token, logprob)`` pairs of the first answer token; ``None``
    where the digit is not among them.

    ``pooled``: tokens are matched after stripping whitespace ("3" and " 3" both count as 3; their
    probabilities add up). ``plain``: only the six tokens "0"…"5" themselves (the reference code reads
    just those six ids). Raises ``ValueError`` for a malformed pair (see :func:`checked_pair`) or when
    the pairs' probabilities add up to more than 1.
    """
    if digit_tokens not in ("pooled", "plain"):
        raise ValueError(f"digit_tokens must be 'pooled' or 'plain', got {digit_tokens!r}")
    mass: list[float | None] = [None] * len(DIGITS)
    total = 0.0
    for pair in top:
        token, logprob = checked_pair(*pair)
        p = math.exp(logprob)
        total += p
        t = token.strip() if digit_tokens == "pooled" else token
        if t in DIGITS:
            d = int(t)
            mass[d] = (mass[d] or 0.0) + p
    if total > 1.0 + MASS_SLACK:
        raise ValueError(f"malformed top_logprobs: the probabilities returned sum to {total:.4f}, above 1")
    return mass


def score_top_logprobs(
    top: Iterable[tuple[str, float]],
    digit_tokens: DigitTokens = "pooled",
    missing_digits: MissingDigits = "renormalize",
) -> tuple[float, float]:
    """``(score, digit mass)`` from the first answer token's ``(token, logprob)`` pairs.

    score = expected digit / 5 over the digits present, renormalised by their mass (``renormalize``);
    with ``fail``, NaN unless all six digits are present. NaN when no digit is present. The digit mass
    is the summed probability of the digits present (0 when none).
    """
    if missing_digits not in ("renormalize", "fail"):
        raise ValueError(f"missing_digits must be 'renormalize' or 'fail', got {missing_digits!r}")
    probs = digit_probabilities(top, digit_tokens)
    present = [(d, p) for d, p in enumerate(probs) if p is not None]
    total = sum(p for _, p in present)
    if not present or total <= 0 or (missing_digits == "fail" and len(present) < len(DIGITS)):
        return float("nan"), total
    return sum(d * p for d, p in present) / total / (len(DIGITS) - 1), total


def expected_score_from_top_logprobs(
    top: Iterable[tuple[str, float]],
    digit_tokens: DigitTokens = "pooled",
    missing_digits: MissingDigits = "renormalize",
) -> float:
    """Expected digit / 5 from ``(token, logprob)`` pairs (see :func:`score_top_logprobs`); NaN when
    no digit 0–5 is among them."""
    return score_top_logprobs(top, digit_tokens, missing_digits)[0]
