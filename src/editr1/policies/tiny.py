"""Real diffusers / transformers components at tiny sizes, built in code with no download.

Used by the tests and the demo. Tokenizers are built in code too: CLIP from a byte-level vocabulary
with no merges (one token per character), T5 from a small word-level unigram vocabulary with
single-character fallback. Everything round-trips through ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A character-level CLIP tokenizer: the 256 byte symbols, their end-of-word forms, no merges."""
    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(words: Iterable[str]) -> T5Tokenizer:
    """A word-level unigram T5 tokenizer over ``words``; unknown words fall back to characters."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = set()
    for w in words:
        w = w.strip().lower()
        if w and w not in seen:
            seen.add(w)
            pieces.append(("▁" + w, -1.0))
    pieces.append(("▁", -4.0))
    pieces.extend((c, -6.0) for c in LETTERS)
    return T5Tokenizer(vocab=pieces, extra_ids=0)


@dataclass
class TinyTextConfig:
    """Sizes of the tiny CLIP and T5 text encoders."""

    clip_hidden: int = 32  # CLIP text width (= pooled projection size)
    clip_layers: int = 1  # CLIP transformer layers
    clip_max_length: int = 64  # CLIP context length (characters + 2 specials)
    t5_hidden: int = 32  # T5 d_model (= the transformer's joint_attention_dim)
    t5_layers: int = 1  # T5 encoder layers
    heads: int = 2  # attention heads in both encoders


def text_encoders(cfg: TinyTextConfig, words: Iterable[str]) -> dict:
    """CLIP + T5 encoders and tokenizers (random weights; seed with ``torch.manual_seed`` first)."""
    clip_tok = clip_tokenizer(cfg.clip_max_length)
    t5_tok = t5_tokenizer(words)
    vocab = clip_tok.get_vocab()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=cfg.clip_hidden,
            intermediate_size=cfg.clip_hidden * 2,
            projection_dim=cfg.clip_hidden,
            num_hidden_layers=cfg.clip_layers,
            num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.clip_max_length,
            bos_token_id=vocab[CLIP_BOS],
            eos_token_id=vocab[CLIP_EOS],
            pad_token_id=vocab[CLIP_EOS],
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=cfg.t5_hidden,
            d_ff=cfg.t5_hidden * 2,
            d_kv=cfg.t5_hidden // cfg.heads,
            num_layers=cfg.t5_layers,
            num_heads=cfg.heads,
            dropout_rate=0.0,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    return {
        "text_encoder": clip.eval(),
        "tokenizer": clip_tok,
        "text_encoder_2": t5.eval(),
        "tokenizer_2": t5_tok,
    }
