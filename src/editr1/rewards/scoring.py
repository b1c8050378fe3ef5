"""The implicit-feedback score: the expected 0–5 rating read from the judge's first answer token.

``score = Σ_d p(d)·d / 5`` over d = 0…5, with p the softmax of the first answer token's logits
restricted to the six digit tokens (their ids come from the tokenizer, never hard-coded). A server
that returns top-k log-probabilities gives the same value after renormalising over the digits present.
Pure functions; no model here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

DIGITS = tuple(str(d) for d in range(6))


def digit_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens "0" … "5": each digit must encode to exactly one token."""
    ids = []
    for d in DIGITS:
        enc = tokenizer.encode(d, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"the judge's tokenizer splits the digit {d!r} into {len(enc)} tokens {enc}; "
                             "the implicit score needs one token per digit")
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


def expected_score_from_top_logprobs(top: Iterable[tuple[str, float]]) -> float:
    """Expected digit / 5 from ``(token, logprob)`` pairs of the first answer token.

    Tokens are matched after stripping whitespace ("3" and " 3" both count as 3; their
    probabilities add up). Returns NaN when no digit 0–5 is among them.
    """
    mass = [0.0] * len(DIGITS)
    found = False
    for token, logprob in top:
        t = token.strip()
        if t in DIGITS and logprob is not None and math.isfinite(logprob):
            mass[int(t)] += math.exp(logprob)
            found = True
    total = sum(mass)
    if not found or total <= 0:
        return float("nan")
    return sum(d * m for d, m in enumerate(mass)) / total / (len(DIGITS) - 1)
