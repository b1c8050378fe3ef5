"""Rollout solvers for flow-matching editors: Euler and DPM-Solver++(2M), over any velocity model.

The σ schedule comes from the policy (which asks diffusers' scheduler for it, so it matches the
base model's own pipeline). Steps are written here as small functions over that schedule and are
tested against diffusers' ``FlowMatchEulerDiscreteScheduler`` and ``DPMSolverMultistepScheduler`` on
the same σ's. Convention: ``x_σ = (1 − σ)·x0 + σ·ε``, the model returns ``v ≈ ε − x0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from editr1.algorithms.flow_grpo import sde_step

Solver = Literal["euler", "dpmpp_2m"]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE from σ to σ_next."""
    return x + (sigma_next - sigma) * v


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log-SNR λ = log α − log σ with α = 1 − σ (float64; ±inf at the ends)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def dpmpp_first_order(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """DPM-Solver++ first-order update in data (x0) space."""
    s, s_next = torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64)
    h = _lambda(s_next) - _lambda(s)
    alpha_next = 1 - s_next
    c_x = float(s_next / s)
    c_0 = float(-alpha_next * (torch.exp(-h) - 1.0))
    return c_x * x + c_0 * x0


def dpmpp_second_order(
    x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor, sigma_prev: float, sigma: float, sigma_next: float
) -> torch.Tensor:
    """DPM-Solver++(2M) multistep update (midpoint form) in data space."""
    s_prev, s, s_next = (torch.tensor(v, dtype=torch.float64) for v in (sigma_prev, sigma, sigma_next))
    lam_prev, lam, lam_next = _lambda(s_prev), _lambda(s), _lambda(s_next)
    h, h_0 = lam_next - lam, lam - lam_prev
    inv_r0 = float(h / h_0)  # 1/r0; 0 when the previous σ was 1 (λ = −inf)
    alpha_next = 1 - s_next
    c_x = float(s_next / s)
    c_0 = float(-alpha_next * (torch.exp(-h) - 1.0))
    d1 = inv_r0 * (x0 - x0_prev)
    return c_x * x + c_0 * x0 + 0.5 * c_0 * d1


def dpmpp_order(step: int, num_steps: int, first_order_second_to_last: bool = False) -> int:
    """Order of DPM-Solver++(2M) at ``step`` (0-based) of ``num_steps``.

    First order on the first and the last step only, second order on every step between (the
    second-to-last included): the released Edit-R1/DiffusionNFT solver and diffusers'
    ``DPMSolverMultistepScheduler`` (solver_order 2) — 6 steps give [1, 2, 2, 2, 2, 1].
    ``first_order_second_to_last`` also makes the second-to-last step first order when there are
    fewer than 15 steps ([1, 2, 2, 2, 1, 1]): editr1's earlier default, kept so that results measured
    with it (docs/results.md) can be reproduced.
    """
    if step == 0 or step == num_steps - 1:
        return 1
    if first_order_second_to_last and step == num_steps - 2 and num_steps < 15:
        return 1
    return 2


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    solver: Solver = "dpmpp_2m",
    first_order_second_to_last: bool = False,
) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` at ``sigmas[0]`` to ``sigmas[-1]`` (normally 0).

    ``velocity(x, t)`` gets a ``(B,)`` tensor of σ's. Deterministic: the result depends only on
    ``noise``, the schedule and the model. Returns the final latents in float32.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-d schedule with at least 2 entries (including the final one)")
    if solver not in ("euler", "dpmpp_2m"):
        raise ValueError(f"solver must be 'euler' or 'dpmpp_2m', got {solver!r}")
    sig = [float(s) for s in sigmas]
    num_steps = len(sig) - 1
    x = noise.to(torch.float32)
    x0_prev = None
    for i in range(num_steps):
        t = torch.full((x.shape[0],), sig[i], device=x.device, dtype=torch.float32)
        v = velocity(x, t).to(torch.float32)
        if solver == "euler":
            x = euler_step(x, v, sig[i], sig[i + 1])
            continue
        x0 = x - sig[i] * v
        if x0_prev is None or dpmpp_order(i, num_steps, first_order_second_to_last) == 1:
            x = dpmpp_first_order(x, x0, sig[i], sig[i + 1])
        else:
            x = dpmpp_second_order(x, x0, x0_prev, sig[i - 1], sig[i], sig[i + 1])
        x0_prev = x0
    return x


@dataclass(frozen=True)
class SDESampling:
    """Rollouts by Flow-GRPO's SDE sampler (:func:`editr1.algorithms.flow_grpo.sde_step`): noise level ``a`` on
    the steps ``window = (start, stop)`` (``None``: every step), Euler ODE steps elsewhere (Flow-GRPO-Fast)."""

    noise_level: float = 0.7
    window: tuple[int, int] | None = None


@dataclass
class Trajectory:
    """An SDE rollout: the final latents, every latent ``(B, steps + 1, …)`` (``latents[:, 0]`` the noise) and
    the log-probability ``(B, steps)`` of each step's transition under the sampling policy (NaN on ODE steps)."""

    x0: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor


@torch.no_grad()
def sample_sde(
    velocity: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    sde: SDESampling,
    step_noise: Callable[[int], torch.Tensor],
) -> Trajectory:
    """Integrate from ``noise`` with the SDE on ``sde.window`` and Euler elsewhere, recording the trajectory.

    ``step_noise(i)`` gives the standard normal noise of step ``i`` for the whole batch (per-sample streams,
    so the rollout does not depend on chunking). Float32 throughout."""
    if sigmas.ndim != 1 or sigmas.numel() < 3:
        raise ValueError("an SDE rollout needs a 1-d schedule with at least 2 steps (3 entries with the final one)")
    sig = [float(s) for s in sigmas]
    num_steps = len(sig) - 1
    start, stop = sde.window if sde.window is not None else (0, num_steps)
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"sde window must satisfy 0 <= start < stop <= {num_steps}, got {sde.window}")
    x = noise.to(torch.float32)
    latents, log_probs = [x], []
    for i in range(num_steps):
        t = torch.full((x.shape[0],), sig[i], device=x.device, dtype=torch.float32)
        v = velocity(x, t).to(torch.float32)
        if start <= i < stop:
            out = sde_step(x, v, sig[i], sig[i + 1], sigma_max=sig[1], noise_level=sde.noise_level, noise=step_noise(i))
            x, lp = out.x_next, out.log_prob
        else:
            x, lp = euler_step(x, v, sig[i], sig[i + 1]), torch.full((x.shape[0],), float("nan"), device=x.device)
        latents.append(x)
        log_probs.append(lp)
    return Trajectory(x, torch.stack(latents, dim=1), torch.stack(log_probs, dim=1))
