"""AWM's pure functions against hand computations: the weighted flow-matching log-likelihood, the on-policy
gradient (the advantage-weighted flow-matching gradient), an off-policy ratio and its clip, the KL."""

from __future__ import annotations

import pytest
import torch

from editr1.algorithms.awm import awm_loss, matching_log_prob


def _batch():
    v = torch.ones(4, 2, 3)
    noise = torch.full((4, 2, 3), 0.5)
    x0 = torch.zeros(4, 2, 3)
    t = torch.full((4,), 0.5)
    return v, noise, x0, t


def test_the_weighted_log_likelihood_by_hand():
    v, noise, x0, t = _batch()  # ℓ = (1 − 0.5)² = 0.25 everywhere
    got = {w: float(matching_log_prob(v, noise, x0, t, w)[0]) for w in ("uniform", "t", "t2", "ghuber")}
    assert got["uniform"] == pytest.approx(-0.25)
    assert got["t"] == pytest.approx(-0.125)
    assert got["t2"] == pytest.approx(-0.0625)
    # t·((ℓ + 1e-10)^p − 1e-10^p)/p with p = 0.25: 0.5·(0.25^0.25 − 1e-10^0.25)/0.25
    assert got["ghuber"] == pytest.approx(-(0.25**0.25 - 1e-10**0.25) * 0.5 / 0.25, rel=1e-9)
    assert matching_log_prob(v, noise, x0, t).dtype == torch.float64
    with pytest.raises(ValueError, match="weighting"):
        matching_log_prob(v, noise, x0, t, "huber")


def test_on_policy_the_ratio_is_one_and_the_gradient_is_advantage_weighted_matching():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 2, 3, generator=g).requires_grad_()
    noise, x0 = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    t, adv = torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.tensor([1.0, -0.5, 0.25, 0.0])
    out = awm_loss(v, noise, x0, t, adv, weighting="t")
    assert torch.equal(out.ratio, torch.ones(4, dtype=torch.float64)) and not out.clipped.any()
    out.policy.sum().backward()
    v2 = v.detach().clone().requires_grad_()
    fm = ((v2 - (noise - x0)) ** 2).flatten(1).mean(1)  # the pretraining loss ...
    (adv * t * fm).sum().backward()  # ... weighted by the advantage (and w = t)
    torch.testing.assert_close(v.grad, v2.grad)
    torch.testing.assert_close(out.kl, torch.zeros(4))


def test_off_policy_ratio_and_clip_by_hand():
    v, noise, x0, t = _batch()
    old = torch.full((4,), -0.25) - torch.log(torch.tensor([1.0, 2.0, 1.25, 0.25])).double()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = awm_loss(v, noise, x0, t, adv, old_log_prob=old, clip_range=0.5, weighting="uniform")
    torch.testing.assert_close(out.ratio, torch.tensor([1.0, 2.0, 1.25, 0.25], dtype=torch.float64))
    # max(−Aρ, −A·clip(ρ, 0.5, 1.5)): −1 | −1.5 | 1.25 | 0.5
    torch.testing.assert_close(out.policy, torch.tensor([-1.0, -1.5, 1.25, 0.5], dtype=torch.float64))
    assert out.clipped.tolist() == [False, True, False, True]


def test_the_kl_is_the_mean_squared_velocity_difference():
    v, noise, x0, t = _batch()
    out = awm_loss(v, noise, x0, t, torch.zeros(4), v_ref=torch.full((4, 2, 3), 0.5))
    torch.testing.assert_close(out.kl, torch.full((4,), 0.25))
