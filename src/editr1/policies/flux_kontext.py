"""FLUX.1-Kontext as an :class:`EditPolicy`, on diffusers' ``FluxKontextPipeline`` components.

The instruction goes through CLIP (pooled) and T5 (sequence); the source image is VAE-encoded,
packed into 2×2 patches and appended to the noisy latents along the sequence with its own position
ids (first id = 1), exactly as the pipeline does. The distilled guidance embedding (default 2.5) is
kept in rollouts and training; there is no classifier-free guidance. Resolution comes from the
config: the pipeline's own ~1024² auto-resize never runs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from editr1.dtypes import default_dtype, resolve_dtype
from editr1.policies.base import Condition, EditPolicy, check_architecture, load_component_weights, shifted_sigmas
from editr1.policies.tiny import CLIP_BOS, CLIP_EOS, TinyTextConfig, clip_tokenizer, t5_tokenizer, text_encoders
from editr1.scene_vocabulary import vocabulary

FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass
class TinyFlux:
    """Sizes of a FLUX.1-Kontext built in code (random weights unless ``weights`` is given)."""

    heads: int = 2  # attention heads of the transformer
    head_dim: int = 16  # per-head width; rope axes split it as (head_dim/4, 3·head_dim/8, 3·head_dim/8)
    layers: int = 1  # double-stream (MMDiT) blocks
    single_layers: int = 1  # single-stream blocks
    vae_channels: list[int] = field(default_factory=lambda: [16, 32])  # VAE widths; downsampling = 2^(len − 1)
    latent_channels: int = 4  # VAE latent channels (the transformer sees 4× this after 2×2 packing)
    text: TinyTextConfig = field(default_factory=TinyTextConfig)  # tiny CLIP + T5 sizes
    words: list[str] | None = None  # T5 word vocabulary; None = the synthetic-scene grammar
    seed: int = 0  # seed of the random initialisation
    weights: str | None = None  # optional safetensors file with trained weights for these components

    def __post_init__(self) -> None:
        if self.head_dim % 8:
            raise ValueError(f"tiny head_dim must be a multiple of 8, got {self.head_dim}")
        if not self.vae_channels:
            raise ValueError("tiny vae_channels must not be empty")


def build_tiny_pipeline(cfg: TinyFlux) -> FluxKontextPipeline:
    """A complete FluxKontextPipeline at tiny size, deterministic in ``cfg.seed``."""
    words = cfg.words if cfg.words is not None else vocabulary()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        text = text_encoders(cfg.text, words)
        r = cfg.head_dim // 8
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=cfg.latent_channels * 4,
            num_layers=cfg.layers,
            num_single_layers=cfg.single_layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.heads,
            joint_attention_dim=cfg.text.t5_hidden,
            pooled_projection_dim=cfg.text.clip_hidden,
            guidance_embeds=True,
            axes_dims_rope=(2 * r, 3 * r, 3 * r),
        )
        n = len(cfg.vae_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=list(cfg.vae_channels),
            layers_per_block=1,
            latent_channels=cfg.latent_channels,
            norm_num_groups=min(8, min(cfg.vae_channels)),
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0,
            scaling_factor=1.0,
        )
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        transformer=transformer,
        **text,
    )
    if cfg.weights:
        load_pipeline_weights(pipe, cfg.weights)
    return pipe


COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def build_pipeline(architecture: dict[str, dict]) -> FluxKontextPipeline:
    """A FluxKontextPipeline at the sizes of ``architecture`` (each component's diffusers/transformers config
    keys, as in a model folder's ``config.json`` files) with random weights in the default device and dtype;
    the tokenizers are the code-built ones of the tiny model (their ids fit any vocabulary). Under
    ``torch.device("meta")`` nothing is allocated: what ``editr1 plan`` builds."""
    check_architecture(architecture, COMPONENTS)
    clip_tok = clip_tokenizer(architecture["text_encoder"].get("max_position_embeddings", 77))
    ids = clip_tok.get_vocab()
    special = {"bos_token_id": ids[CLIP_BOS], "eos_token_id": ids[CLIP_EOS], "pad_token_id": ids[CLIP_EOS]}
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=AutoencoderKL(**architecture["vae"]),
        transformer=FluxTransformer2DModel(**architecture["transformer"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**{**architecture["text_encoder"], **special})).eval(),
        tokenizer=clip_tok,
        text_encoder_2=T5EncoderModel(T5Config(**architecture["text_encoder_2"])).eval(),
        tokenizer_2=t5_tokenizer(vocabulary()),
    )


def load_pipeline_weights(pipe: FluxKontextPipeline, path: str) -> None:
    """Load ``{component}.{param}`` tensors from one safetensors file (strict). The file's metadata
    may carry the VAE's latent normalisation (``shift_factor``, ``scaling_factor``)."""
    meta = load_component_weights(pipe, path, ("transformer", "vae", "text_encoder", "text_encoder_2"))
    latent_norm = {k: float(meta[k]) for k in ("shift_factor", "scaling_factor") if k in meta}
    if latent_norm:
        pipe.vae.register_to_config(**latent_norm)


class FluxKontextPolicy(EditPolicy):
    """FLUX.1-Kontext editing policy.

    Args:
        pretrained_model_name_or_path: hub id or local folder of a diffusers FluxKontextPipeline
            (e.g. ``black-forest-labs/FLUX.1-Kontext-dev``). ``None`` builds the tiny model in code.
        revision: hub revision (branch, tag or commit) of the pretrained weights.
        torch_dtype: dtype of the frozen weights: ``float32``, ``bfloat16`` or ``float16``.
        resolution: training/rollout resolution, one int (square) or ``[height, width]``; must be a
            multiple of 2 × the VAE's downsampling factor. The source image is resized to it too.
        guidance_scale: the distilled guidance embedding (not CFG); 2.5 as in the paper.
        max_sequence_length: T5 tokens per instruction.
        tiny: sizes for the in-code build (ignored when loading pretrained weights).
        local_files_only: never touch the network when loading pretrained weights.
        architecture: the pretrained model's component sizes (``transformer``, ``vae``, ``text_encoder``,
            ``text_encoder_2``: their config keys), which ``editr1 plan`` builds on the meta device; with
            ``pretrained_model_name_or_path: null`` the model is built at these sizes with random weights
            (benchmarks) instead of the tiny one. Not used when weights are loaded.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        revision: str | None = None,
        torch_dtype: str = "float32",
        resolution: int | list[int] = 512,
        guidance_scale: float = 2.5,
        max_sequence_length: int = 512,
        tiny: TinyFlux | None = None,
        local_files_only: bool = False,
        architecture: dict[str, dict] | None = None,
    ) -> None:
        height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        super().__init__(height, width)
        dtype = resolve_dtype(torch_dtype)
        if pretrained_model_name_or_path is None and architecture is not None:
            with default_dtype(dtype):
                pipe = build_pipeline(architecture)
        elif pretrained_model_name_or_path is None:
            pipe = build_tiny_pipeline(tiny or TinyFlux())
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            pipe = FluxKontextPipeline.from_pretrained(
                pretrained_model_name_or_path, revision=revision, dtype=dtype, local_files_only=local_files_only
            )
        self.pipe = pipe  # not a module: holds the tokenizers and scheduler, shares the modules below
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.text_encoder_2 = pipe.text_encoder_2
        self.requires_grad_(False)
        self.eval()
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = pipe.vae_scale_factor
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"resolution {height}x{width} must be a multiple of {multiple} for this model")
        self.latent_h = height // self.vae_scale_factor
        self.latent_w = width // self.vae_scale_factor
        self.latent_channels = self.vae.config.latent_channels

    # ---------------------------------------------------------------------------------- encoding
    def encode(self, images: torch.Tensor, prompts: list[str]) -> Condition:
        with torch.no_grad():
            return self.condition(images, prompts)

    def condition(self, images: torch.Tensor, prompts: list[str]) -> Condition:
        """:meth:`encode` with gradients through the text encoders (for training them)."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        device = self.device
        prompt_embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        image_latents = self.encode_images(images)
        latent_ids = self.pipe._prepare_latent_image_ids(
            1, self.latent_h // 2, self.latent_w // 2, device, prompt_embeds.dtype
        )
        image_ids = latent_ids.clone()
        image_ids[..., 0] = 1
        return Condition(
            tensors={"prompt_embeds": prompt_embeds, "pooled": pooled, "image_latents": image_latents},
            shared={"text_ids": text_ids, "img_ids": torch.cat([latent_ids, image_ids], dim=0)},
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        latents = self.vae.encode(x).latent_dist.mode()
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        n, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, n, c, h, w).float()

    def example_condition(self, n: int, text_tokens: int | None = None, device=None) -> Condition:
        """A random condition of the shapes :meth:`encode` gives ``n`` prompts (T5 pads to
        ``max_sequence_length`` tokens); for memory planning and benchmarks of the transformer alone."""
        device = torch.device(device or self.device)
        cfg, seq, ch = self.transformer.config, *self.latent_shape()
        tokens = text_tokens or self.max_sequence_length
        h, w = self.latent_h // 2, self.latent_w // 2
        latent_ids = self.pipe._prepare_latent_image_ids(1, h, w, device, torch.float32)
        image_ids = latent_ids.clone()
        image_ids[..., 0] = 1
        return Condition(
            tensors={
                "prompt_embeds": torch.randn(n, tokens, cfg.joint_attention_dim, device=device),
                "pooled": torch.randn(n, cfg.pooled_projection_dim, device=device),
                "image_latents": torch.randn(n, seq, ch, device=device),
            },
            shared={"text_ids": torch.zeros(tokens, 3, device=device), "img_ids": torch.cat([latent_ids, image_ids])},
        )

    # ---------------------------------------------------------------------------------- denoising
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        dtype = self.transformer.dtype
        hidden = torch.cat([x_t.to(dtype), cond["image_latents"].to(dtype)], dim=1)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((x_t.shape[0],), self.guidance_scale, device=x_t.device, dtype=torch.float32)
        with self.autocast(x_t.device):
            out = self.transformer(
                hidden_states=hidden,
                timestep=t.to(dtype),
                guidance=guidance,
                pooled_projections=cond["pooled"].to(dtype),
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                txt_ids=cond["text_ids"],
                img_ids=cond["img_ids"],
                return_dict=False,
            )[0]
        return out[:, : x_t.shape[1]].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.pipe._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)
        x = x / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    def latent_shape(self) -> tuple[int, int]:
        return (self.latent_h // 2) * (self.latent_w // 2), self.latent_channels * 4

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's schedule: ``linspace(1, 1/n, n)`` time-shifted by the resolution's μ, then 0."""
        return shifted_sigmas(self.pipe.scheduler.config, self.latent_shape()[0], num_steps)
