"""Editing with a policy: encode once per prompt, sample K edits per prompt in chunks, decode.

Shared by rollouts (training), evaluation and prediction. Sample i starts from noise drawn with
``seeds[i]``, so results do not depend on chunk sizes or on which process runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from editr1.policies.base import Condition, EditPolicy
from editr1.sampling import SDESampling, Solver, sample, sample_sde
from editr1.seeding import derive_seed, per_sample_randn


@dataclass
class Edits:
    x0: torch.Tensor  # (G·K, *latent_shape) final clean latents
    images: torch.Tensor  # (G·K, 3, H, W) in [0, 1]
    cond: Condition  # one row per prompt
    sigmas: torch.Tensor  # the schedule used, ending with 0
    latents: torch.Tensor | None = None  # SDE rollouts: (G·K, steps + 1, *latent_shape) every latent
    log_probs: torch.Tensor | None = None  # SDE rollouts: (G·K, steps) each transition's log-probability


def encode_padded(
    policy: EditPolicy,
    sources: torch.Tensor,
    prompts: list[str],
    min_prompts: int = 0,
    references: Sequence[Sequence | torch.Tensor | None] | None = None,
) -> Condition:
    """``policy.encode`` of at least ``min_prompts`` prompts: the first prompt (or, with none, a blank picture
    and an empty instruction) repeated to fill up. Under FSDP2 the text encoders are sharded too, and a policy
    that encodes prompt by prompt (Qwen-Image-Edit) makes one encoder call per prompt: every process must make
    as many as the others, whatever its number of prompts. The caller keeps the first ``len(prompts)`` rows.

    ``references[i]``: row i's reference images (pictures 2, 3, …; PIL images or tensors in [0, 1], resized
    by the policy), encoded with :meth:`EditPolicy.encode_rows` (a single-image policy refuses them)."""
    n = len(prompts)
    refs = None
    if references is not None and any(r is not None and len(r) for r in references):
        refs = [policy.preprocess(list(r)) if r is not None and len(r) else None for r in references]
    extra = max(0, min_prompts - n)
    if extra == 0:
        return policy.encode_rows(sources, refs, prompts) if refs else policy.encode(sources, prompts)
    if n:
        pad = sources[:1].expand(extra, *sources.shape[1:])
        fill = [prompts[0]] * extra
    else:
        pad = torch.zeros((extra, 3, policy.height, policy.width), device=policy.device)
        fill = [""] * extra
    images = torch.cat([sources.to(pad.device), pad]) if n else pad
    if refs:
        return policy.encode_rows(images, refs + [refs[0]] * extra, list(prompts) + fill)
    return policy.encode(images, list(prompts) + fill)


@torch.no_grad()
def edit_images(
    policy: EditPolicy,
    sources: torch.Tensor,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    solver: Solver,
    batch_size: int,
    group_size: int = 1,
    first_order_second_to_last: bool = False,
    on_chunk: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    min_prompts: int = 0,
    references: Sequence[Sequence | torch.Tensor | None] | None = None,
    sde: SDESampling | None = None,
) -> Edits:
    """``group_size`` edits of each prompt with whatever adapter is active on ``policy``.

    ``on_chunk(sample_index, images)`` is called as soon as each chunk is decoded (``sample_index``:
    flat indices into G·K) — the reward can start on it while the next chunk is generated.
    ``min_prompts`` (sharded models: the most prompts any process has): make the calls that many prompts
    would make — encode at least that many (see :func:`encode_padded`) and run idle denoising passes
    (results discarded) up to that many chunks — so every process makes the same sharded forward calls.
    With no prompts of its own, a process makes only those calls and the result is empty.
    ``references[i]``: prompt i's reference images (pictures 2, 3, …), see :func:`encode_padded`.
    ``sde``: sample with Flow-GRPO's SDE (``solver`` unused) and keep every latent and each step's
    log-probability; step i of sample j draws its noise from ``derive_seed(seeds[j], i)``.
    """
    n = len(prompts) * group_size
    if n == 0 and min_prompts == 0:
        raise ValueError("nothing to edit: no prompts")
    if len(seeds) != n:
        raise ValueError(f"need {n} seeds (one per edit), got {len(seeds)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    min_chunks = -(-min_prompts * group_size // batch_size)
    padded = encode_padded(policy, sources, prompts, min_prompts, references)
    cond = padded.select(torch.arange(len(prompts))) if min_prompts > len(prompts) else padded
    sigmas = policy.sigmas(steps)
    group_index = torch.arange(len(prompts)).repeat_interleave(group_size)
    shape = policy.latent_shape()

    def denoise(c: Condition, noise: torch.Tensor, chunk_seeds: list[int]):
        fn = lambda x, t: policy.velocity(x, t, c)
        if sde is None:
            return sample(fn, noise, sigmas, solver, first_order_second_to_last)
        step = lambda i: per_sample_randn(shape, [derive_seed(s, i) for s in chunk_seeds], policy.device)
        return sample_sde(fn, noise, sigmas, sde, step)

    x0_chunks, image_chunks, trajectories = [], [], []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        c = cond.select(group_index[idx])
        noise = per_sample_randn(shape, seeds[s : s + batch_size], device=policy.device)
        x0 = denoise(c, noise, seeds[s : s + batch_size])
        if sde is not None:
            trajectories.append(x0)
            x0 = x0.x0
        images = policy.decode(x0)
        x0_chunks.append(x0)
        image_chunks.append(images)
        if on_chunk is not None:
            on_chunk(idx, images)
    for _ in range(len(x0_chunks), min_chunks):  # idle passes, one sample each
        c = padded.select([0])
        denoise(c, torch.zeros((1, *shape), device=policy.device), [0])
    if not x0_chunks:  # nothing of our own to edit: the idle calls above were all
        x0 = torch.zeros((0, *shape), device=policy.device)
        return Edits(x0, torch.zeros((0, 3, policy.height, policy.width)), cond, sigmas)
    latents = torch.cat([tr.latents for tr in trajectories]) if trajectories else None
    log_probs = torch.cat([tr.log_probs for tr in trajectories]) if trajectories else None
    return Edits(torch.cat(x0_chunks), torch.cat(image_chunks), cond, sigmas, latents, log_probs)
