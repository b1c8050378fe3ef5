"""The demo judge's pieces: its answer digits, its edit kinds, and a trained judge's weights file (BPE tokenizer in
the metadata) loading back into the real reward path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from editr1.demo_judge import Batcher, Example, perturb, reward_to_digit, save, train_tokenizer
from editr1.rewards.base import RewardInputs
from editr1.rewards.mllm import LocalMLLMReward
from editr1.rewards.scoring import digit_token_ids
from editr1.rewards.tiny_judge import TinyJudge, build_tiny_judge

SMALL = TinyJudge(
    hidden=32, layers=1, heads=2, vision_hidden=32, patch_size=4, min_pixels=32 * 32, max_pixels=32 * 32, warmup_steps=0
)


def test_reward_to_digit_by_hand():
    r = torch.tensor([0.0, 0.5, 0.54, 0.56, 0.74, 0.87, 0.96, 1.0])
    # 10 (r - 0.5) = -5, 0, 0.4, 0.6, 2.4, 3.7, 4.6, 5 -> rounded and clamped to 0..5
    assert reward_to_digit(r).tolist() == [0, 0, 0, 1, 2, 4, 5, 5]


def test_edit_kinds():
    g = torch.Generator().manual_seed(0)
    source = torch.zeros(3, 8, 8)
    target = source.clone()
    target[0, :4, :4] = 1.0  # the edited region turns red
    rollout = torch.full((3, 8, 8), 0.25)
    assert torch.equal(perturb("identity", source, target, rollout, g), source)
    assert torch.equal(perturb("target", source, target, rollout, g), target)
    assert torch.equal(perturb("rollout", source, target, rollout, g), rollout)
    blend = perturb("blend", source, target, rollout, g)
    assert bool(((blend >= source) & (blend <= target)).all())
    wrong = perturb("wrong_colour", source, target, rollout, g)
    assert torch.equal(wrong[:, 4:, :], target[:, 4:, :])  # outside the edited region: untouched
    assert wrong[0, 0, 0] == 0 and wrong[:, 0, 0].sum() == 1  # inside: the red moved to another channel
    with pytest.raises(ValueError, match="unknown edit kind"):
        perturb("sharpen", source, target, rollout, g)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spec = train_tokenizer(vocab_size=400, scenes=40)
    model, processor = build_tiny_judge(SMALL, tokenizer=spec)
    path = tmp_path_factory.mktemp("judge") / "model.safetensors"
    save(model, spec, SMALL, path)
    return model, processor, spec, path


def test_bpe_tokenizer_keeps_digits_single_and_shortens_the_prompt(trained):
    _, processor, spec, _ = trained
    assert len(digit_token_ids(processor.tokenizer)) == 6
    byte_level = build_tiny_judge(dataclasses.replace(SMALL))[1]
    text = "Recolor the red circle at the top left to blue."
    assert len(processor.tokenizer.encode(text)) < 0.6 * len(byte_level.tokenizer.encode(text))
    assert processor.tokenizer.decode(processor.tokenizer.encode(text)) == text


def test_weights_file_loads_back_with_its_tokenizer(trained):
    model, processor, _, path = trained
    loaded, loaded_proc = build_tiny_judge(dataclasses.replace(SMALL, weights=str(path)))
    src, edit = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    ex = [Example(src, edit, "Remove the red circle.", "Only the red circle goes.", 0.7, "rollout")]
    a = model.eval()(**Batcher(processor)(ex)).logits
    b = loaded(**Batcher(loaded_proc)(ex)).logits
    torch.testing.assert_close(a, b)
    # the real reward path reads it: one score in [0, 1]
    reward = LocalMLLMReward(torch_dtype="float32", tiny=dataclasses.replace(SMALL, weights=str(path)))
    inputs = RewardInputs(
        edits=edit[None], sources=src[None], instructions=["Remove the red circle."], requirements=["Only it."]
    )
    score = reward.score(inputs)
    assert score.shape == (1,) and 0 <= float(score[0]) <= 1


def test_weights_of_other_sizes_are_a_clear_error(trained):
    *_, path = trained
    with pytest.raises(ValueError, match="do not fit a judge of the given sizes"):
        build_tiny_judge(dataclasses.replace(SMALL, hidden=64, weights=str(path)))


def test_training_script_end_to_end_at_toy_size(tmp_path):
    """Two steps on two scenes, the first from the easy kinds: the weights (with their prompt and sizes) and the
    metrics are written, and the file serves as a reward with its own sizes."""
    import json

    from safetensors import safe_open

    from editr1.demo_judge import train
    from editr1.rewards.tiny_judge import tiny_judge_from_file

    prompt = "Instruction: {instruction}. Requirement: {requirement}. Score 0-5."
    metrics = train(
        tmp_path,
        steps=2,
        scenes=2,
        batch=4,
        lr=1e-3,
        seed=0,
        eval_scenes=1,
        log=lambda *_: None,
        curriculum=1,
        prompt=prompt,
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["curriculum"] == 1 and saved["prompt"] == prompt and saved["train_examples"] == 8
    assert set(metrics["heldout"]) >= {"spearman", "exact_digit_accuracy", "within_one_accuracy"}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["prompt"] == prompt
    cfg = tiny_judge_from_file(str(tmp_path / "model.safetensors"))
    reward = LocalMLLMReward(torch_dtype="float32", tiny=cfg, prompt=prompt)
    src, edit = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    score = reward.score(RewardInputs(edits=edit, sources=src, instructions=["Remove it."], requirements=["x"]))
    assert score.shape == (1,) and 0 <= float(score[0]) <= 1
