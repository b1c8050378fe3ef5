"""Hand-computed checks of the DiffusionNFT loss and the old-policy / EMA schedules (DESIGN §2)."""

from __future__ import annotations

import pytest
import torch

from editr1.algorithms.nft import add_noise, ema_decay, nft_loss, old_policy_eta

F64 = torch.float64


def t64(rows):
    return torch.tensor(rows, dtype=F64)


def close(actual, expected, atol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# Two samples of two elements each (B = 2, shape (2, 2)).
#   sample 0: x0 = [1, 0], x_t = [1, 2],  t = 0.5, v_θ = [2, 0], v_old = [0, 2], v_ref = [1, 0]
#   sample 1: x0 = [0, 0], x_t = [1, -1], t = 1.0, v_θ = [1, 1], v_old = [1, 0], v_ref = [0, 3]
#
# β = 1:  v⁺ = v_θ,  v⁻ = 2·v_old − v_θ
#   s0: v⁺ = [2, 0]   x0⁺ = [1 − 1, 2 − 0] = [0, 2]    d⁺ = [−1, 2]  w⁺ = 1.5  mean d⁺² = 2.5   L⁺ = 5/3
#       v⁻ = [−2, 4]  x0⁻ = [1 + 1, 2 − 2] = [2, 0]    d⁻ = [1, 0]   w⁻ = 0.5  mean d⁻² = 0.5   L⁻ = 1
#   s1: v⁺ = [1, 1]   x0⁺ = [0, −2]                    d⁺ = [0, −2]  w⁺ = 1    mean d⁺² = 2     L⁺ = 2
#       v⁻ = [1, −1]  x0⁻ = [0, 0]                     d⁻ = [0, 0]   w⁻ = 0 → floor 1e-5        L⁻ = 0
#
# β = 0.5:  v⁺ = 0.5·v_θ + 0.5·v_old,  v⁻ = 1.5·v_old − 0.5·v_θ
#   s0: v⁺ = [1, 1]    x0⁺ = [0.5, 1.5]  d⁺ = [−0.5, 1.5]  w⁺ = 1     mean d⁺² = 1.25   L⁺ = 1.25
#       v⁻ = [−1, 3]   x0⁻ = [1.5, 0.5]  d⁻ = [0.5, 0.5]   w⁻ = 0.5   mean d⁻² = 0.25   L⁻ = 0.5
#   s1: v⁺ = [1, 0.5]  x0⁺ = [0, −1.5]   d⁺ = [0, −1.5]    w⁺ = 0.75  mean d⁺² = 1.125  L⁺ = 1.5
#       v⁻ = [1, −0.5] x0⁻ = [0, −0.5]   d⁻ = [0, −0.5]    w⁻ = 0.25  mean d⁻² = 0.125  L⁻ = 0.5
#
# KL: v_θ − v_ref = [1, 0] → 0.5 ;  [1, −2] → 2.5          old deviation: [2, −2] → 4 ; [0, 1] → 0.5
X0 = [[1.0, 0.0], [0.0, 0.0]]
XT = [[1.0, 2.0], [1.0, -1.0]]
T = [0.5, 1.0]
V_THETA = [[2.0, 0.0], [1.0, 1.0]]
V_OLD = [[0.0, 2.0], [1.0, 0.0]]
V_REF = [[1.0, 0.0], [0.0, 3.0]]

L_PLUS = {1.0: [5 / 3, 2.0], 0.5: [1.25, 1.5]}
L_MINUS = {1.0: [1.0, 0.0], 0.5: [0.5, 0.5]}
KL = [0.5, 2.5]


def _inputs(dtype=F64):
    v_theta = torch.tensor(V_THETA, dtype=dtype, requires_grad=True)
    kw = dict(
        v_old=torch.tensor(V_OLD, dtype=dtype),
        x_t=torch.tensor(XT, dtype=dtype),
        x0=torch.tensor(X0, dtype=dtype),
        t=torch.tensor(T, dtype=dtype),
    )
    return v_theta, kw


def _policy(beta, r, c=5.0):
    lp, lm = L_PLUS[beta], L_MINUS[beta]
    return [c * (r[i] * lp[i] + (1 - r[i]) * lm[i]) / beta for i in range(2)]


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("r", [(0.3, 1.0), (0.0, 0.3), (1.0, 0.0), (0.3, 0.3)])
def test_nft_loss_hand_values_without_kl(beta, r):
    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=t64(r), beta=beta)
    policy = _policy(beta, r)
    close(out.policy, policy)
    close(out.loss, sum(policy) / 2)
    close(out.kl, [0.0, 0.0])  # no v_ref → zeros
    close(out.old_deviation, [4.0, 0.5])
    assert not out.old_deviation.requires_grad


def test_nft_loss_spot_values():
    # β = 1, r = (0.3, 1): policy = 5·(0.3·5/3 + 0.7·1) = 6 and 5·(1·2) = 10 → loss 8
    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=t64([0.3, 1.0]))
    close(out.policy, [6.0, 10.0])
    close(out.loss, 8.0)
    # β = 0.5, r = (0.3, 0): 5·(0.3·1.25 + 0.7·0.5)/0.5 = 7.25 and 5·0.5/0.5 = 5 → loss 6.125
    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=t64([0.3, 0.0]), beta=0.5)
    close(out.policy, [7.25, 5.0])
    close(out.loss, 6.125)
    # adv_clip c scales the policy term linearly: c = 2 → 2.4 and 4
    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=t64([0.3, 1.0]), adv_clip=2.0)
    close(out.policy, [2.4, 4.0])


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("kl_weight", [1e-4, 0.1])
def test_nft_loss_with_kl(beta, kl_weight):
    r = (0.3, 1.0)
    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=t64(r), beta=beta, v_ref=t64(V_REF), kl_weight=kl_weight)
    close(out.kl, KL)
    close(out.policy, _policy(beta, r))
    close(out.loss, sum(_policy(beta, r)) / 2 + kl_weight * (0.5 + 2.5) / 2)


def test_nft_loss_default_kl_weight_and_zero_kl_weight():
    r = t64([0.3, 1.0])
    v_theta, kw = _inputs()
    close(nft_loss(v_theta, **kw, r=r, v_ref=t64(V_REF)).loss, 8.0 + 1e-4 * 1.5)  # λ_KL = 1e-4 by default
    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=r, v_ref=t64(V_REF), kl_weight=0.0)
    close(out.loss, 8.0)
    close(out.kl, KL)  # still reported


def test_nft_loss_gradient_only_through_v_theta_with_detached_weights():
    # Analytic gradient with w± constants (B = 2, N = 2 elements, c = 5, β = 1, r = (0.3, 1)):
    #   dx0⁺/dv_θ = −t·β,  dx0⁻/dv_θ = +t·β
    #   g = c/(B·β) · [ r·(−2tβ)·d⁺/(N·w⁺) + (1 − r)·(2tβ)·d⁻/(N·w⁻) ] + λ·2·(v_θ − v_ref)/(B·N)
    #   s0 (t = 0.5): 2.5·[0.3·(−1)·[−1, 2]/3 + 0.7·1·[1, 0]/1] = 2.5·[0.8, −0.2] = [2.0, −0.5]
    #   s1 (t = 1):   2.5·[1·(−2)·[0, −2]/2 + 0]              = [0, 5]
    #   KL (λ = 0.1): 0.1·2·[[1, 0], [1, −2]]/4                = [[0.05, 0], [0.05, −0.1]]
    v_theta, kw = _inputs()
    v_old = kw["v_old"]
    out = nft_loss(v_theta, **kw, r=t64([0.3, 1.0]))
    out.loss.backward()
    close(v_theta.grad, [[2.0, -0.5], [0.0, 5.0]])
    assert v_old.grad is None

    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=t64([0.3, 1.0]), v_ref=t64(V_REF), kl_weight=0.1)
    out.loss.backward()
    close(v_theta.grad, [[2.05, -0.5], [0.05, 4.9]])


def test_nft_loss_gradient_beta_half():
    # β = 0.5, r = (0.3, 0), c = 5, B = N = 2:  c/(B·β) = 5
    #   s0 (t = 0.5): 5·[0.3·(−0.5)·[−0.5, 1.5]/(2·1) + 0.7·(0.5)·[0.5, 0.5]/(2·0.5)]
    #               = 5·[[0.0375, −0.1125] + [0.175, 0.175]] = 5·[0.2125, 0.0625] = [1.0625, 0.3125]
    #   s1 (t = 1):   5·[0 + 1·(1)·[0, −0.5]/(2·0.25)] = 5·[0, −1] = [0, −5]
    v_theta, kw = _inputs()
    nft_loss(v_theta, **kw, r=t64([0.3, 0.0]), beta=0.5).loss.backward()
    close(v_theta.grad, [[1.0625, 0.3125], [0.0, -5.0]])


def test_nft_identity_r1_beta1_is_x0_flow_matching():
    # r = 1, β = 1, no KL: v⁺ = v_θ and loss = c·mean_b[ mean((x_t − t·v_θ − x0)²) / sg(mean|x_t − t·v_θ − x0|) ]
    g = torch.Generator().manual_seed(0)
    b, shape = 3, (2, 4, 5)
    x0 = torch.randn(b, *shape, generator=g, dtype=F64)
    eps = torch.randn(b, *shape, generator=g, dtype=F64)
    t = torch.tensor([0.2, 0.55, 0.9], dtype=F64)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = torch.randn(b, *shape, generator=g, dtype=F64)
    v_theta = torch.randn(b, *shape, generator=g, dtype=F64, requires_grad=True)

    out = nft_loss(v_theta, v_old, x_t, x0, t, torch.ones(b, dtype=F64), beta=1.0)
    out.loss.backward()
    grad_nft = v_theta.grad.clone()

    v2 = v_theta.detach().clone().requires_grad_(True)
    diff = x_t - t.view(-1, 1, 1, 1) * v2 - x0
    w = diff.detach().abs().flatten(1).mean(1)
    ref = 5.0 * ((diff**2).flatten(1).mean(1) / w).mean()
    ref.backward()
    close(out.loss, ref.detach())
    close(grad_nft, v2.grad)
    # v_old does not matter in this case
    v3 = v_theta.detach().clone().requires_grad_(True)
    out3 = nft_loss(v3, v_old * 7 - 3, x_t, x0, t, torch.ones(b, dtype=F64), beta=1.0)
    close(out3.loss, ref.detach())


def test_nft_loss_weight_floor():
    # x_t = [1e-6, 0], x0 = 0, t = 1, v_θ = v_old = 0 → d± = [1e-6, 0], mean|d| = 5e-7 → floored to 1e-5
    # L± = mean(d²)/1e-5 = 5e-13/1e-5 = 5e-8 → policy = 5·5e-8 = 2.5e-7 (unfloored it would be 5e-6)
    zeros = torch.zeros(1, 2, dtype=F64)
    out = nft_loss(zeros.clone().requires_grad_(True), zeros, t64([[1e-6, 0.0]]), zeros, t64([1.0]), t64([1.0]))
    close(out.policy, [2.5e-7], atol=1e-20)
    # d = 0 exactly: w = 0 floored → L = 0, no NaN
    v = zeros.clone().requires_grad_(True)
    out = nft_loss(v, zeros, zeros, zeros, t64([0.5]), t64([0.3]))
    close(out.loss, 0.0)
    out.loss.backward()
    assert torch.isfinite(v.grad).all()


def test_nft_loss_float32_inputs():
    v_theta, kw = _inputs(torch.float32)
    out = nft_loss(v_theta, **kw, r=torch.tensor([0.3, 1.0]))
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.policy, torch.tensor([6.0, 10.0]))
    out.loss.backward()
    torch.testing.assert_close(v_theta.grad, torch.tensor([[2.0, -0.5], [0.0, 5.0]]))


def test_nft_loss_weights():
    # weights (1, 0): loss = policy of sample 0 only = 6 (β = 1, r = (0.3, 1))
    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=t64([0.3, 1.0]), weights=t64([1.0, 0.0]))
    close(out.loss, 6.0)
    out.loss.backward()
    # grad of sample 0 = 2·(the B = 2 mean gradient) since it is now a mean over one sample
    close(v_theta.grad, [[4.0, -1.0], [0.0, 0.0]])

    # changing the switched-off sample changes nothing
    v_theta, kw = _inputs()
    kw["x_t"] = t64([[1.0, 2.0], [50.0, -9.0]])
    kw["v_old"] = t64([[0.0, 2.0], [-4.0, 3.0]])
    out2 = nft_loss(v_theta, **kw, r=t64([0.3, 0.0]), weights=t64([1.0, 0.0]), v_ref=t64([[2.0, 0.0], [9.0, 9.0]]))
    # KL of sample 0 with v_ref [2, 0]: v_θ − v_ref = [0, 0] → 0
    close(out2.loss, 6.0)

    # all-zero weights: loss 0, no NaN, zero gradient
    v_theta, kw = _inputs()
    out = nft_loss(v_theta, **kw, r=t64([0.3, 1.0]), weights=t64([0.0, 0.0]), v_ref=t64(V_REF))
    close(out.loss, 0.0)
    out.loss.backward()
    close(v_theta.grad, torch.zeros(2, 2))


def test_nft_loss_errors():
    v_theta, kw = _inputs()
    with pytest.raises(ValueError):
        nft_loss(v_theta, **kw, r=t64([0.5, 0.5]), beta=0.0)
    with pytest.raises(ValueError):
        nft_loss(v_theta, **kw, r=t64([0.5, 0.5]), beta=-1.0)
    with pytest.raises(ValueError):
        nft_loss(v_theta, **{**kw, "v_old": kw["v_old"].clone().requires_grad_(True)}, r=t64([0.5, 0.5]))
    with pytest.raises(ValueError):
        nft_loss(v_theta, **kw, r=t64([0.5, 0.5]), v_ref=t64(V_REF).requires_grad_(True))
    with pytest.raises(ValueError):
        nft_loss(v_theta, **{**kw, "t": t64([0.5, 0.5, 0.5])}, r=t64([0.5, 0.5]))


# ---------------------------------------------------------------------------------------------- add_noise


def test_add_noise():
    x0 = t64([[1.0, 2.0], [4.0, -2.0]])
    noise = t64([[3.0, -1.0], [0.0, 2.0]])
    t = t64([0.25, 1.0])
    # 0.75·[1, 2] + 0.25·[3, −1] = [1.5, 1.25];   t = 1 → pure noise
    x_t = add_noise(x0, noise, t)
    close(x_t, [[1.5, 1.25], [0.0, 2.0]])
    # x0 = x_t − t·v with v = ε − x0
    close(x_t - t[:, None] * (noise - x0), x0)
    close(add_noise(x0, noise, t64([0.0, 0.0])), x0)
    with pytest.raises(ValueError):
        add_noise(x0, noise, t64([0.5]))
    with pytest.raises(ValueError):
        add_noise(x0, noise, t64([[0.5], [0.5]]))


def test_add_noise_higher_rank():
    x0 = torch.ones(2, 3, 4, dtype=F64)
    noise = torch.full((2, 3, 4), 5.0, dtype=F64)
    x_t = add_noise(x0, noise, t64([0.5, 0.1]))
    close(x_t[0], torch.full((3, 4), 3.0, dtype=F64))  # 0.5·1 + 0.5·5
    close(x_t[1], torch.full((3, 4), 1.4, dtype=F64))  # 0.9·1 + 0.1·5


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("step, eta", [(0, 0.0), (1, 0.001), (250, 0.25), (500, 0.5), (501, 0.5), (10000, 0.5)])
def test_old_policy_eta_paper(step, eta):
    # η = min(0.001·step, 0.5)
    assert old_policy_eta(step) == pytest.approx(eta, abs=1e-12)


@pytest.mark.parametrize(
    "step, eta",
    [
        (0, 0.0),
        (74, 0.0),  # before the delay
        (75, 0.0),  # 0.0075·0
        (76, 0.0075),  # 0.0075·1
        (208, 0.9975),  # 0.0075·133
        (300, 0.999),  # 0.0075·225 = 1.6875 → cap
    ],
)
def test_old_policy_eta_delayed(step, eta):
    assert old_policy_eta(step, rate=0.0075, cap=0.999, delay=75) == pytest.approx(eta, abs=1e-12)


def test_old_policy_eta_errors():
    with pytest.raises(ValueError):
        old_policy_eta(-1)
    with pytest.raises(ValueError):
        old_policy_eta(10, cap=1.5)


@pytest.mark.parametrize(
    "step, decay",
    [(0, 0.1), (1, 2 / 11), (10, 11 / 20), (71, 0.8888888888888888), (80, 0.9), (81, 0.9), (100000, 0.9)],
)
def test_ema_decay(step, decay):
    # min((1 + s)/(10 + s), 0.9); (1 + s)/(10 + s) reaches 0.9 at s = 80
    assert ema_decay(step) == pytest.approx(decay, abs=1e-12)


def test_ema_decay_cap():
    assert ema_decay(500, cap=0.99) == pytest.approx(501 / 510)  # 0.98235 < 0.99
    assert ema_decay(10000, cap=0.99) == pytest.approx(0.99)


def test_switched_off_sample_with_nan_r_does_not_poison_the_loss():
    torch.manual_seed(0)
    v_theta = torch.randn(2, 3, requires_grad=True)
    v_old, x_t, x0 = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor([0.5, 0.7])
    r = torch.tensor([0.3, float("nan")])
    out = nft_loss(v_theta, v_old, x_t, x0, t, r, weights=torch.tensor([1.0, 0.0]))
    ref = nft_loss(v_theta[:1], v_old[:1], x_t[:1], x0[:1], t[:1], r[:1])
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert torch.isfinite(v_theta.grad).all() and torch.equal(v_theta.grad[1], torch.zeros(3))


# ---------------------------------------------------------------------------------------------- loss normalisation


def test_reference_sample_weights_by_hand():
    """6 samples, micro-batch 2, shuffled order [4, 1, 0, 5, 3, 2] → micro-batches {4, 1}, {0, 5}, {3, 2}.
    Kept: 0, 1, 2, 3 (4 and 5 filtered). Micro-batch 1 holds one kept sample (1), 2 holds one (0), 3 holds two.
    Weights 1 / (kept in its micro-batch × 3 micro-batches): sample 1 → 1/3, 0 → 1/3, 2 and 3 → 1/6."""
    from editr1.algorithms.nft import reference_sample_weights

    mask = torch.tensor([True, True, True, True, False, False])
    order = torch.tensor([4, 1, 0, 5, 3, 2])
    w = reference_sample_weights(mask, order, micro_batch_size=2)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor([1 / 3, 1 / 3, 1 / 6, 1 / 6, 0.0, 0.0], dtype=torch.float64))
    # two processes: DDP averages → every weight halves
    torch.testing.assert_close(reference_sample_weights(mask, order, 2, world=2), w / 2)
    # the more is filtered, the smaller the step: total weight = non-empty micro-batches / micro-batches
    assert float(w.sum()) == pytest.approx(1.0)
    only_one = torch.tensor([False, False, True, False, False, False])
    assert float(reference_sample_weights(only_one, order, 2).sum()) == pytest.approx(1 / 3)
    # a ragged last micro-batch (5 samples, micro-batch 2 → 3 micro-batches, the last holds sample 4 alone)
    w5 = reference_sample_weights(torch.ones(5, dtype=torch.bool), torch.arange(5), 2)
    torch.testing.assert_close(w5, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 3], dtype=torch.float64))
    # nothing kept: all zero (the reference still steps, on a zero gradient)
    assert not reference_sample_weights(torch.zeros(6, dtype=torch.bool), order, 2).any()
    with pytest.raises(ValueError, match="permutation"):
        reference_sample_weights(mask, torch.tensor([0, 0, 1, 2, 3, 4]), 2)
