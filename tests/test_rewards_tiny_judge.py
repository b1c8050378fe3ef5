"""The tiny Qwen2.5-VL judge built in code: byte-level tokenizer, chat template, image budget, the rope
sections the model requires, determinism in the seed, and a warm-up that moves the first token onto digits."""

from __future__ import annotations

import pytest
import torch

from editr1.images import tensor_to_image
from editr1.rewards.scoring import digit_token_ids
from editr1.rewards.tiny_judge import SPECIAL_TOKENS, TinyJudge, build_processor, build_tiny_judge


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_tokenizer_is_one_token_per_byte_plus_the_special_tokens(processor):
    tok = processor.tokenizer
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    assert [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == list(range(256, 256 + len(SPECIAL_TOKENS)))
    for text in ("ab c", "héllo", "Score 0-5."):
        ids = tok(text).input_ids
        assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tok("<|im_start|>x").input_ids == [tok.convert_tokens_to_ids("<|im_start|>"), tok("x").input_ids[0]]


def test_chat_template_shows_images_then_text_and_opens_the_answer(processor):
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "rate"}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == f"<|im_start|>user\n{image}{image}rate<|im_end|>\n<|im_start|>assistant\n"
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def test_images_are_limited_to_the_pixel_budget(processor):
    big = tensor_to_image(torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(0)))
    small = tensor_to_image(torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(1)))
    out = processor(text=["<|image_pad|>", "<|image_pad|>"], images=[big, small], return_tensors="pt", padding=True)
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 2]]  # at most 56 x 56: 4 merged tokens
    wider = build_processor(max_pixels=112 * 112)
    assert wider(text=["<|image_pad|>"], images=[big], return_tensors="pt")["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_rope_sections_sum_to_half_the_head_dim():
    for cfg in (TinyJudge(warmup_steps=0), TinyJudge(hidden=64, heads=2, warmup_steps=0)):
        model, _ = build_tiny_judge(cfg)
        section = model.config.text_config.rope_parameters["mrope_section"]
        assert sum(section) == cfg.hidden // cfg.heads // 2 and all(s > 0 for s in section)
    assert section == [4, 6, 6]  # head_dim 32: half 16 = 16 - 2·6, 6, 6


def test_deterministic_in_the_seed_in_eval_mode_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny_judge(TinyJudge(warmup_steps=1))
    assert torch.equal(torch.rand(3), expected)  # initialisation and warm-up ran on a forked generator
    b, _ = build_tiny_judge(TinyJudge(warmup_steps=1))
    c, _ = build_tiny_judge(TinyJudge(warmup_steps=1, seed=1))
    untrained, _ = build_tiny_judge(TinyJudge(warmup_steps=0))
    sa, sb, sc, su = (m.state_dict() for m in (a, b, c, untrained))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not all(torch.equal(sa[k], su[k]) for k in sa)  # the warm-up trained it
    assert not a.training and not untrained.training


def test_warmup_moves_the_first_answer_token_onto_the_digits():
    def digit_mass(model, processor) -> torch.Tensor:
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Score"}]}]
        text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        g = torch.Generator().manual_seed(0)
        images = [
            [tensor_to_image(torch.rand(3, 28, 28, generator=g)), tensor_to_image(torch.full((3, 28, 28), v))]
            for v in (0.0, 1.0)
        ]
        processor.tokenizer.padding_side = "left"
        inputs = processor(text=[text] * 2, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            probs = model(**inputs).logits[:, -1].softmax(-1)
        return probs[:, digit_token_ids(processor.tokenizer)].sum(-1)

    before = digit_mass(*build_tiny_judge(TinyJudge(warmup_steps=0)))
    after = digit_mass(*build_tiny_judge(TinyJudge(warmup_steps=6)))
    assert (before < 0.05).all()  # about 6 / 263 at random initialisation
    assert (after > 0.15).all() and (after > 5 * before).all()


def test_a_saved_judge_brings_its_sizes_and_serve_reward_checks_the_file(tmp_path):
    from dataclasses import asdict

    from editr1.demo_judge import save
    from editr1.rewards.server import serve_reward
    from editr1.rewards.tiny_judge import tiny_judge_from_file

    cfg = TinyJudge(
        hidden=32,
        layers=1,
        heads=2,
        vision_hidden=32,
        patch_size=4,
        min_pixels=16 * 16,
        max_pixels=16 * 16,
        warmup_steps=0,
        seed=3,
    )
    model, processor = build_tiny_judge(cfg)
    path = tmp_path / "judge.safetensors"
    save(model, {}, cfg, path)
    loaded = tiny_judge_from_file(str(path))
    assert asdict(loaded) == {**asdict(cfg), "weights": str(path)}
    again, _ = build_tiny_judge(loaded)
    image = tensor_to_image(torch.rand(3, 16, 16))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Score 0-5."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)

    (tmp_path / "plain.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match="not a readable safetensors file"):
        serve_reward(tiny_weights=str(tmp_path / "plain.safetensors"))
    with pytest.raises(SystemExit, match="--model or --tiny_weights, not both"):
        serve_reward(model="some/judge", tiny_weights=str(path))


def test_weights_that_are_not_safetensors_are_a_clear_error(tmp_path):
    bad = tmp_path / "judge.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        build_tiny_judge(TinyJudge(weights=str(bad)))
