"""A multimodal LLM as a training-free reward, read from its logits (local, in-process).

One user turn shows the source image (then any reference images, named in the text), the edited image,
then the prompt (instruction, requirement, 0–5 rubric, "answer with the number"). The reward is the
expected digit of the first answer token, ``Σ_d p(d)·d / 5``, with p the softmax over the six digit tokens
(ids from the tokenizer). Any transformers image-text-to-text chat model works through the Auto classes
(Qwen2.5-VL by default; Qwen2-VL, Qwen3-VL). Batched with left padding; optional 8-/4-bit loading through bitsandbytes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image

from editr1.dtypes import resolve_dtype
from editr1.images import limit_pixels, tensor_to_image
from editr1.rewards.base import RewardInputs, RewardModel
from editr1.rewards.prompts import load_template, render
from editr1.rewards.scoring import SCORE_MODES, ScoreMode, digit_score_from_logits, digit_token_ids
from editr1.rewards.tiny_judge import TinyJudge, build_tiny_judge, tiny_judge_from_file, trained_prompt

log = logging.getLogger(__name__)

Quantization = Literal["none", "8bit", "4bit"]


def judge_images(inputs: RewardInputs, max_pixels: int | None = None) -> list[list[Image.Image]]:
    """The images of each judgement as PIL: ``[source, *references, edit]``; each distinct source (with its
    references) is converted once."""
    cache: dict[int, list[Image.Image]] = {}
    out = []
    for i in range(inputs.edits.shape[0]):
        sid = inputs.source_ids[i] if inputs.source_ids is not None else -1 - i
        if sid not in cache:
            refs = inputs.references[i] if inputs.references is not None else None
            cache[sid] = [limit_pixels(_pil(im), max_pixels) for im in [inputs.sources[i], *(refs or [])]]
        out.append([*cache[sid], limit_pixels(tensor_to_image(inputs.edits[i]), max_pixels)])
    return out


def reference_counts(inputs: RewardInputs) -> list[int]:
    """How many reference images each judgement shows besides the source and the edit."""
    refs = inputs.references or [None] * inputs.edits.shape[0]
    return [len(r or []) for r in refs]


def _pil(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else tensor_to_image(image)


def user_turn(text: str, n_images: int = 2) -> list[dict]:
    """The chat messages of one judgement: the images first, then the text."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


class MLLMJudge:
    """A transformers chat MLLM that returns next-token logits for batches of conversations.

    Shared by :class:`LocalMLLMReward` and the ``editr1 serve-reward`` server. Loads lazily on the
    first call (or :meth:`load`), so a quantised model goes straight to its device.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        revision: str | None = None,
        torch_dtype: str = "bfloat16",
        quantization: Quantization = "none",
        trust_remote_code: bool = False,
        tiny: TinyJudge | None = None,
        local_files_only: bool = False,
    ) -> None:
        dtype = resolve_dtype(torch_dtype)
        if quantization not in ("none", "8bit", "4bit"):
            raise ValueError(f"quantization must be 'none', '8bit' or '4bit', got {quantization!r}")
        self.path = pretrained_model_name_or_path
        self.revision = revision
        self.dtype = dtype
        self.quantization = quantization
        self.trust_remote_code = trust_remote_code
        self.tiny = tiny
        self.local_files_only = local_files_only
        self.model = None
        self.processor = None
        self.digit_ids: list[int] = []
        self.device = torch.device("cpu")
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.path or "editr1-tiny-judge"

    def load(self, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        if self.model is not None:
            if device != self.device and self.quantization == "none":
                self.model.to(device)
                self.device = device
            return
        if self.path is None:
            model, processor = build_tiny_judge(self.tiny)
            model.to(device=device, dtype=self.dtype if self.dtype != torch.float32 else None)
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

            kwargs: dict = dict(
                revision=self.revision, trust_remote_code=self.trust_remote_code, local_files_only=self.local_files_only
            )
            processor = AutoProcessor.from_pretrained(self.path, **kwargs)
            quant = None
            if self.quantization == "8bit":
                quant = BitsAndBytesConfig(load_in_8bit=True)
            elif self.quantization == "4bit":
                quant = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype
                )
            model = AutoModelForImageTextToText.from_pretrained(
                self.path,
                dtype=self.dtype,
                quantization_config=quant,
                device_map={"": str(device)} if quant is not None else None,
                **kwargs,
            )
            if quant is None:
                model.to(device)
        model.eval().requires_grad_(False)
        processor.tokenizer.padding_side = "left"
        self.digit_ids = digit_token_ids(processor.tokenizer)
        self.model, self.processor, self.device = model, processor, device

    def _batch(self, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, torch.Tensor]:
        """One left-padded processor batch on the model's device (pixels in the model's dtype)."""
        batch = self.processor(text=list(texts), images=[list(im) for im in images], return_tensors="pt", padding=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch and self.quantization == "none":
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    @torch.no_grad()
    def next_token_logits(self, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> torch.Tensor:
        """``(N, vocab)`` float32 logits of the first answer token, one left-padded forward pass."""
        if self.model is None:
            self.load(self.device)
        with self._lock:
            out = self.model(**self._batch(texts, images), logits_to_keep=1)
            return out.logits[:, -1, :].float()

    def generate(self, texts: Sequence[str], images: Sequence[Sequence[Image.Image]], max_new_tokens: int) -> list[str]:
        """Greedy answers (temperature 0) to a batch of chat texts, decoded without special tokens."""
        if self.model is None:
            self.load(self.device)  # outside no_grad: the tiny judge trains briefly when it is built
        tok = self.processor.tokenizer
        with self._lock, torch.no_grad():
            batch = self._batch(texts, images)
            ids = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        return tok.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    def chat_text(self, messages: list[dict]) -> str:
        if self.model is None:
            self.load(self.device)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class LocalMLLMReward(RewardModel):
    """The MLLM judge in this process (transformers).

    Args:
        pretrained_model_name_or_path: hub id or folder (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``); ``None``
            builds the tiny judge in code (tests, demos).
        revision: hub revision.
        torch_dtype: ``bfloat16`` (default), ``float16`` or ``float32``.
        quantization: ``none``, ``8bit`` or ``4bit`` (bitsandbytes).
        trust_remote_code: allow a model's own code from the hub; off unless you trust it.
        prompt: the judge prompt template (``{instruction}``, ``{requirement}``); ``None`` = ours.
        prompt_file: read the template from this file instead.
        batch_size: judgements per forward pass.
        max_pixels: downscale each image to at most this many pixels before the processor.
        tiny: sizes of the tiny judge when no path is given.
        local_files_only: never reach the network when loading.
        score: ``expected`` (the logit-expected digit, the paper's implicit score), ``sampled`` (a digit drawn
            from the judge's digit probabilities, as if it wrote its answer; seeded by ``sample_seed`` and the
            call count) or ``greedy`` (its most likely digit) — the last two for ablations.
        sample_seed: seed of the ``sampled`` draws.
        tiny_weights: a trained tiny judge (``python -m editr1.demo_judge``; e.g.
            ``asset:demo_judge/model.safetensors``): its sizes and tokenizer come from the file, and so does its
            judge prompt when ``prompt``/``prompt_file`` are not given. Instead of ``tiny``.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        revision: str | None = None,
        torch_dtype: str = "bfloat16",
        quantization: Quantization = "none",
        trust_remote_code: bool = False,
        prompt: str | None = None,
        prompt_file: str | None = None,
        batch_size: int = 8,
        max_pixels: int | None = 512 * 512,
        tiny: TinyJudge | None = None,
        local_files_only: bool = False,
        score: ScoreMode = "expected",
        sample_seed: int = 0,
        tiny_weights: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tiny_weights is not None:
            if pretrained_model_name_or_path is not None or tiny is not None:
                raise ValueError("give tiny_weights alone: not with pretrained_model_name_or_path or tiny")
            tiny = tiny_judge_from_file(tiny_weights)
            if prompt is None and prompt_file is None:
                prompt = trained_prompt(tiny_weights)
        if score not in SCORE_MODES:  # checked here, at construction, not at the first step
            raise ValueError(f"score must be expected, sampled or greedy, got {score!r}")
        self.score_mode = score
        self.generator = torch.Generator().manual_seed(sample_seed)
        self.template = load_template(prompt, prompt_file)
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.judge = MLLMJudge(
            pretrained_model_name_or_path,
            revision,
            torch_dtype,
            quantization,
            trust_remote_code,
            tiny,
            local_files_only,
        )
        self.digit_masses: list[float] = []  # since the last step_stats()

    def step_stats(self) -> dict[str, float]:
        """The six digit tokens' share of the first-token probability (mean and min since the last call)."""
        masses, self.digit_masses = self.digit_masses, []
        if not masses:
            return {}
        return {"digit_mass_mean": sum(masses) / len(masses), "digit_mass_min": min(masses)}

    def to(self, device: torch.device | str) -> LocalMLLMReward:
        self.judge.load(device)
        return self

    def texts(self, inputs: RewardInputs) -> list[str]:
        return [
            self.judge.chat_text(user_turn(render(self.template, ins, req, refs), 2 + refs))
            for ins, req, refs in zip(inputs.instructions, inputs.requirements, reference_counts(inputs))
        ]

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        texts = self.texts(inputs)
        images = judge_images(inputs, self.max_pixels)
        out = []
        for s in range(0, len(texts), self.batch_size):
            logits = self.judge.next_token_logits(texts[s : s + self.batch_size], images[s : s + self.batch_size])
            out.append(digit_score_from_logits(logits, self.judge.digit_ids, self.score_mode, self.generator).cpu())
            mass = torch.softmax(logits.float(), dim=-1)[:, self.judge.digit_ids].sum(dim=-1)
            self.digit_masses.extend(m for m in mass.tolist() if m == m)
        return torch.cat(out)
