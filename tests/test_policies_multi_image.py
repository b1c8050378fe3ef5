"""Rows with different numbers of images through the policies (``EditPolicy.encode_rows`` and
``velocity_by_image_count``) and ``edit_images``: a mixed batch gives each row what it would get alone, and
single-image models refuse references with a clear error instead of dropping them."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_policy
from editr1.editing import edit_images, encode_padded
from editr1.policies import Flux2KleinPolicy, QwenImageEditPolicy

PROMPTS = ["put picture 2 on picture 1", "make it red", "blend pictures 2 and 3 in"]


def _images(seed: int, n: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["flux2_klein", "qwen_image_edit_2509"])
def policy(request):
    if request.param == "flux2_klein":
        return Flux2KleinPolicy(resolution=32, max_sequence_length=40)
    return QwenImageEditPolicy(resolution=32, variant="edit_plus", condition_resolution=56)


def test_a_batch_of_rows_with_0_1_and_2_references_equals_each_row_alone(policy):
    sources = _images(0, 3)
    references = [_images(1, 1), None, _images(2, 2)]
    cond = policy.encode_rows(sources, references, PROMPTS)
    assert cond["image_count"].tolist() == [2, 1, 3]
    tokens = policy.latent_shape()[0]
    assert cond["image_latents"].shape[1] == 3 * tokens
    assert cond["image_latents"][1, tokens:].abs().sum() == 0  # padding past the row's own image
    x = torch.randn((4, *policy.latent_shape()), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.9, 0.6, 0.3, 0.6])
    index = [0, 1, 2, 1]  # select() keeps working: samples of groups with different counts in one call
    mixed = policy.velocity(x, t, cond.select(index))
    for j, i in enumerate(index):
        pictures = [sources[i : i + 1]] + ([] if references[i] is None else list(references[i][:, None]))
        alone = policy.velocity(x[j : j + 1], t[j : j + 1], policy.encode_multi(pictures, [PROMPTS[i]]))
        torch.testing.assert_close(mixed[j : j + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[1], policy.velocity(x[1:2], t[1:2], cond.select([0]))[0], atol=1e-4)


def test_edit_images_takes_references_and_pads_them_for_sharded_runs():
    policy = Flux2KleinPolicy(resolution=32, max_sequence_length=40)  # the editing path is policy-independent
    sources, refs = _images(4, 2), [[_images(5, 1)[0]], []]
    a = edit_images(policy, sources, PROMPTS[:2], [1, 2], steps=2, solver="euler", batch_size=2, references=refs)
    assert a.cond["image_count"].tolist() == [2, 1]
    b = edit_images(
        policy, sources, PROMPTS[:2], [1, 2], steps=2, solver="euler", batch_size=1, references=refs, min_prompts=3
    )
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=1e-5)
    alone = edit_images(policy, sources[1:], PROMPTS[1:2], [2], steps=2, solver="euler", batch_size=1)
    torch.testing.assert_close(a.images[1:], alone.images, atol=1e-5, rtol=1e-5)
    plain = encode_padded(policy, sources, PROMPTS[:2], references=[[], None])  # no references at all: encode
    assert "image_count" not in plain.tensors
    calls = []
    encode_prompt = policy.pipe.encode_prompt
    policy.pipe.encode_prompt = lambda **kw: calls.append(len(kw["prompt"])) or encode_prompt(**kw)
    try:  # one text-encoder call for a batch with mixed image counts (sharded encoders: the same on every process)
        policy.encode_rows(_images(8, 3), [_images(9, 2), None, _images(9, 1)], PROMPTS)
    finally:
        del policy.pipe.encode_prompt
    assert calls == [3]
    mixed = policy.encode_rows(_images(8, 2), [_images(9, 1), None], PROMPTS[:2])
    x, t = torch.randn((2, *policy.latent_shape())), torch.tensor([0.5, 0.5])

    class Sharded(torch.nn.Parameter):
        def full_tensor(self):  # what FSDP2's DTensor parameters have
            return self

    parameters = policy.transformer.parameters
    policy.transformer.parameters = lambda *a, **k: iter([Sharded(torch.zeros(1))])
    try:  # one call per count would differ between processes: a clear error, not a hang
        with pytest.raises(ValueError, match="shard: false"):
            policy.velocity(x, t, mixed)
        policy.velocity(x[:1], t[:1], mixed.select([0]))  # one count per call is fine
    finally:
        policy.transformer.parameters = parameters


def test_single_image_models_refuse_references_with_a_clear_error():
    sources, refs = _images(6, 2), [_images(7, 1), None]
    for p in (tiny_policy(), QwenImageEditPolicy(resolution=32, condition_resolution=56)):
        assert p.max_condition_images == 1
        with pytest.raises(ValueError, match=r"at most 1 condition image.*data.references: skip"):
            p.encode_rows(sources, refs, PROMPTS[:2])
        assert "image_count" not in p.encode_rows(sources, [None, None], PROMPTS[:2]).tensors
    with pytest.raises(ValueError, match="1 reference lists but 2 prompts"):
        tiny_policy().encode_rows(sources, [None], PROMPTS[:2])


def _mixed_folder(root):
    """Images of four sizes; two rows with references (1 and 2), two without, one with a missing reference."""
    import json

    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"sofa": (48, 32), "cat": (20, 30), "dog": (64, 64), "room": (33, 57)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    rows = [
        {"prompt": "put the cat from picture 2 on the sofa", "image": ["images/sofa.png", "images/cat.png"]},
        {"prompt": "make the room red", "image": "images/room.png"},
        {"prompt": "put pictures 2 and 3 in it", "image": ["images/room.png", "images/dog.png", "images/cat.png"]},
        {"prompt": "remove the dog", "image": "images/dog.png"},
        {"prompt": "bad reference", "image": ["images/sofa.png", "images/missing.png"]},
    ]
    (root / "train_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


class _Brightness:
    """A reward that records which reference images it was shown (mean brightness of the edit)."""

    def __new__(cls):
        from editr1.rewards.base import RewardModel

        class Reward(RewardModel):
            seen: list = []

            def score(self, inputs):
                self.seen.extend(len(r or []) for r in (inputs.references or [None] * len(inputs.instructions)))
                return inputs.edits.mean(dim=(1, 2, 3))

        return Reward()


def test_a_fit_step_on_mixed_sizes_and_multi_image_rows(tmp_path):
    from conftest import small_module, small_trainer
    from editr1.callbacks import RewardCallback
    from editr1.data import EditDataModule
    from editr1.settings import RolloutSettings

    folder = _mixed_folder(tmp_path / "data")
    reward = _Brightness()
    rollout = RolloutSettings(group_size=2, steps=2, batch_size=8)
    module = small_module(policy=Flux2KleinPolicy(resolution=32, max_sequence_length=40), rollout=rollout)
    callback = RewardCallback(model=reward, log_images_every_n_steps=0)
    trainer = small_trainer([callback], max_steps=1)
    trainer.fit(module, datamodule=EditDataModule(path=str(folder), batch_size=4, shuffle=False))
    assert trainer.global_step == 1
    assert sorted(reward.seen) == [0, 0, 0, 0, 1, 1, 2, 2]  # K = 2 edits of 4 prompts, in one rollout
    assert callback.counts["data_skipped/missing_reference_file"] == 1
    # predict/test inputs in the same format: every row edited with its own references
    from editr1.data.datamodule import collate_prompts
    from editr1.data.jsonl import JsonlEditDataset

    batch = collate_prompts([JsonlEditDataset(folder)[i] for i in range(4)])
    out = module.predict_step(batch, 0)
    assert out["edits"].shape == (4, 3, 32, 32) and [len(r) for r in out["references"]] == [1, 0, 2, 0]
    # a single-image model refuses the rows before the first step (data.references: skip drops and counts them,
    # test_data_multi_image.py)
    kontext = small_trainer([RewardCallback(model=_Brightness(), log_images_every_n_steps=0)], max_steps=1)
    with pytest.raises(ValueError, match="2 training rows have reference images.*data.references: skip"):
        kontext.fit(small_module(), datamodule=EditDataModule(path=str(folder), batch_size=2))
