"""A tiny Qwen2.5-VL judge built in code (model, tokenizer, processor, chat template): no download.

For tests and demos of the MLLM reward path. The tokenizer is byte-level with no merges (one token
per byte) plus Qwen's special tokens; ``mrope_section`` sums to head_dim / 2 as the model requires.
``warmup_steps`` of supervised training on random image pairs teach it to answer with a digit
(more for image pairs that differ less), so its first-token distribution is concentrated on "0"…"5"
like a real judge's — needed for a server's top-20 log-probabilities to contain every digit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from editr1.asset_paths import resolve_asset

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# One user/assistant turn format in the style of Qwen2-VL (our own template text).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyJudge:
    """Sizes of the tiny Qwen2.5-VL judge."""

    hidden: int = 32  # text width
    layers: int = 1  # text decoder layers
    heads: int = 2  # attention heads (head_dim = hidden / heads)
    vision_hidden: int = 32  # vision tower width
    max_pixels: int = 56 * 56  # images are resized to at most this many pixels (4 merged tokens)
    seed: int = 0  # initialisation seed
    warmup_steps: int = 80  # supervised steps that teach it to answer with a digit (not with weights)
    patch_size: int = 14  # vision patch side (px); images are resized to multiples of 2 x this
    min_pixels: int = 28 * 28  # images are resized to at least this many pixels
    vision_depth: int = 1  # vision tower blocks
    kv_heads: int = 1  # key/value heads of the text decoder
    init_std: float = 0.02  # initial weight std (transformers' initializer_range; ~1/sqrt(hidden) trains tiny widths)
    weights: str | None = None  # safetensors of a trained judge (its tokenizer in the metadata), e.g. the demo's


def build_processor(
    max_pixels: int = 56 * 56,
    patch_size: int = 14,
    min_pixels: int = 28 * 28,
    vocab: dict[str, int] | None = None,
    merges: list | None = None,
) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor with a byte-level tokenizer: one token per byte, or the BPE ``vocab``/``merges``
    of a trained judge (which must hold every byte, so any text encodes)."""
    if vocab is None:
        alphabet = sorted(ByteLevel.alphabet())
        vocab = {c: i for i, c in enumerate(alphabet)}
        merges = []
    vocab = dict(vocab)
    for s in SPECIAL_TOKENS:
        vocab.setdefault(s, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in merges or []],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    image_processor = Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=2, temporal_patch_size=2
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_judge(
    cfg: TinyJudge | None = None, tokenizer: dict | None = None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """(model in eval mode, processor), deterministic in ``cfg.seed``. ``tokenizer``: a BPE ``{"vocab", "merges"}``
    instead of the byte-level one (a trained judge's comes from its weights file)."""
    cfg = cfg or TinyJudge()
    state, meta = _read_weights(cfg.weights) if cfg.weights else (None, {})
    tok_spec = tokenizer or (json.loads(meta["tokenizer"]) if "tokenizer" in meta else {})
    processor = build_processor(cfg.max_pixels, cfg.patch_size, cfg.min_pixels, **tok_spec)
    tok = processor.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    head_dim = cfg.hidden // cfg.heads
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=cfg.hidden,
            intermediate_size=cfg.hidden * 2,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            max_position_embeddings=1024,
            initializer_range=cfg.init_std,
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=cfg.vision_depth,
            hidden_size=cfg.vision_hidden,
            intermediate_size=cfg.vision_hidden * 2,
            num_heads=2,
            out_hidden_size=cfg.hidden,
            patch_size=cfg.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=4 * cfg.patch_size,
            fullatt_block_indexes=list(range(cfg.vision_depth)),
            initializer_range=cfg.init_std,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        initializer_range=cfg.init_std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        if state is not None:
            _load(model, state, cfg.weights)
        elif cfg.warmup_steps > 0:
            _warmup(model, processor, cfg.warmup_steps)
    return model.eval(), processor


def tiny_judge_from_file(path: str) -> TinyJudge:
    """The sizes a trained tiny judge was saved with (its safetensors metadata ``sizes``), pointing at it."""
    from dataclasses import fields

    meta = _read_weights(path, tensors=False)[1]
    if "sizes" not in meta:
        raise ValueError(f"{path}: no judge sizes in its metadata (not saved by editr1.demo_judge); give `tiny:` sizes")
    known = {f.name for f in fields(TinyJudge)}
    sizes = {k: v for k, v in json.loads(meta["sizes"]).items() if k in known}
    return TinyJudge(**{**sizes, "weights": path})


def trained_prompt(path: str) -> str | None:
    """The judge prompt a trained tiny judge was trained on (its metadata ``prompt``), or None."""
    return _read_weights(path, tensors=False)[1].get("prompt")


def _read_weights(path: str, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A judge file's tensors (none with ``tensors=False``) and metadata; a clear error for a file that is not one."""
    from safetensors import safe_open

    file = resolve_asset(path)
    try:
        with safe_open(file, "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 - no __iter__
            return state, f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a file that is not one
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Strict load with an error that names the sizes to fix."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: these weights do not fit a judge of the given sizes (set `tiny:` to the sizes it was trained "
            f"with): missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    model.load_state_dict(state, strict=True)


def _warmup(model, processor, steps: int, batch: int = 8) -> None:
    """Teach the last position to answer with a digit: the edited image's brightness in 0…5."""
    from editr1.rewards.scoring import digit_token_ids

    digits = torch.tensor(digit_token_ids(processor.tokenizer))
    processor.tokenizer.padding_side = "left"
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Score 0-5."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    model.train()
    for _ in range(steps):
        level = torch.randint(0, 6, (batch,))
        src = torch.rand(batch, 3, 28, 28)
        edit = (level.view(-1, 1, 1, 1) / 5 + 0.1 * torch.randn(batch, 3, 28, 28)).clamp(0, 1)
        images = [[_pil(src[i]), _pil(edit[i])] for i in range(batch)]
        inputs = processor(text=[text] * batch, images=images, return_tensors="pt", padding=True)
        logits = model(**inputs).logits[:, -1, :]
        loss = torch.nn.functional.cross_entropy(logits, digits[level])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _pil(t: torch.Tensor):
    from editr1.images import tensor_to_image

    return tensor_to_image(t)
