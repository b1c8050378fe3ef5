"""Peak memory of the policy's real work, simulated on the meta device: nothing is allocated or computed.

The policy is built on the meta device (``torch.device("meta")``: real classes at real sizes, shapes only) and its
own code runs there — ``velocity`` forwards, the NFT loss, backward through the LoRA adapters with or without
activation checkpointing, the VAE decode. A ``TorchDispatchMode`` sees every tensor each operation creates and
counts the bytes of the distinct storages alive at each moment; tensors autograd keeps for backward are kept
alive through ``saved_tensors_hooks``, so they count until backward frees them. Parameters and tensors that
existed before (inputs, buffers) are never counted: the figures are what the work adds.

On the meta device ``scaled_dot_product_attention`` always decomposes into its math form (which materialises the
attention matrix); the simulation replaces it by the shapes of a fused kernel — output like the query, one float32
log-sum-exp per query row saved for backward — which is what flash / memory-efficient attention on a GPU and the
CPU's flash kernel do. ``tests/test_planning_trace.py`` compares the simulated peaks with peaks measured on the CPU.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# How far the simulated peaks may be from measured ones (tests/test_planning_trace.py checks it on the CPU).
TOLERANCE = 0.10


class _FusedAttention(torch.autograd.Function):
    """Shapes of fused attention: the output like the query (value's width); saves q, k, v, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Inside the block, ``F.scaled_dot_product_attention`` on meta tensors has a fused kernel's memory."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        if query.device.type != "meta":
            return original(query, key, value, *args, **kwargs)
        return _FusedAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


class LiveBytes(TorchDispatchMode):
    """Inside the mode: the bytes of the distinct storages that tensors created inside hold, as they live and die
    (a storage is freed with the last tensor that views it); ``peak`` is the most at any moment."""

    def __init__(self) -> None:
        super().__init__()
        self.views: dict[int, int] = {}  # storage -> live tensors on it
        self.known: set[int] = set()  # storages that existed before (inputs, parameters, buffers)
        self.live = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        key, size = _storage(t)
        if key in self.known:
            return
        if key not in self.views:
            self.views[key] = 0
            self.live += size
            self.peak = max(self.peak, self.live)
        self.views[key] += 1
        weakref.finalize(t, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self.views[key] -= 1
        if not self.views[key]:
            del self.views[key]
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor) and _storage(x)[0] not in self.views:
                self.known.add(_storage(x)[0])
        out = func(*args, **kwargs)
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self._track(x)
        return out


class _Kept:
    """What autograd keeps of a saved tensor: this box holds the tensor itself, so it lives until backward."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def peak_bytes(fn: Callable[[], object]) -> int:
    """The peak of the bytes that ``fn`` holds in the tensors it creates (meta tensors are fine), tensors saved
    for backward included until backward releases them."""
    mode = LiveBytes()
    with (
        fused_attention_on_meta(),
        torch.autograd.graph.saved_tensors_hooks(_Kept, lambda kept: kept.tensor),
        mode,
    ):
        fn()
    return mode.peak


def _inputs(policy, batch: int, text_tokens: int | None, device) -> tuple:
    cond = policy.example_condition(batch, text_tokens, device=device)
    x = torch.zeros(batch, *policy.latent_shape(), device=device)
    t = torch.full((batch,), 0.5, device=device)
    return x, t, cond


def training_peak_bytes(policy, batch: int, text_tokens: int | None = None, kl: bool = True, device="meta") -> int:
    """Peak memory of one NFT micro-batch of ``batch`` samples at one timestep, beyond the model and the LoRA
    state: θ_old's and (with ``kl``) the reference's velocities without gradient, θ's with it, a loss of the NFT
    loss's form and its backward. ``policy`` carries its adapters and its checkpointing switch."""
    from editr1.policies import lora

    x0, t, cond = _inputs(policy, batch, text_tokens, device)
    tt = t.view(-1, 1, 1)

    def step() -> None:
        x_t = x0 + 0.0
        with torch.no_grad():
            with policy.adapter(lora.OLD):
                v_old = policy.velocity(x_t, t, cond)
            v_ref = None
            if kl:
                with policy.adapter(None):
                    v_ref = policy.velocity(x_t, t, cond)
        v = policy.velocity(x_t, t, cond)
        # the NFT loss's tensors are the size of a few latents: its two branches stand in for them (nft_loss
        # itself reads values: NaN checks and the like, which meta tensors do not have)
        positive = (x_t - tt * v - x0).square() / (x_t - tt * v.detach() - x0).abs().mean()
        negative = (x_t - tt * (2 * v_old - v) - x0).square()
        loss = (positive + negative).mean()
        if v_ref is not None:
            loss = loss + 1e-4 * (v - v_ref).square().mean()
        loss.backward()

    return peak_bytes(step)


def rollout_peak_bytes(policy, batch: int, text_tokens: int | None = None, device="meta") -> int:
    """Peak working memory of one rollout chunk of ``batch`` samples: a velocity forward without gradient, then
    the VAE decode of the chunk (whichever is larger; they run one after the other)."""
    x, t, cond = _inputs(policy, batch, text_tokens, device)
    with torch.no_grad():
        forward = peak_bytes(lambda: policy.velocity(x, t, cond))
        decode = peak_bytes(lambda: policy.decode(x))
    return max(forward, decode)
