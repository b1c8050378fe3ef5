"""FLUX.2 [klein] as an :class:`EditPolicy`, on diffusers' ``Flux2KleinPipeline`` components.

The instruction goes through the Qwen3 text encoder with the pipeline's chat template, padded to
``max_sequence_length`` tokens; the hidden states of ``text_encoder_out_layers`` (9, 18, 27 as the
pipeline) are stacked along the width. Each condition image is VAE-encoded (``AutoencoderKLFlux2``),
2×2-patchified, normalised by the VAE's batch-norm statistics and appended to the noisy latents along
the sequence with 4-D position ids (time coordinate 10, 20, … per reference image, as the pipeline).
The transformer gets no attention mask (the pipeline gives none: padding tokens are attended to, the
same in every batch) and no guidance embedding; there is no classifier-free guidance (the pipeline's
``guidance_scale`` ≤ 1). The σ schedule is the pipeline's: ``linspace(1, 1/n, n)`` shifted by its
empirical μ, which depends on the number of steps as well as on the latent sequence length.
Resolution comes from the config (or a batch's aspect-ratio bucket, :meth:`EditPolicy.at_size`): the
pipeline's own resize of condition images to ≤ 1024² never runs; like the pipeline, each condition image is
VAE-encoded at its own shape cropped to a multiple of 16, which is the bucket's shape here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from editr1.dtypes import resolve_dtype
from editr1.policies.base import Condition, EditPolicy, load_component_weights
from editr1.policies.lora import PAPER_TARGET_MODULES

# The FLUX.2 scheduler (flow matching with dynamic shifting; μ comes from the pipeline's empirical fit).
FLUX2_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}

# The paper's attention projections on the double-stream blocks, plus the single-stream blocks' fused
# q/k/v + MLP-in projection (FLUX.2 has no separate to_q/to_k/to_v there).
FLUX2_TARGET_MODULES = [*PAPER_TARGET_MODULES, "to_qkv_mlp_proj"]

# A Qwen3-style chat turn (our own template text): the pipeline asks for ``enable_thinking=False``,
# which closes an empty think block after the assistant prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
DEFAULT_OUT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers


@dataclass
class TinyFlux2Klein:
    """Sizes of a FLUX.2 [klein] built in code (random weights unless ``weights`` is given)."""

    heads: int = 2  # attention heads of the transformer
    head_dim: int = 16  # per-head width; the four rope axes split it equally
    layers: int = 1  # double-stream blocks
    single_layers: int = 1  # single-stream blocks
    vae_channels: list[int] = field(default_factory=lambda: [16, 32])  # VAE widths; downsampling = 2^(len − 1)
    latent_channels: int = 4  # VAE latent channels (the transformer sees 4× this after 2×2 patchifying)
    text_hidden: int = 16  # Qwen3 width (the transformer's joint_attention_dim is len(out_layers) × this)
    text_layers: int = 3  # Qwen3 decoder layers
    out_layers: list[int] = field(default_factory=lambda: [1, 2, 3])  # hidden states stacked into the embedding
    seed: int = 0  # seed of the random initialisation
    weights: str | None = None  # optional safetensors file with trained weights for these components

    def __post_init__(self) -> None:
        if self.head_dim % 8:
            raise ValueError(f"tiny head_dim must be a multiple of 8, got {self.head_dim}")
        if not self.vae_channels:
            raise ValueError("tiny vae_channels must not be empty")
        if not self.out_layers or not all(0 <= i <= self.text_layers for i in self.out_layers):
            raise ValueError(f"tiny out_layers must be hidden-state indices in 0..{self.text_layers}")


def build_tiny_pipeline(cfg: TinyFlux2Klein) -> Flux2KleinPipeline:
    """A complete Flux2KleinPipeline at tiny size, deterministic in ``cfg.seed``: a byte-level tokenizer
    with a Qwen3-style chat template, a Qwen3 causal LM, a FLUX.2 VAE whose batch-norm statistics are
    random (so the latent normalisation is exercised) and a FLUX.2 transformer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from editr1.rewards.tiny_judge import build_processor

    tokenizer = build_processor().tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=cfg.text_hidden,
                intermediate_size=cfg.text_hidden * 2,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=cfg.text_hidden // 2,
                max_position_embeddings=1024,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
        quarter = cfg.head_dim // 4
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=cfg.latent_channels * 4,
            num_layers=cfg.layers,
            num_single_layers=cfg.single_layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.heads,
            joint_attention_dim=cfg.text_hidden * len(cfg.out_layers),
            timestep_guidance_channels=32,
            axes_dims_rope=(quarter,) * 4,
            guidance_embeds=False,
        )
        n = len(cfg.vae_channels)
        vae = AutoencoderKLFlux2(
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=list(cfg.vae_channels),
            layers_per_block=1,
            latent_channels=cfg.latent_channels,
            norm_num_groups=min(8, min(cfg.vae_channels)),
            mid_block_add_attention=False,
        )
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    if cfg.weights:
        load_component_weights(pipe, cfg.weights, ("transformer", "vae", "text_encoder"))  # bn stats are buffers
    return pipe


def flux2_sigmas(scheduler_config, image_seq_len: int, num_steps: int) -> torch.Tensor:
    """σ's of ``num_steps`` steps as Flux2KleinPipeline sets them (μ from ``compute_empirical_mu``), then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
    if scheduler.config.get("use_flow_sigmas"):
        scheduler.set_timesteps(num_steps, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.to(torch.float32).cpu()


class Flux2KleinPolicy(EditPolicy):
    """FLUX.2 [klein] editing policy (one or several condition images).

    Args:
        pretrained_model_name_or_path: hub id or local folder of a diffusers Flux2KleinPipeline
            (e.g. ``black-forest-labs/FLUX.2-klein-base-4B``). ``None`` builds the tiny model in code.
        revision: hub revision (branch, tag or commit) of the pretrained weights.
        torch_dtype: dtype of the frozen weights: ``float32``, ``bfloat16`` or ``float16``.
        resolution: training/rollout resolution, one int (square) or ``[height, width]``; a multiple of
            2 × the VAE's downsampling factor. Condition images are VAE-encoded at this size too.
        max_sequence_length: Qwen3 tokens per instruction (the template included; padded to this length).
        text_encoder_out_layers: Qwen3 hidden states stacked into the prompt embedding; ``None`` = the
            pipeline's (9, 18, 27), or the tiny build's ``out_layers``.
        tiny: sizes for the in-code build (ignored when loading pretrained weights).
        local_files_only: never touch the network when loading pretrained weights.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        revision: str | None = None,
        torch_dtype: str = "float32",
        resolution: int | list[int] = 512,
        max_sequence_length: int = 512,
        text_encoder_out_layers: list[int] | None = None,
        tiny: TinyFlux2Klein | None = None,
        local_files_only: bool = False,
    ) -> None:
        height, width = (resolution, resolution) if isinstance(resolution, int) else map(int, resolution)
        super().__init__(height, width)
        dtype = resolve_dtype(torch_dtype)
        if pretrained_model_name_or_path is None:
            tiny = tiny or TinyFlux2Klein()
            pipe = build_tiny_pipeline(tiny)
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
            default_layers: Sequence[int] = tiny.out_layers
        else:
            pipe = Flux2KleinPipeline.from_pretrained(
                pretrained_model_name_or_path, revision=revision, torch_dtype=dtype, local_files_only=local_files_only
            )
            default_layers = DEFAULT_OUT_LAYERS
        self.pipe = pipe  # not a module: holds the tokenizer and scheduler, shares the modules below
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.requires_grad_(False)
        self.eval()
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(text_encoder_out_layers or default_layers)
        self.vae_scale_factor = pipe.vae_scale_factor
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"resolution {height}x{width} must be a multiple of {multiple} for this model")
        self.latent_h = height // self.vae_scale_factor
        self.latent_w = width // self.vae_scale_factor
        self.latent_channels = self.vae.config.latent_channels
        self.max_condition_images = None  # any number of references, as the pipeline's list of images

    # ---------------------------------------------------------------------------------- encoding
    def encode(self, images: torch.Tensor, prompts: list[str]) -> Condition:
        return self.encode_multi([images], prompts)

    @torch.no_grad()
    def encode_multi(self, images: Sequence[torch.Tensor], prompts: list[str]) -> Condition:
        """Condition from several images per prompt (``images[j]`` is the j-th picture of every prompt,
        ``(N, 3, H, W)``): each reference gets its own time coordinate, as the pipeline's list of images."""
        if not images:
            raise ValueError("need at least one condition image per prompt")
        for im in images:
            self._check_images(im)
            if im.shape[0] != len(prompts):
                raise ValueError(f"{im.shape[0]} images but {len(prompts)} prompts")
        prompt_embeds, text_ids = self._encode_text(prompts)
        image_latents = torch.cat([self.encode_images(im) for im in images], dim=1)
        return Condition(
            tensors={"prompt_embeds": prompt_embeds, "image_latents": image_latents},
            shared={"text_ids": text_ids, **self.images_shared(len(images))},
        )

    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings ``(N, max_sequence_length, width)`` and the text position ids (shared)."""
        prompt_embeds, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return prompt_embeds, text_ids[:1]

    @torch.no_grad()
    def encode_groups(self, sources, references, prompts, counts):
        """One text-encoder call for every row whatever their image counts (sharded encoders: the same calls
        on every process), then each count's images through the VAE."""
        prompt_embeds, text_ids = self._encode_text(prompts)
        parts = []
        for count in sorted(set(counts)):
            rows = [i for i, c in enumerate(counts) if c == count]
            pictures = [sources[rows]] + [torch.stack([references[i][j] for i in rows]) for j in range(count)]
            latents = torch.cat([self.encode_images(im) for im in pictures], dim=1)  # (checks each size)
            tensors = {"prompt_embeds": prompt_embeds[rows], "image_latents": latents}
            parts.append((rows, Condition(tensors, {"text_ids": text_ids, **self.images_shared(1 + count)})))
        return parts

    def images_shared(self, num_images: int) -> dict[str, torch.Tensor]:
        """Position ids (T, H, W, L) of the noisy latents (T = 0) then of each condition image (T = 10, 20, …)."""
        grid = torch.zeros(1, 1, self.latent_h // 2, self.latent_w // 2)
        ids = [self.pipe._prepare_latent_ids(grid), self.pipe._prepare_image_ids([grid] * num_images)]
        return {"img_ids": torch.cat(ids, dim=1).to(self.device)}

    def _normalised_latents(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        latents = self.pipe._patchify_latents(self.vae.encode(x).latent_dist.mode())
        mean, std = self._bn_stats(latents)
        return (latents - mean) / std

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return self.pipe._pack_latents(self._normalised_latents(images)).float()

    # ---------------------------------------------------------------------------------- denoising
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        if "image_count" in cond.tensors:  # rows with different numbers of images (encode_rows)
            return self.velocity_by_image_count(x_t, t, cond)
        dtype = self.transformer.dtype
        hidden = torch.cat([x_t.to(dtype), cond["image_latents"].to(dtype)], dim=1)
        with self.autocast(x_t.device):
            out = self.transformer(
                hidden_states=hidden,
                timestep=t.to(dtype),
                guidance=None,
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                txt_ids=cond["text_ids"],
                img_ids=cond["img_ids"],
                return_dict=False,
            )[0]
        return out[:, : x_t.shape[1]].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        h, w = self.latent_h // 2, self.latent_w // 2
        grid = latents.to(self.vae.dtype).transpose(1, 2).reshape(latents.shape[0], -1, h, w)
        mean, std = self._bn_stats(grid)
        x = self.pipe._unpatchify_latents(grid * std + mean)
        images = self.vae.decode(x, return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    def latent_shape(self) -> tuple[int, int]:
        return (self.latent_h // 2) * (self.latent_w // 2), self.latent_channels * 4

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's schedule: ``linspace(1, 1/n, n)`` shifted by its empirical μ, then 0."""
        return flux2_sigmas(self.pipe.scheduler.config, self.latent_shape()[0], num_steps)
