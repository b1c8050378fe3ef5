"""Qwen-Image-Edit (and Qwen-Image-Edit-2509, multi-image) as an :class:`EditPolicy`, on diffusers'
``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline`` components.

The instruction and the condition image go through the Qwen2.5-VL text encoder with the pipeline's
own prompt template (its first ``prompt_template_encode_start_idx`` tokens dropped), giving prompt
embeddings and their mask; the condition image is also VAE-encoded (``AutoencoderKLQwenImage``,
5-D latents normalised by ``latents_mean``/``latents_std``), packed into 2×2 patches and appended to
the noisy latents along the sequence, with its shape in ``img_shapes``. No classifier-free guidance
(``true_cfg_scale`` 1). Resolution and the size of the image the text encoder sees come from the
config: the pipelines' fixed ~1024² VAE size is never forced on training (the VAE sees the training
resolution, or the batch's aspect-ratio bucket). ``condition_area`` sizes the text encoder's picture as
QwenImageEditPlusPipeline does (``calculate_dimensions``: that area at the image's aspect ratio, sides rounded
to multiples of 32, Lanczos through the pipeline's own image processor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

from editr1.dtypes import default_dtype, resolve_dtype
from editr1.images import tensor_to_image
from editr1.policies.base import Condition, EditPolicy, check_architecture, load_component_weights, shifted_sigmas

# The Qwen-Image scheduler (flow matching with exponential dynamic shift and a terminal σ).
QWEN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

VARIANTS = {"edit": QwenImageEditPipeline, "edit_plus": QwenImageEditPlusPipeline}


@dataclass
class TinyQwenImage:
    """Sizes of a Qwen-Image-Edit built in code (random weights unless ``weights`` is given)."""

    heads: int = 2  # attention heads of the transformer
    head_dim: int = 16  # per-head width; rope axes split it (head_dim/4, 3·head_dim/8, 3·head_dim/8)
    layers: int = 1  # transformer blocks
    vae_base_dim: int = 16  # VAE base width
    vae_dim_mult: list[int] = field(default_factory=lambda: [1, 2])  # VAE stages; downsampling = 2^(len − 1)
    latent_channels: int = 4  # VAE z_dim (the transformer sees 4× this after 2×2 packing)
    text_hidden: int = 32  # Qwen2.5-VL text width (= the transformer's joint_attention_dim)
    text_layers: int = 1  # Qwen2.5-VL decoder layers
    vision_hidden: int = 32  # Qwen2.5-VL vision tower width
    zero_cond_t: bool = False  # condition tokens modulated at t = 0 (Qwen-Image-Edit-2511's transformer)
    seed: int = 0  # seed of the random initialisation
    weights: str | None = None  # optional safetensors file with trained weights for these components

    def __post_init__(self) -> None:
        if self.head_dim % 8:
            raise ValueError(f"tiny head_dim must be a multiple of 8, got {self.head_dim}")
        if len(self.vae_dim_mult) < 2:
            raise ValueError("tiny vae_dim_mult needs at least two stages")


def build_tiny_pipeline(cfg: TinyQwenImage, variant: str = "edit"):
    """A complete QwenImageEdit(Plus)Pipeline at tiny size, deterministic in ``cfg.seed``."""
    from editr1.rewards.tiny_judge import TinyJudge, build_tiny_judge

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        text_encoder, processor = build_tiny_judge(
            TinyJudge(
                hidden=cfg.text_hidden,
                layers=cfg.text_layers,
                vision_hidden=cfg.vision_hidden,
                seed=cfg.seed,
                warmup_steps=0,
            )
        )
        r = cfg.head_dim // 8
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=cfg.latent_channels * 4,
            out_channels=cfg.latent_channels,
            num_layers=cfg.layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.heads,
            joint_attention_dim=cfg.text_hidden,
            axes_dims_rope=(2 * r, 3 * r, 3 * r),
            zero_cond_t=cfg.zero_cond_t,
        )
        stages = len(cfg.vae_dim_mult) - 1
        vae = AutoencoderKLQwenImage(
            base_dim=cfg.vae_base_dim,
            z_dim=cfg.latent_channels,
            dim_mult=list(cfg.vae_dim_mult),
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False] * stages,
            latents_mean=[0.0] * cfg.latent_channels,
            latents_std=[1.0] * cfg.latent_channels,
        )
    pipe = VARIANTS[variant](
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=processor.tokenizer,
        processor=processor,
        transformer=transformer,
    )
    if cfg.weights:
        meta = load_component_weights(pipe, cfg.weights, ("transformer", "vae", "text_encoder"))
        norm = {k: [float(x) for x in meta[k].split(",")] for k in ("latents_mean", "latents_std") if k in meta}
        if norm:
            pipe.vae.register_to_config(**norm)
    return pipe


COMPONENTS = ("transformer", "vae", "text_encoder")


def build_pipeline(architecture: dict[str, dict], variant: str = "edit"):
    """A QwenImageEdit(Plus)Pipeline at the sizes of ``architecture`` (each component's config keys; the text
    encoder's as ``Qwen2_5_VLConfig`` takes them, ``text_config`` and ``vision_config`` nested) with random
    weights in the default device and dtype. The tokenizer and processor are the tiny judge's (code-built), and
    the encoder's special-token ids are set to theirs. Under ``torch.device("meta")`` nothing is allocated."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from editr1.rewards.tiny_judge import SPECIAL_TOKENS, build_processor

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    check_architecture(architecture, COMPONENTS)
    processor = build_processor()
    tok = processor.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    encoder = dict(architecture["text_encoder"])
    text = {**encoder.get("text_config", {}), "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    encoder |= {
        "text_config": text,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    return VARIANTS[variant](
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
        vae=AutoencoderKLQwenImage(**architecture["vae"]),
        text_encoder=Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**encoder)).eval(),
        tokenizer=tok,
        processor=processor,
        transformer=QwenImageTransformer2DModel(**architecture["transformer"]),
    )


class QwenImageEditPolicy(EditPolicy):
    """Qwen-Image-Edit editing policy.

    Args:
        pretrained_model_name_or_path: hub id or local folder of a diffusers QwenImageEdit(Plus)Pipeline
            (``Qwen/Qwen-Image-Edit``, ``Qwen/Qwen-Image-Edit-2509``). ``None`` builds the tiny model in code.
        variant: ``edit`` (QwenImageEditPipeline) or ``edit_plus`` (QwenImageEditPlusPipeline, 2509:
            "Picture N:" prompts, several condition images).
        revision: hub revision of the pretrained weights.
        torch_dtype: dtype of the frozen weights: ``float32``, ``bfloat16`` or ``float16``.
        resolution: training/rollout resolution, one int (square) or ``[height, width]``; a multiple of
            2 × the VAE's downsampling factor. Condition images are VAE-encoded at this size too.
        condition_resolution: size of the condition image the Qwen2.5-VL encoder sees (int or
            ``[height, width]``, whatever the image's shape; bicubic); ``None`` = the image's own size (the
            training resolution or bucket) unless ``condition_area`` is set.
        condition_area: instead of a fixed size, the Qwen2.5-VL encoder sees each condition image at about this
            many pixels at its own aspect ratio, as QwenImageEditPlusPipeline (``CONDITION_IMAGE_SIZE`` =
            384², 147456, for 2509 and 2511).
        max_sequence_length: prompt-embedding tokens kept per prompt (after the template's dropped prefix).
        tiny: sizes for the in-code build (ignored when loading pretrained weights).
        local_files_only: never touch the network when loading pretrained weights.
        architecture: the pretrained model's component sizes (``transformer``, ``vae``, ``text_encoder``: their
            config keys), which ``editr1 plan`` builds on the meta device; with ``pretrained_model_name_or_path:
            null`` the model is built at these sizes with random weights (benchmarks) instead of the tiny one.
            Not used when weights are loaded.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        variant: str = "edit",
        revision: str | None = None,
        torch_dtype: str = "float32",
        resolution: int | list[int] = 512,
        condition_resolution: int | list[int] | None = None,
        condition_area: int | None = None,
        max_sequence_length: int = 1024,
        tiny: TinyQwenImage | None = None,
        local_files_only: bool = False,
        architecture: dict[str, dict] | None = None,
    ) -> None:
        height, width = _hw(resolution)
        super().__init__(height, width)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        dtype = resolve_dtype(torch_dtype)
        if pretrained_model_name_or_path is None and architecture is not None:
            with default_dtype(dtype):
                pipe = build_pipeline(architecture, variant)
        elif pretrained_model_name_or_path is None:
            pipe = build_tiny_pipeline(tiny or TinyQwenImage(), variant)
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            pipe = VARIANTS[variant].from_pretrained(
                pretrained_model_name_or_path, revision=revision, dtype=dtype, local_files_only=local_files_only
            )
        if getattr(pipe.transformer.config, "zero_cond_t", False) and variant != "edit_plus":
            raise ValueError(
                "this transformer has zero_cond_t (Qwen-Image-Edit-2511): it needs variant 'edit_plus' "
                "(QwenImageEditPlusPipeline), as its model_index.json says"
            )
        self.variant = variant
        self.pipe = pipe  # not a module: holds the tokenizer, processor and scheduler
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.requires_grad_(False)
        self.eval()
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = pipe.vae_scale_factor
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"resolution {height}x{width} must be a multiple of {multiple} for this model")
        if condition_resolution is not None and condition_area is not None:
            raise ValueError("give condition_resolution (a fixed size) or condition_area (aspect kept), not both")
        if condition_area is not None and condition_area <= 0:
            raise ValueError(f"condition_area must be positive, got {condition_area}")
        self.condition_resolution = _hw(condition_resolution) if condition_resolution is not None else None
        self.condition_area = condition_area
        self.latent_h = height // self.vae_scale_factor
        self.latent_w = width // self.vae_scale_factor
        self.latent_channels = self.vae.config.z_dim
        self.max_condition_images = None if variant == "edit_plus" else 1

    # ---------------------------------------------------------------------------------- encoding
    def encode(self, images: torch.Tensor, prompts: list[str]) -> Condition:
        return self.encode_multi([images], prompts)

    @torch.no_grad()
    def encode_multi(self, images: Sequence[torch.Tensor], prompts: list[str]) -> Condition:
        """Condition from several images per prompt (``images[j]`` is the j-th picture of every prompt,
        ``(N, 3, H, W)``); only the ``edit_plus`` variant takes more than one."""
        if not images:
            raise ValueError("need at least one condition image per prompt")
        if len(images) > 1 and self.variant != "edit_plus":
            raise ValueError("several condition images need variant 'edit_plus' (Qwen-Image-Edit-2509)")
        n = len(prompts)
        for im in images:
            self._check_images(im)
            if im.shape[0] != n:
                raise ValueError(f"{im.shape[0]} images but {n} prompts")
        embeds, masks = [], []
        for i, prompt in enumerate(prompts):  # one prompt at a time: 2509 reads a list of images as one prompt's
            pictures = [self._condition_pil(im[i]) for im in images]
            e, m = self.pipe.encode_prompt(
                prompt=[prompt], image=pictures if self.variant == "edit_plus" else pictures[0], device=self.device
            )
            e = e[:, : self.max_sequence_length]
            m = torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m[:, : e.shape[1]]
            embeds.append(e[0])
            masks.append(m[0])
        length = max(e.shape[0] for e in embeds)
        prompt_embeds = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])
        prompt_mask = torch.stack([torch.cat([m, m.new_zeros(length - m.shape[0])]) for m in masks])
        image_latents = torch.cat([self.encode_images(im) for im in images], dim=1)
        return Condition(
            tensors={"prompt_embeds": prompt_embeds, "prompt_mask": prompt_mask, "image_latents": image_latents},
            shared=self.images_shared(len(images)),
        )

    def images_shared(self, num_images: int) -> dict[str, torch.Tensor]:
        return {"num_images": torch.tensor(num_images)}

    @property
    def condition_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the picture the Qwen2.5-VL encoder sees of an image at the current size."""
        return self.condition_size(self.height, self.width)

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        """The Qwen2.5-VL picture's ``(height, width)`` for a ``height x width`` condition image:
        ``condition_resolution``, or ``condition_area`` at its aspect ratio (the pipeline's
        ``calculate_dimensions``), or its own size."""
        if self.condition_resolution is not None:
            return self.condition_resolution
        if self.condition_area is not None:
            w, h = calculate_dimensions(self.condition_area, width / height)
            return int(h), int(w)
        return height, width

    def _condition_pil(self, image: torch.Tensor):
        """The picture the Qwen2.5-VL encoder sees: the condition image at :meth:`condition_size`."""
        h, w = self.condition_size(*image.shape[1:])
        if self.condition_area is not None:  # as QwenImageEditPlusPipeline: its image processor's resize of a PIL image
            return self.pipe.image_processor.resize(tensor_to_image(image, clamp=False), h, w)
        if tuple(image.shape[1:]) != (h, w):
            image = torch.nn.functional.interpolate(
                image[None].float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True
            )[0].clamp(0, 1)
        return tensor_to_image(image, clamp=False)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        x = (images.to(self.device, self.vae.dtype) * 2 - 1)[:, :, None]  # (N, 3, 1, H, W)
        latents = self.vae.encode(x).latent_dist.mode()
        mean, std = self._latent_norm(latents)
        latents = (latents - mean) / std
        n, c, _, h, w = latents.shape
        return self.pipe._pack_latents(latents, n, c, h, w).float()

    def _latent_norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def example_condition(self, n: int, text_tokens: int | None = None, device=None) -> Condition:
        """A random condition of the shapes :meth:`encode` gives ``n`` prompts with one condition image and
        ``text_tokens`` prompt tokens (default: the Qwen2.5-VL tokens of the condition image, 28² pixels each,
        plus 64 for the template and instruction, at most ``max_sequence_length``); for memory planning and
        benchmarks of the transformer alone. The mask and image count stay on the CPU (their values steer the
        forward, which a meta tensor does not have)."""
        device = torch.device(device or self.device)
        cfg, seq, ch = self.transformer.config, *self.latent_shape()
        h, w = self.condition_hw
        tokens = text_tokens or min(round(h / 28) * round(w / 28) + 64, self.max_sequence_length)
        return Condition(
            tensors={
                "prompt_embeds": torch.randn(n, tokens, cfg.joint_attention_dim, device=device),
                "prompt_mask": torch.ones(n, tokens, dtype=torch.long),
                "image_latents": torch.randn(n, seq, ch, device=device),
            },
            shared={"num_images": torch.tensor(1)},
        )

    # ---------------------------------------------------------------------------------- denoising
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        if "image_count" in cond.tensors:  # rows with different numbers of images (encode_rows)
            return self.velocity_by_image_count(x_t, t, cond)
        dtype = self.transformer.dtype
        hidden = torch.cat([x_t.to(dtype), cond["image_latents"].to(dtype)], dim=1)
        shape = (1, self.latent_h // 2, self.latent_w // 2)
        img_shapes = [[shape] * (1 + int(cond["num_images"]))] * x_t.shape[0]
        mask = cond["prompt_mask"]
        with self.autocast(x_t.device):
            out = self.transformer(
                hidden_states=hidden,
                timestep=t.to(dtype),
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
        return out[:, : x_t.shape[1]].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.pipe._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)
        mean, std = self._latent_norm(x)
        x = (x * std + mean).to(self.vae.dtype)
        images = self.vae.decode(x, return_dict=False)[0][:, :, 0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    def latent_shape(self) -> tuple[int, int]:
        return (self.latent_h // 2) * (self.latent_w // 2), self.latent_channels * 4

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's schedule: ``linspace(1, 1/n, n)`` shifted for the resolution, then 0."""
        return shifted_sigmas(self.pipe.scheduler.config, self.latent_shape()[0], num_steps)


def _hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)
