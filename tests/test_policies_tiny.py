"""The tiny CLIP + T5 text encoders built in code (the tokenizers' round trips are in test_flux_kontext.py):
vocabulary sizes and special ids by hand, sizes taken from the config, deterministic under a seed."""

from __future__ import annotations

import pytest
import torch

from editr1.policies.tiny import (
    CLIP_BOS,
    CLIP_EOS,
    LETTERS,
    TinyTextConfig,
    clip_tokenizer,
    t5_tokenizer,
    text_encoders,
)
from editr1.scene_vocabulary import vocabulary


def test_clip_vocabulary_is_256_bytes_their_word_ends_and_two_specials():
    tok = clip_tokenizer(max_length=20)
    vocab = tok.get_vocab()
    assert len(vocab) == 2 * 256 + 2
    assert (vocab[CLIP_BOS], vocab[CLIP_EOS]) == (512, 513)
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (512, 513, 20)
    assert sum(k.endswith("</w>") for k in vocab) == 256


def test_t5_vocabulary_deduplicates_lowercased_words():
    tok = t5_tokenizer(["Red", " red ", "RED", "", "  ", "blue", "circle"])
    assert len(tok) == 3 + 3 + 1 + len(LETTERS)  # specials, three distinct words, "▁", one piece per letter
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(tok("red blue", add_special_tokens=False).input_ids) == ["▁red", "▁blue"]
    assert len(t5_tokenizer(vocabulary())) == 3 + len(vocabulary()) + 1 + len(LETTERS)


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return text_encoders(
        TinyTextConfig(clip_hidden=16, clip_layers=2, clip_max_length=24, t5_hidden=24, t5_layers=1, heads=4),
        vocabulary(),
    )


def test_components_and_their_sizes_follow_the_config(encoders):
    assert set(encoders) == {"text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}
    clip, t5 = encoders["text_encoder"], encoders["text_encoder_2"]
    assert not clip.training and not t5.training
    c = clip.config
    assert (c.hidden_size, c.projection_dim, c.num_hidden_layers, c.num_attention_heads) == (16, 16, 2, 4)
    assert (c.max_position_embeddings, c.vocab_size) == (24, 514)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (512, 513, 513)
    t = t5.config
    assert (t.d_model, t.d_ff, t.d_kv, t.num_layers, t.num_heads, t.dropout_rate) == (24, 48, 6, 1, 4, 0.0)
    assert t.vocab_size == len(encoders["tokenizer_2"]) and encoders["tokenizer"].model_max_length == 24


def test_encoders_run_on_their_own_tokenizers(encoders):
    prompt = "make the red circle blue"
    clip_ids = encoders["tokenizer"](prompt, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    t5_ids = encoders["tokenizer_2"](prompt, return_tensors="pt")
    with torch.no_grad():
        clip_out = encoders["text_encoder"](clip_ids.input_ids)
        t5_out = encoders["text_encoder_2"](t5_ids.input_ids)
    assert clip_out.pooler_output.shape == (1, 16) and clip_out.last_hidden_state.shape == (1, 24, 16)
    assert t5_ids.input_ids.shape[1] == 5 + 1  # five words of the vocabulary, then </s>
    assert t5_out.last_hidden_state.shape == (1, 6, 24) and torch.isfinite(t5_out.last_hidden_state).all()


def test_weights_follow_the_global_seed():
    cfg = TinyTextConfig()
    torch.manual_seed(3)
    a = text_encoders(cfg, ["red"])["text_encoder_2"].state_dict()
    torch.manual_seed(3)
    b = text_encoders(cfg, ["red"])["text_encoder_2"].state_dict()
    torch.manual_seed(4)
    c = text_encoders(cfg, ["red"])["text_encoder_2"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
