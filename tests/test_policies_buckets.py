"""Policies at a batch's size (aspect-ratio buckets): ``policy.at_size(h, w)`` is the policy built at that
resolution, condition images are prepared as each model's own diffusers pipeline prepares them (Qwen-Image-Edit
2509/2511: the text encoder's picture at ``CONDITION_IMAGE_SIZE`` with the aspect kept, the VAE's at the bucket;
FLUX.2 klein: cropped to a multiple of 16), and a CPU fit with buckets on over mixed sizes and multi-image rows
for each multi-image model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editr1.editing import edit_images
from editr1.images import to_tensor_images
from editr1.policies import Flux2KleinPolicy, QwenImageEditPolicy, TinyQwenImage

PROMPT = "put the cat from picture 2 on the sofa"
SHAPES = [(192, 320), (352, 192)]  # (height, width): 320×192 and 192×352 images


def _pil(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _qwen(zero_cond_t: bool = False, resolution=32, **kw) -> QwenImageEditPolicy:
    tiny = TinyQwenImage(zero_cond_t=zero_cond_t)
    return QwenImageEditPolicy(resolution=resolution, variant="edit_plus", tiny=tiny, **kw)


def _qwen_res(resolution) -> QwenImageEditPolicy:
    return _qwen(resolution=resolution, condition_area=56 * 56)


def test_at_size_is_the_policy_built_at_that_size_and_restores_it():
    for make in (lambda res: Flux2KleinPolicy(resolution=res, max_sequence_length=40), _qwen_res):
        square, built = make(32), make([24, 40])
        sources = to_tensor_images([_pil(30, 50, 0), _pil(24, 40, 1)], 24, 40)
        refs = [[_pil(24, 40, 2)], []]
        kw = dict(steps=2, solver="euler", batch_size=4, references=refs)
        with square.at_size(24, 40):
            assert square.latent_shape() == built.latent_shape() and square.spatial_multiple == 4
            a = edit_images(square, sources, [PROMPT, "make it red"], [1, 2], **kw)
            torch.testing.assert_close(square.sigmas(3), built.sigmas(3))
        b = edit_images(built, sources, [PROMPT, "make it red"], [1, 2], **kw)
        assert a.images.shape == (2, 3, 24, 40)
        torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=1e-5)
        assert (square.height, square.width, square.latent_h) == (32, 32, 16)  # back to the configured size
        with pytest.raises(ValueError, match="multiples of 4"), square.at_size(30, 40):
            pass


def test_qwen_condition_size_is_the_pipelines_calculate_dimensions():
    p = _qwen(condition_area=384 * 384)
    # 384² at w/h = 5/3: w = 495.7 -> 15 · 32 = 480, h = 297.4 -> 9 · 32 = 288; at 6/11: w 283.6 -> 288, h 520 -> 512
    assert p.condition_size(192, 320) == (288, 480) and p.condition_size(352, 192) == (512, 288)
    assert p.condition_size(512, 512) == (384, 384) and p.condition_hw == (384, 384)
    assert _qwen().condition_size(24, 40) == (24, 40)  # neither: the image's own size
    assert _qwen(condition_resolution=56).condition_size(24, 40) == (56, 56)
    with pytest.raises(ValueError, match="not both"):
        _qwen(condition_resolution=56, condition_area=3136)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511"])
@pytest.mark.parametrize("shape", SHAPES, ids=["320x192", "192x352"])
def test_qwen_plus_condition_images_match_the_pipelines(shape, zero_cond_t, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    h, w = shape
    p = _qwen(zero_cond_t, condition_area=plus.CONDITION_IMAGE_SIZE)
    images = [_pil(h, w, 3), _pil(h, w, 4)]  # the edited image and a reference, at the bucket's shape
    seen: dict[str, list] = {"ours": [], "pipe": []}
    encode_prompt = p.pipe.encode_prompt

    def record(who):
        def fn(*args, **kw):
            seen[who].append([np.asarray(im) for im in kw["image"]])
            return encode_prompt(*args, **kw)

        return fn

    # ours: the bucket's tensors through the policy
    monkeypatch.setattr(p.pipe, "encode_prompt", record("ours"))
    vae_in = []
    vae_encode = p.vae.encode
    monkeypatch.setattr(p.vae, "encode", lambda x, *a, **k: vae_in.append(x) or vae_encode(x, *a, **k))
    with p.at_size(h, w):
        p.encode_multi([p.preprocess([im]) for im in images], [PROMPT])
    # the pipeline's own preprocessing (its VAE size pinned to the bucket: ours is the training size, never 1024²)
    monkeypatch.setattr(p.pipe, "encode_prompt", record("pipe"))
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", h * w)
    pipe_vae = []

    def stop(images, *a, **k):
        pipe_vae.extend(images)
        raise _Stop

    monkeypatch.setattr(p.pipe, "prepare_latents", stop)
    with pytest.raises(_Stop):
        p.pipe(image=images, prompt=PROMPT, height=h, width=w, num_inference_steps=1, true_cfg_scale=1.0)
    ch, cw = p.condition_size(h, w)
    assert [im.shape for im in seen["ours"][0]] == [(ch, cw, 3)] * 2
    for ours, theirs in zip(seen["ours"][0], seen["pipe"][0], strict=True):
        np.testing.assert_array_equal(ours, theirs)
    for ours, theirs in zip(vae_in, pipe_vae, strict=True):
        torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=["320x192", "192x352"])
def test_flux2_klein_condition_images_match_the_pipelines(shape, monkeypatch):
    h, w = shape
    p = Flux2KleinPolicy(resolution=32, max_sequence_length=40)
    images = [_pil(h, w, 5), _pil(h, w, 6)]
    with p.at_size(h, w):
        ours = p.encode_multi([p.preprocess([im]) for im in images], [PROMPT])["image_latents"]
    prepare = p.pipe.prepare_image_latents
    got = {}

    def stop(images, *a, **k):
        got["inputs"] = images
        got["latents"] = prepare(images, *a, **k)[0]
        raise _Stop

    monkeypatch.setattr(p.pipe, "prepare_image_latents", stop)
    with pytest.raises(_Stop):
        p.pipe(
            image=images,
            prompt=PROMPT,
            height=h,
            width=w,
            num_inference_steps=1,
            max_sequence_length=40,
            text_encoder_out_layers=p.text_encoder_out_layers,
        )
    assert [tuple(x.shape[-2:]) for x in got["inputs"]] == [(h, w)] * 2
    torch.testing.assert_close(ours, got["latents"].float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- smoke fits
def _folder(root):
    """Two aspect ratios (wide 48×32, tall 30×45) of several sizes; rows with 0 and 1 references, references of
    another aspect ratio than their row's (cropped to the row's bucket)."""
    (root / "images").mkdir(parents=True)
    sizes = {"wide": (48, 32), "wide2": (75, 50), "tall": (30, 45), "tall2": (40, 60), "square": (20, 20)}
    for n, (name, (w, h)) in enumerate(sizes.items()):
        _pil(h, w, n).save(root / "images" / f"{name}.png")
    rows = [
        {"prompt": "put picture 2 in it", "image": ["images/wide.png", "images/square.png"]},
        {"prompt": "make it red", "image": "images/wide2.png"},
        {"prompt": "put picture 2 in it", "image": ["images/tall.png", "images/wide.png"]},
        {"prompt": "make it blue", "image": "images/tall2.png"},
    ]
    (root / "train_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


MODELS = {
    "flux2_klein": lambda: Flux2KleinPolicy(resolution=32, max_sequence_length=40),
    "qwen_image_edit_2509": lambda: _qwen(condition_area=56 * 56),
    "qwen_image_edit_2511": lambda: _qwen(True, condition_area=56 * 56),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_bucketed_fit_on_mixed_sizes_and_multi_image_rows(name, tmp_path):
    from conftest import small_module, small_trainer
    from editr1.callbacks import RewardCallback
    from editr1.data import EditDataModule
    from editr1.rewards.base import RewardModel
    from editr1.settings import RolloutSettings

    class Shapes(RewardModel):
        seen: list = []

        def score(self, inputs):
            refs = inputs.references or [[]] * len(inputs.instructions)
            self.seen.append((tuple(inputs.edits.shape[2:]), tuple(inputs.sources.shape[2:]), sorted(map(len, refs))))
            return inputs.edits.mean(dim=(1, 2, 3))

    reward = Shapes()
    module = small_module(policy=MODELS[name](), rollout=RolloutSettings(group_size=2, steps=2, batch_size=8))
    trainer = small_trainer([RewardCallback(model=reward, log_images_every_n_steps=0)], max_steps=2)
    dm = EditDataModule(path=str(_folder(tmp_path / "data")), batch_size=2, shuffle=False, buckets=True)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    # 32² buckets at the tiny models' multiple of 4: 48×32 and 75×50 -> 3:2 (28×40), 30×45 and 40×60 -> 2:3 (40×28)
    assert sorted((edit, refs) for edit, source, refs in reward.seen if edit == source) == [
        ((28, 40), [0, 0, 1, 1]),
        ((40, 28), [0, 0, 1, 1]),
    ]
    assert (module.policy.height, module.policy.width) == (32, 32)  # validation and predict: the model's size


def test_a_bucketed_run_stopped_and_resumed_sees_the_batches_of_an_uninterrupted_one(tmp_path):
    """Resume from a checkpoint mid-epoch with several buckets: the same prompts at the same shapes, the same
    adapters at the end (in-process; tests/test_resume.py kills real processes without buckets)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from conftest import small_module, small_trainer
    from editr1.callbacks import RewardCallback
    from editr1.data import EditDataModule
    from editr1.rewards.base import RewardModel
    from editr1.settings import RolloutSettings

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rows = []
    for n, (w, h) in enumerate([(48, 32), (30, 45), (40, 40), (64, 40), (33, 50), (20, 20)] * 2):
        _pil(h, w, n).save(root / "images" / f"{n}.png")
        rows.append({"prompt": f"edit {n}", "image": f"images/{n}.png"})
    (root / "train_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def run(max_steps: int, ckpt: str | None = None, save: bool = False):
        class Seen(RewardModel):
            def score(self, inputs):
                seen.append((tuple(inputs.edits.shape[2:]), sorted(set(inputs.instructions))))
                return inputs.edits.mean(dim=(1, 2, 3))

        seen: list = []
        torch.manual_seed(0)  # each run as a fresh process: the same LoRA initialisation
        module = small_module(rollout=RolloutSettings(group_size=2, steps=2, batch_size=8))
        callbacks = [RewardCallback(model=Seen(), log_images_every_n_steps=0)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1))
        trainer = small_trainer(callbacks, max_steps=max_steps, enable_checkpointing=save)
        dm = EditDataModule(path=str(root), batch_size=2, seed=3, buckets=True)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        weights = {k: v.clone() for k, v in module.state_dict().items() if "lora_" in k}
        return seen, weights

    full, full_weights = run(3)
    assert len({shape for shape, _ in full}) > 1  # several buckets in three steps
    first, _ = run(1, save=True)
    rest, weights = run(3, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert first + rest == full
    for k, v in full_weights.items():
        torch.testing.assert_close(weights[k], v, atol=0, rtol=0)
