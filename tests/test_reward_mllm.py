"""The local MLLM reward on a tiny Qwen2.5-VL built in code (no download)."""

from __future__ import annotations

import inspect

import pytest
import torch
from PIL import Image

from editr1.images import limit_pixels
from editr1.rewards import LocalMLLMReward, RewardInputs
from editr1.rewards.mllm import MLLMJudge, judge_images, user_turn
from editr1.rewards.prompts import render
from editr1.rewards.scoring import expected_score_from_logits
from editr1.rewards.tiny_judge import TinyJudge

SHORT = "Instruction: {instruction}. Requirement: {requirement}. Score 0-5."


@pytest.fixture(scope="module")
def local():
    reward = LocalMLLMReward(torch_dtype="float32", prompt=SHORT, batch_size=8, max_pixels=56 * 56)
    reward.to("cpu")
    return reward


@pytest.fixture(scope="module")
def saved_judge(tmp_path_factory, local):
    path = tmp_path_factory.mktemp("judge")
    local.judge.model.save_pretrained(path)
    local.judge.processor.save_pretrained(path)
    return path


def inputs(n=8, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(n, 3, size, size, generator=g)
    edits = torch.linspace(0, 1, n).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    instr = [
        ("make the red circle blue", "remove the green square at the top left of the picture")[i % 2] for i in range(n)
    ]
    return RewardInputs(
        src, edits, instr, ["keep the rest" if i % 3 else "" for i in range(n)], source_ids=list(range(n))
    )


def test_scores_are_probabilities_that_depend_on_the_edit(local):
    s = local.score(inputs())
    assert s.shape == (8,) and s.dtype == torch.float32
    assert ((s >= 0) & (s <= 1)).all()
    assert s.std() > 0.01  # the tiny judge is not constant: batching bugs would show


def test_batched_equals_one_at_a_time(local):
    x = inputs()
    batched = local.score(x)
    single = torch.cat([local.score(x.select(i, i + 1)) for i in range(8)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_batch_with_different_image_sizes_and_prompt_lengths(local):
    judge = local.judge
    rng = torch.Generator().manual_seed(3)
    sizes = [(28, 28), (56, 40), (40, 56), (33, 47)]
    pairs = [
        [Image.fromarray((torch.rand(h, w, 3, generator=rng) * 255).byte().numpy()) for _ in range(2)]
        for (h, w) in sizes
    ]
    texts = [judge.chat_text(user_turn(render(SHORT, "x" * (5 + 30 * i), "r" * i))) for i in range(4)]
    batched = expected_score_from_logits(judge.next_token_logits(texts, pairs), judge.digit_ids)
    single = torch.cat(
        [
            expected_score_from_logits(judge.next_token_logits(texts[i : i + 1], pairs[i : i + 1]), judge.digit_ids)
            for i in range(4)
        ]
    )
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_loading_from_a_folder_matches_the_in_code_build(local, saved_judge):
    loaded = LocalMLLMReward(str(saved_judge), torch_dtype="float32", prompt=SHORT, max_pixels=56 * 56).to("cpu")
    torch.testing.assert_close(loaded.score(inputs()), local.score(inputs()), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def wide_judge(tmp_path_factory):
    """bitsandbytes' 4-bit CPU kernels need layers at least one block (64) wide."""
    reward = LocalMLLMReward(
        torch_dtype="float32",
        prompt=SHORT,
        max_pixels=56 * 56,
        tiny=TinyJudge(hidden=64, vision_hidden=64, warmup_steps=20),
    ).to("cpu")
    path = tmp_path_factory.mktemp("wide_judge")
    reward.judge.model.save_pretrained(path)
    reward.judge.processor.save_pretrained(path)
    return reward, path


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_bitsandbytes_loading_on_cpu(wide_judge, bits):
    local, path = wide_judge
    q = LocalMLLMReward(str(path), torch_dtype="float32", quantization=bits, prompt=SHORT, max_pixels=56 * 56)
    q.to("cpu")
    assert any(
        "bnb" in type(m).__module__ or "Linear8bit" in type(m).__name__ or "Linear4bit" in type(m).__name__
        for m in q.judge.model.modules()
    )
    s = q.score(inputs())
    assert torch.isfinite(s).all()
    assert float((s - local.score(inputs())).abs().max()) < 0.2  # quantised, so close but not equal


def test_trust_remote_code_is_off_by_default(monkeypatch, saved_judge):
    assert inspect.signature(LocalMLLMReward).parameters["trust_remote_code"].default is False
    seen = {}
    import transformers

    real = transformers.AutoProcessor.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy)
    MLLMJudge(str(saved_judge), torch_dtype="float32").load("cpu")
    assert seen["trust_remote_code"] is False


def test_sources_are_converted_once_and_pixels_limited():
    x = inputs(n=4, size=64)
    x.source_ids = [0, 0, 1, 1]
    pairs = judge_images(x, max_pixels=32 * 32)
    assert pairs[0][0] is pairs[1][0] and pairs[2][0] is pairs[3][0] and pairs[0][0] is not pairs[2][0]
    assert pairs[0][1].size == (32, 32)
    assert limit_pixels(Image.new("RGB", (300, 100)), 3000).size == (94, 31)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="torch_dtype"):
        LocalMLLMReward(torch_dtype="int8")
    with pytest.raises(ValueError, match="quantization"):
        LocalMLLMReward(quantization="2bit")
    with pytest.raises(ValueError, match="batch_size"):
        LocalMLLMReward(batch_size=0)
