"""The interface every base editing model implements, and what they share.

A policy owns the frozen components of one base model (text/vision encoders, VAE, transformer) and
exposes four operations in its own packed latent space:

* ``encode(images, prompts)`` → :class:`Condition`: instruction + source image, computed once per
  prompt and indexed for every sample of its group and every training timestep;
* ``velocity(x_t, t, cond)`` → the flow-matching velocity ``v ≈ ε − x0``;
* ``encode_images(images)`` → clean latents (supervised targets, round-trip checks);
* ``decode(latents)`` → images in [0, 1].

LoRA adapters live on ``self.transformer`` (see :mod:`editr1.policies.lora`).
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from editr1.asset_paths import resolve_asset
from editr1.images import to_tensor_images
from editr1.policies import lora


@dataclass
class Condition:
    """Encoded instruction + source image for a batch of prompts.

    ``tensors`` are batch-first (one row per prompt); ``shared`` are the same for every row
    (position ids and the like).
    """

    tensors: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.tensors:
            return self.tensors[key]
        return self.shared[key]

    def select(self, index: torch.Tensor | Sequence[int]) -> Condition:
        """Rows ``index`` (repeats allowed: one prompt's condition for each sample of its group)."""
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(list(index), dtype=torch.long)
        out = {}
        for k, v in self.tensors.items():
            out[k] = v.index_select(0, index.to(v.device))
        return Condition(out, dict(self.shared))

    def to(self, device: torch.device | str) -> Condition:
        return Condition(
            {k: v.to(device) for k, v in self.tensors.items()}, {k: v.to(device) for k, v in self.shared.items()}
        )


def load_component_weights(pipe, path: str, components: Sequence[str]) -> dict[str, str]:
    """Load ``{component}.{param}`` tensors from one safetensors file into the pipeline's components
    (strict per component present); returns the file's metadata."""
    from safetensors import safe_open

    path = resolve_asset(path)
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = f.metadata() or {}
    unknown = sorted(k for k in state if k.split(".", 1)[0] not in components)
    if unknown or not state:
        raise ValueError(
            f"{path}: keys must be '<component>.<param>', component in {tuple(components)}; got {unknown[:3]}"
        )
    for name in components:
        prefix = name + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            getattr(pipe, name).load_state_dict(sub, strict=True)
    return meta


def check_architecture(architecture: dict, components: Sequence[str]) -> None:
    """A model's ``architecture`` names exactly its components, each with a mapping of config keys."""
    if not isinstance(architecture, dict) or set(architecture) != set(components):
        got = sorted(architecture) if isinstance(architecture, dict) else type(architecture).__name__
        raise ValueError(f"architecture must give the sizes of exactly {list(components)}, got {got}")
    for name in components:
        if not isinstance(architecture[name], dict):
            raise ValueError(f"architecture.{name} must be a mapping of config keys, got {architecture[name]!r}")


def shifted_sigmas(scheduler_config, image_seq_len: int, num_steps: int) -> torch.Tensor:
    """σ's of ``num_steps`` steps as diffusers' flow-matching pipelines set them: ``linspace(1, 1/n, n)``
    through the scheduler (dynamic shift μ from the latent sequence length, terminal shift if any), then 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    cfg = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.to(torch.float32).cpu()


def at_batch_size(method: Callable) -> Callable:
    """Run a module's ``method(self, batch, ...)`` with ``self.policy`` at the batch's ``"size"`` (an aspect-ratio
    bucket, see :mod:`editr1.data.buckets`); a batch without one runs at the configured resolution."""

    @functools.wraps(method)
    def wrapper(self, batch, *args, **kwargs):
        size = batch.get("size") if isinstance(batch, dict) else None
        if size is None:
            return method(self, batch, *args, **kwargs)
        with self.policy.at_size(*size):
            return method(self, batch, *args, **kwargs)

    return wrapper


def _largest_module_lists(root: nn.Module) -> list[nn.Module]:
    """The elements of the biggest ``nn.ModuleList`` (by parameter count) under ``root``: its layers."""
    best, size = [], 0
    for m in root.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = list(m), n
    return best


class EditPolicy(nn.Module, ABC):
    """A flow-matching image editor behind one interface. Subclasses: one file per base model.

    All frozen components stay in eval mode (no dropout) whatever ``train()`` is called with; only
    LoRA weights are trained.
    """

    transformer: nn.Module
    autocast_dtype: torch.dtype | None = None  # set: every transformer forward runs under torch.autocast
    max_condition_images: int | None = 1  # condition images one prompt may have; None: any number

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        if height <= 0 or width <= 0:
            raise ValueError(f"resolution must be positive, got {height}x{width}")
        self.height = height
        self.width = width

    # ----------------------------------------------------------------- the model-specific part
    @abstractmethod
    def encode(self, images: torch.Tensor, prompts: list[str]) -> Condition:
        """Condition for ``(N, 3, H, W)`` source images in [0, 1] and N instructions."""

    @abstractmethod
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Velocity for packed latents ``x_t`` at per-sample σ ``t`` (shape ``(B,)``)."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Packed clean latents of ``(N, 3, H, W)`` images in [0, 1] at the policy's resolution."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], ``(N, 3, H, W)``, from packed latents."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's packed latents at the current size (the configured resolution, or the size
        :meth:`at_size` set)."""

    @abstractmethod
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The σ schedule of ``num_steps`` solver steps, ending with 0 (length ``num_steps + 1``)."""

    def example_condition(self, n: int, text_tokens: int | None = None, device=None) -> Condition:
        """Random tensors of the shapes :meth:`encode` gives ``n`` prompts (``editr1 plan`` traces the transformer
        with them on the meta device; benchmarks time it alone). A model that ``editr1 plan`` should size
        implements it."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its condition (example_condition)")

    # ----------------------------------------------------------------- several condition images
    def encode_multi(self, images: Sequence[torch.Tensor], prompts: list[str]) -> Condition:
        """Condition from ``images[j]`` (the j-th picture of every prompt, ``(N, 3, H, W)``); single-image
        models take one."""
        if len(images) != 1:
            raise ValueError(f"{type(self).__name__} takes one condition image per prompt, got {len(images)}")
        return self.encode(images[0], prompts)

    def images_shared(self, num_images: int) -> dict[str, torch.Tensor]:
        """The ``Condition.shared`` entries that depend on the number of condition images (position ids, …)."""
        return {}

    def encode_rows(
        self, sources: torch.Tensor, references: Sequence[torch.Tensor | None] | None, prompts: list[str]
    ) -> Condition:
        """Condition of rows with different numbers of images: row i edits ``sources[i]`` with
        ``references[i]`` (``(k_i, 3, H, W)``, or ``None`` / empty for none) as pictures 2 … k_i + 1.

        Rows without references are :meth:`encode` as ever. Otherwise rows with as many images are encoded
        together by :meth:`encode_multi` and put back in order, their image latents zero-padded to the longest
        row, with each row's number of images in ``tensors["image_count"]``: :meth:`velocity_by_image_count`
        runs the transformer on the rows of one count at a time. A single-image model refuses references
        (they would be silently dropped otherwise)."""
        n = len(prompts)
        counts = [0 if r is None else int(r.shape[0]) for r in references] if references else [0] * n
        if len(counts) != n:
            raise ValueError(f"{len(counts)} reference lists but {n} prompts")
        if not any(counts):
            return self.encode(sources, prompts)
        limit = self.max_condition_images
        if limit is not None and 1 + max(counts) > limit:
            raise ValueError(
                f"{type(self).__name__} takes at most {limit} condition image(s) per prompt, but a row has "
                f"{1 + max(counts)} (the edited image and {max(counts)} references): use a multi-image model, "
                "or data.references: skip to drop such rows"
            )
        parts = self.encode_groups(sources, references, prompts, counts)
        drop = set(self.images_shared(1))
        tensors = {}
        for key in parts[0][1].tensors:
            width = max(c.tensors[key].shape[1] for _, c in parts)
            first = parts[0][1].tensors[key]
            out = first.new_zeros((n, width, *first.shape[2:]))
            for rows, c in parts:
                v = c.tensors[key]
                out[rows, : v.shape[1]] = v
            tensors[key] = out
        tensors["image_count"] = torch.tensor([1 + c for c in counts], device=sources.device)
        shared = {k: v for k, v in parts[0][1].shared.items() if k not in drop}
        return Condition(tensors, shared)

    def encode_groups(
        self, sources: torch.Tensor, references: Sequence, prompts: list[str], counts: list[int]
    ) -> list[tuple[list[int], Condition]]:
        """``(rows, condition)`` for the rows of each reference count (:meth:`encode_multi` of each group).
        Under FSDP2 the text encoders are sharded: a policy that encodes prompts in one batched call overrides
        this to keep one text-encoder call per batch whatever the mix of counts (every process the same)."""
        parts = []
        for count in sorted(set(counts)):
            rows = [i for i, c in enumerate(counts) if c == count]
            pictures = [sources[rows]] + [torch.stack([references[i][j] for i in rows]) for j in range(count)]
            parts.append((rows, self.encode_multi(pictures, [prompts[i] for i in rows])))
        return parts

    def velocity_by_image_count(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """:meth:`velocity` of a Condition from :meth:`encode_rows`: the rows of each image count in one call
        (their image latents cut to that count, the count's shared entries restored), results in row order."""
        counts = cond.tensors["image_count"]
        tokens = self.latent_shape()[0]  # condition images are encoded at the policy's resolution
        distinct = torch.unique(counts).tolist()
        if len(distinct) > 1 and hasattr(next(self.transformer.parameters()), "full_tensor"):
            raise ValueError(
                "a forward pass mixes rows with different numbers of images, which takes one call per count: "
                "under FSDP2 sharding (shard: true) every process must make the same calls. Use data whose rows "
                "all have as many images, or shard: false"
            )
        out = None
        for count in distinct:
            rows = torch.nonzero(counts == count).flatten()
            sub = {k: v.index_select(0, rows) for k, v in cond.tensors.items() if k != "image_count"}
            sub["image_latents"] = sub["image_latents"][:, : int(count) * tokens]
            shared = {**cond.shared, **self.images_shared(int(count))}
            v = self.velocity(
                x_t.index_select(0, rows.to(x_t.device)), t.index_select(0, rows.to(t.device)), Condition(sub, shared)
            )
            out = v.new_zeros((x_t.shape[0], *v.shape[1:])) if out is None else out
            out[rows.to(out.device)] = v
        return out

    # ----------------------------------------------------------------- size
    @property
    def spatial_multiple(self) -> int:
        """Every image side is a multiple of this: the VAE's downsampling × the 2×2 latent patches."""
        return int(self.vae_scale_factor) * 2

    @contextlib.contextmanager
    def at_size(self, height: int, width: int) -> Iterator[None]:
        """``with policy.at_size(h, w):`` every operation (preprocess, encode, latent shape, σ schedule, decode)
        works at ``h x w`` instead of the configured resolution, which comes back afterwards."""
        m = self.spatial_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"size {height}x{width} must be positive multiples of {m} for {type(self).__name__}")
        names = [n for n in ("height", "width", "latent_h", "latent_w") if hasattr(self, n)]
        saved = {n: getattr(self, n) for n in names}
        self.height, self.width = int(height), int(width)
        if "latent_h" in saved:
            self.latent_h, self.latent_w = self.height // self.vae_scale_factor, self.width // self.vae_scale_factor
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(self, n, v)

    # ----------------------------------------------------------------- shared behaviour
    def preprocess(self, images: Sequence[Image.Image | torch.Tensor]) -> torch.Tensor:
        """Images from the data → ``(N, 3, H, W)`` in [0, 1] at the policy's current size (scaled to cover it,
        centre-cropped), on its device."""
        return to_tensor_images(images, self.height, self.width).to(self.device)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.height, self.width):
            raise ValueError(
                f"expected images of shape (N, 3, {self.height}, {self.width}), got {tuple(images.shape)}; "
                "use policy.preprocess() to resize"
            )

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to ``autocast_dtype`` around a transformer forward; a no-op when it is ``None``."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def train(self, mode: bool = True) -> EditPolicy:
        super().train(False)  # frozen encoders and the base never switch to train mode
        return self

    def add_adapters(self, settings: lora.LoraSettings, names: list[str]) -> None:
        lora.add_adapters(self.transformer, settings, names)

    @contextlib.contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """``with policy.adapter("old"):`` runs the rollout policy; ``adapter(None)`` the reference."""
        with lora.using(self.transformer, name):
            yield

    def shard(self, mesh) -> None:
        """FSDP2: ``fully_shard`` each block of the transformer and of every frozen encoder (its largest
        list of layers), then each root. Called by the module's ``configure_model`` under
        :class:`editr1.strategies.FSDP2Strategy`; LoRA adapters must already be in place."""
        from torch.distributed.fsdp import fully_shard

        for root in self.shard_roots():
            blocks = (
                _largest_module_lists(root)
                if root is not self.transformer
                else [
                    m for name in ("transformer_blocks", "single_transformer_blocks") for m in getattr(root, name, [])
                ]
            )
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(root, mesh=mesh)

    def shard_roots(self) -> list[nn.Module]:
        """Modules sharded as units: the transformer and the text encoders (the VAE stays whole)."""
        roots = [self.transformer]
        for name in ("text_encoder", "text_encoder_2"):
            m = getattr(self, name, None)
            if isinstance(m, nn.Module):
                roots.append(m)
        return roots

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(lora.adapter_parameters(self.transformer, lora.DEFAULT).values())
