"""Flow-GRPO's pure functions against hand computations: the SDE step's std (with the guard at σ = 1), mean,
sample and log-probability, the PPO-clipped objective, the KL term and its velocity-space form, the advantages
recovered from r, and which steps train."""

from __future__ import annotations

import math

import pytest
import torch

from editr1.algorithms.flow_grpo import (
    clipped_advantages,
    gaussian_log_prob,
    ppo_clipped,
    sde_kl,
    sde_mean,
    sde_std,
    sde_step,
    train_steps,
)
from editr1.algorithms.grouping import advantages, decide
from editr1.sampling import euler_step

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def test_std_is_a_sqrt_t_over_one_minus_t_with_the_reference_guard_at_one():
    sigma = torch.tensor([0.5, 0.8, 0.2, 1.0])
    std = sde_std(sigma, sigma_max=0.75, noise_level=0.7)
    # 0.7·sqrt(1), 0.7·sqrt(4), 0.7·sqrt(0.25); at σ = 1 the denominator is 1 − σ_max = 0.25: 0.7·sqrt(1/0.25)
    torch.testing.assert_close(std, torch.tensor([0.7, 1.4, 0.35, 1.4]))
    with pytest.raises(ValueError, match="sigma_max"):
        sde_std(sigma, sigma_max=1.0, noise_level=0.7)


def test_the_step_mean_by_hand_and_euler_without_noise():
    x, v = torch.ones(1, 3), torch.full((1, 3), 2.0)
    # σ 0.5 → 0.25, a 0.7: std 0.7, dt −0.25; x·(1 + 0.49/1·dt) + v·(1 + 0.49·0.5/1)·dt = 0.8775 − 0.6225
    mean = sde_mean(x, v, 0.5, 0.25, sde_std(torch.tensor(0.5), 0.9, 0.7))
    torch.testing.assert_close(mean, torch.full((1, 3), 0.255))
    torch.testing.assert_close(sde_mean(x, v, 0.5, 0.25, torch.tensor(0.0)), euler_step(x, v, 0.5, 0.25))


def test_a_sampled_step_and_its_log_probability_by_hand():
    x, v = torch.ones(2, 3), torch.full((2, 3), 2.0)
    noise = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -2.0]])
    out = sde_step(x, v, 0.5, 0.25, sigma_max=0.9, noise_level=0.7, noise=noise)
    scale = 0.7 * math.sqrt(0.25)  # std_t·sqrt(−dt) = 0.35
    torch.testing.assert_close(out.x_next, 0.255 + scale * noise)
    expected = torch.tensor([-0.5, -(0 + 2 + 2) / 3]) - math.log(scale) - LOG_SQRT_2PI  # −ε²/2 averaged
    torch.testing.assert_close(out.log_prob, expected)
    scored = sde_step(x, v, 0.5, 0.25, sigma_max=0.9, noise_level=0.7, x_next=out.x_next)
    torch.testing.assert_close(scored.log_prob, out.log_prob)
    torch.testing.assert_close(out.std_t.flatten(), torch.full((2,), 0.7))
    with pytest.raises(ValueError, match="exactly one"):
        sde_step(x, v, 0.5, 0.25, sigma_max=0.9, noise_level=0.7)
    with pytest.raises(ValueError, match="lower noise level"):
        sde_step(x, v, 0.25, 0.5, sigma_max=0.9, noise_level=0.7, noise=noise)


def test_gaussian_log_prob_is_torch_distributions_averaged_over_dimensions():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ref = torch.distributions.Normal(mean, std[:, None, None]).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref)


def test_the_gradient_of_the_log_probability_flows_through_the_velocity():
    v = torch.zeros(1, 2, requires_grad=True)
    x, x_next = torch.zeros(1, 2), torch.full((1, 2), -0.1)
    sde_step(x, v, 0.5, 0.25, sigma_max=0.9, noise_level=0.7, x_next=x_next).log_prob.sum().backward()
    # d/dv of −(x_next − c·v)²/(2s²) at v = 0, averaged over 2 dims: x_next·c/s² / 2 with c = −0.31125
    c, s2 = -0.31125, 0.35**2
    torch.testing.assert_close(v.grad, torch.full((1, 2), -0.1 * c / s2 / 2))


def test_the_clipped_objective_by_hand():
    log_prob = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.05])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    out = ppo_clipped(log_prob, torch.zeros(5), adv, clip_range=0.2)
    torch.testing.assert_close(out.ratio, torch.tensor([1.5, 1.5, 0.5, 0.5, 1.05]))
    # max(−Aρ, −A·clip(ρ, 0.8, 1.2)): −1.2 | 1.5 | −0.5 | 0.8 | −2.1
    torch.testing.assert_close(out.loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.1]))
    assert out.clipped.tolist() == [True, True, True, True, False]
    out.loss.sum().backward()
    # the clipped branch has no gradient; elsewhere d(−Aρ)/d log p = −Aρ
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 1.5, -0.5, 0.0, -2.1]))
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clipped(log_prob, torch.zeros(5), adv, clip_range=0.0)


def test_the_kl_is_the_reference_form_and_a_weighted_velocity_distance():
    x = torch.zeros(2, 4)
    v, v_ref = torch.ones(2, 4), torch.zeros(2, 4)
    a = sde_step(x, v, 0.5, 0.25, sigma_max=0.9, noise_level=0.7, noise=torch.zeros(2, 4))
    b = sde_step(x, v_ref, 0.5, 0.25, sigma_max=0.9, noise_level=0.7, x_next=a.x_next)
    kl = sde_kl(a.mean, b.mean, a.std_t)
    # ((1 + std²(1 − σ)/(2σ))·dt)² / (2·std²) · mean((v − v_ref)²) = 0.31125² / 0.98 · 1
    torch.testing.assert_close(kl, torch.full((2,), 0.31125**2 / 0.98))


def test_the_clipped_advantage_comes_back_from_r():
    rewards = torch.tensor([[0.1, 0.9, 0.5], [0.0, 0.05, 1.0]], dtype=torch.float64)
    r = decide(rewards, adv_clip=1.0).r
    expected = advantages(rewards).clamp(-1.0, 1.0)
    torch.testing.assert_close(clipped_advantages(r, 1.0), expected, rtol=0, atol=1e-12)
    assert (clipped_advantages(r, 1.0).abs() == 1.0).any()  # some advantage was clipped
    with pytest.raises(ValueError, match="adv_clip"):
        clipped_advantages(r, 0.0)


def test_which_steps_train():
    assert train_steps(10, 0.99) == list(range(9))  # the reference: int(10 · 0.99) = 9, the first ones
    assert train_steps(6, 0.99) == [0, 1, 2, 3, 4]
    assert train_steps(6, 1.0, (2, 5)) == [2, 3, 4] and train_steps(6, 0.99, (2, 5)) == [2, 3]
    assert train_steps(3, 0.1) == [0]
    for bad in [(6, 0.0, None), (6, 1.5, None), (6, 1.0, (4, 4)), (6, 1.0, (0, 7))]:
        with pytest.raises(ValueError):
            train_steps(*bad)
