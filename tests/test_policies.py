"""The EditPolicy contract, checked for every base model (tiny builds, no download).

A new base model joins this suite by adding one entry to ``CASES`` (see docs/adding_a_model.md):
it must encode once per prompt and reuse that for its group, give float32 velocities of the packed
latent shape that do not depend on batching, be deterministic, switch LoRA adapters (default / old /
reference), decode to images, follow its own diffusers pipeline's Euler sampling exactly, and run a
training step of ``editr1 fit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from editr1.policies import (
    EditPolicy,
    Flux2KleinPolicy,
    FluxKontextPolicy,
    QwenImageEditPolicy,
    TinyFlux2Klein,
    TinyQwenImage,
    lora,
)
from editr1.sampling import sample

PROMPTS = ["make the red circle blue", "remove the green square", "add a yellow triangle at top left"]


@dataclass
class Case:
    build: Callable[..., EditPolicy]
    res: int
    pipeline_latents: Callable  # (policy, PIL image, prompt, noise, steps) -> latents from the diffusers pipeline


def _flux_pipeline(p, image, prompt, noise, steps):
    return p.pipe(
        image=image,
        prompt=prompt,
        height=p.height,
        width=p.width,
        max_area=p.height * p.width,
        _auto_resize=False,
        num_inference_steps=steps,
        guidance_scale=2.5,
        max_sequence_length=p.max_sequence_length,
        latents=noise.clone(),
        output_type="latent",
    ).images


def _qwen_pipeline(p, image, prompt, noise, steps):
    # The pipelines resize condition images to a fixed ~1024² (384² for 2509's text encoder); pin those
    # sizes to the policy's so the comparison is like for like.
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    saved = edit.calculate_dimensions, plus.calculate_dimensions
    edit.calculate_dimensions = lambda area, ratio: (p.width, p.height, None)
    plus.calculate_dimensions = lambda area, ratio: (p.width, p.height)
    try:
        return p.pipe(
            image=image,
            prompt=prompt,
            height=p.height,
            width=p.width,
            num_inference_steps=steps,
            true_cfg_scale=1.0,
            latents=noise.clone(),
            output_type="latent",
        ).images
    finally:
        edit.calculate_dimensions, plus.calculate_dimensions = saved


def _klein_pipeline(p, image, prompt, noise, steps):
    """Flux2KleinPipeline without CFG (guidance_scale 1); its latents come back unpacked and denormalised, so
    they are packed and normalised again here (and the noise goes in in the pipeline's own layout)."""
    h, w = p.latent_h // 2, p.latent_w // 2
    grid = p.pipe(
        image=image,
        prompt=prompt,
        height=p.height,
        width=p.width,
        num_inference_steps=steps,
        guidance_scale=1.0,
        max_sequence_length=p.max_sequence_length,
        text_encoder_out_layers=p.text_encoder_out_layers,
        latents=noise.transpose(1, 2).reshape(noise.shape[0], -1, h, w).clone(),
        output_type="latent",
    ).images
    patches = p.pipe._patchify_latents(grid)
    mean, std = p._bn_stats(patches)
    return p.pipe._pack_latents((patches - mean) / std)


CASES = {
    "flux_kontext": Case(
        lambda **kw: FluxKontextPolicy(resolution=32, max_sequence_length=16, **kw), 32, _flux_pipeline
    ),
    "qwen_image_edit": Case(lambda **kw: QwenImageEditPolicy(resolution=64, **kw), 64, _qwen_pipeline),
    "qwen_image_edit_2509": Case(
        lambda **kw: QwenImageEditPolicy(resolution=64, variant="edit_plus", **kw), 64, _qwen_pipeline
    ),
    "qwen_image_edit_2511": Case(
        lambda **kw: QwenImageEditPolicy(
            resolution=64, variant="edit_plus", tiny=TinyQwenImage(zero_cond_t=True), **kw
        ),
        64,
        _qwen_pipeline,
    ),
    # the pipeline takes images of 64 px or more: a three-stage VAE keeps the latents at 8 x 8 tokens
    "flux2_klein": Case(
        lambda **kw: Flux2KleinPolicy(
            resolution=64, max_sequence_length=64, tiny=TinyFlux2Klein(vae_channels=[8, 16, 16]), **kw
        ),
        64,
        _klein_pipeline,
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> tuple[Case, EditPolicy]:
    c = CASES[request.param]
    p = c.build()
    p.pipe.set_progress_bar_config(disable=True)
    return c, p


def _pil(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _noise(p: EditPolicy, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, *p.latent_shape()), generator=torch.Generator().manual_seed(seed))


def test_euler_rollout_matches_its_diffusers_pipeline(case):
    c, p = case
    image, noise = _pil(0, c.res), _noise(p)
    cond = p.encode(p.preprocess([image]), [PROMPTS[0]])
    ours = sample(lambda x, t: p.velocity(x, t, cond), noise, p.sigmas(3), "euler")
    expected = c.pipeline_latents(p, image, PROMPTS[0], noise, 3)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.sigmas(3), p.pipe.scheduler.sigmas.float().cpu(), atol=1e-7, rtol=0)


def test_group_shares_one_encoding(case):
    c, p = case
    images = p.preprocess([_pil(1, c.res), _pil(2, c.res)])
    cond = p.encode(images, PROMPTS[:2])
    assert len(cond) == 2
    index = [0, 0, 1, 1, 1]
    selected = cond.select(index)
    repeated = p.encode(images[index], [PROMPTS[i] for i in index])
    x, t = _noise(p, 5, seed=1), torch.tensor([0.9, 0.5, 0.9, 0.3, 0.1])
    torch.testing.assert_close(p.velocity(x, t, selected), p.velocity(x, t, repeated), atol=1e-5, rtol=1e-5)


def test_velocity_shape_batching_and_determinism(case):
    c, p = case
    images = p.preprocess([_pil(3, c.res), _pil(4, c.res), _pil(5, c.res)])
    cond = p.encode(images, PROMPTS)
    x, t = _noise(p, 3, seed=2), torch.tensor([1.0, 0.6, 0.2])
    v = p.velocity(x, t, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.equal(v, p.velocity(x, t, cond))
    for i in range(3):  # prompts of different lengths are padded in the batch; the padding must not leak
        single = p.velocity(x[i : i + 1], t[i : i + 1], p.encode(images[i : i + 1], [PROMPTS[i]]))
        torch.testing.assert_close(v[i : i + 1], single, atol=1e-5, rtol=1e-5)
    swapped = p.velocity(x, t, cond.select([1, 0, 2]))
    assert not torch.allclose(swapped[:2], v[:2], atol=1e-4)  # the condition matters
    assert not torch.allclose(v, p.velocity(x, t * 0.5, cond), atol=1e-5)  # so does σ


def test_adapters_default_old_and_reference(case):
    c, _ = case
    p = c.build()
    p.add_adapters(lora.LoraSettings(rank=4, alpha=8.0), [lora.DEFAULT, lora.OLD])
    cond = p.encode(p.preprocess([_pil(6, c.res)]), [PROMPTS[1]])
    x, t = _noise(p, seed=3), torch.tensor([0.7])
    base = p.velocity(x, t, cond)
    with torch.no_grad():  # move the trained adapter only
        for param in p.trainable_parameters():
            param.add_(0.05 * torch.randn_like(param))
    trained = p.velocity(x, t, cond)
    with p.adapter(lora.OLD):
        old = p.velocity(x, t, cond)
    with p.adapter(None):
        ref = p.velocity(x, t, cond)
    assert not torch.allclose(trained, base, atol=1e-5)
    torch.testing.assert_close(old, base, atol=1e-6, rtol=0)  # old untouched (B = 0 at init)
    torch.testing.assert_close(ref, base, atol=1e-6, rtol=0)  # adapters off = the base
    torch.testing.assert_close(p.velocity(x, t, cond), trained)  # back on default after the blocks
    names = {n for n, q in p.named_parameters() if q.requires_grad}
    assert names and all(f"lora_A.{lora.DEFAULT}" in n or f"lora_B.{lora.DEFAULT}" in n for n in names)
    loss = p.velocity(x, t, cond).square().mean()
    loss.backward()
    # every image-stream projection learns (the text stream of a last double block feeds nothing, so its
    # output projection may get no gradient, as in the full-size models)
    grads = {n: q.grad for n, q in p.named_parameters() if q.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".to_q." in n or ".to_v." in n)


def test_encode_images_and_decode(case):
    c, p = case
    images = p.preprocess([_pil(7, c.res), _pil(8, c.res)])
    z = p.encode_images(images)
    assert z.shape == (2, *p.latent_shape()) and z.dtype == torch.float32
    out = p.decode(z)
    assert out.shape == (2, 3, c.res, c.res) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    with pytest.raises(ValueError, match="preprocess"):
        p.encode_images(torch.rand(1, 3, c.res + 16, c.res))


def test_sigmas_end_at_zero_and_decrease(case):
    _, p = case
    s = p.sigmas(6)
    assert s.shape == (7,) and float(s[0]) == pytest.approx(1.0) and float(s[-1]) == 0.0
    assert torch.all(s[1:] < s[:-1])
    with pytest.raises(ValueError):
        p.sigmas(0)


def test_stays_frozen_and_in_eval_mode(case):
    _, p = case
    p.train()
    assert all(not m.training for m in p.modules())
    assert all(not q.requires_grad for q in p.parameters())


def test_bfloat16_base_trains_float32_adapters(case):
    c, _ = case
    p = c.build(torch_dtype="bfloat16")
    p.add_adapters(lora.LoraSettings(rank=4, alpha=8.0), [lora.DEFAULT, lora.OLD])
    assert p.transformer.dtype == torch.bfloat16
    assert {q.dtype for n, q in p.named_parameters() if "lora_" in n} == {torch.float32}
    cond = p.encode(p.preprocess([_pil(12, c.res)]), [PROMPTS[0]])
    v = p.velocity(_noise(p, seed=5), torch.tensor([0.5]), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(q.grad is None or q.grad.dtype == torch.float32 for q in p.trainable_parameters())


# ------------------------------------------------------------------------------------ Qwen specifics
def test_qwen_condition_resolution_is_configurable():
    p = QwenImageEditPolicy(resolution=64, condition_resolution=[28, 56])
    assert p.condition_hw == (28, 56)
    seen = []
    original = p.pipe.processor.__class__.__call__

    def spy(self, *args, **kwargs):
        imgs = kwargs.get("images")
        seen.extend(imgs if isinstance(imgs, list) else [imgs])
        return original(self, *args, **kwargs)

    p.pipe.processor.__class__.__call__ = spy
    try:
        p.encode(p.preprocess([_pil(9, 64)]), ["remove it"])
    finally:
        p.pipe.processor.__class__.__call__ = original
    assert [im.size for im in seen] == [(56, 28)]  # PIL size is (width, height)


def test_qwen_2509_takes_several_condition_images():
    p = QwenImageEditPolicy(resolution=64, variant="edit_plus")
    a, b = p.preprocess([_pil(10, 64)]), p.preprocess([_pil(11, 64)])
    one, two = p.encode_multi([a], ["put the cat on the sofa"]), p.encode_multi([a, b], ["put the cat on the sofa"])
    assert two["image_latents"].shape[1] == 2 * one["image_latents"].shape[1]
    assert two["prompt_embeds"].shape[1] > one["prompt_embeds"].shape[1]  # "Picture 2: <image>" in the prompt
    x, t = _noise(p, seed=4), torch.tensor([0.5])
    assert p.velocity(x, t, two).shape == x.shape
    assert not torch.allclose(p.velocity(x, t, one), p.velocity(x, t, two), atol=1e-5)
    with pytest.raises(ValueError, match="edit_plus"):
        QwenImageEditPolicy(resolution=64).encode_multi([a, b], ["x"])


def test_qwen_bad_settings():
    with pytest.raises(ValueError, match="variant"):
        QwenImageEditPolicy(resolution=64, variant="plus")
    with pytest.raises(ValueError, match="multiple of"):
        QwenImageEditPolicy(resolution=66)
    with pytest.raises(ValueError, match="head_dim"):
        TinyQwenImage(head_dim=12)


def test_qwen_tiny_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    p = QwenImageEditPolicy(resolution=64, tiny=TinyQwenImage(seed=1))
    state = {
        f"{n}.{k}": v.contiguous()
        for n in ("transformer", "vae", "text_encoder")
        for k, v in getattr(p, n).state_dict().items()
    }
    mean = ",".join(["0.5"] * p.latent_channels)
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"latents_mean": mean})
    q = QwenImageEditPolicy(resolution=64, tiny=TinyQwenImage(seed=2, weights=str(tmp_path / "w.safetensors")))
    assert list(q.vae.config.latents_mean) == [0.5] * p.latent_channels
    assert all(torch.equal(v, q.transformer.state_dict()[k]) for k, v in p.transformer.state_dict().items())


@pytest.mark.parametrize("name", ["flux", "qwen"])
def test_padded_encoding_and_idle_only_editing(name):
    """Sharded runs encode as many prompts on every process (the extra rows are dropped) and a process with
    nothing to edit still makes the others' calls: results of the real rows do not change."""
    from conftest import tiny_policy
    from editr1.editing import edit_images, encode_padded
    from editr1.policies import QwenImageEditPolicy

    policy = tiny_policy() if name == "flux" else QwenImageEditPolicy(resolution=32, condition_resolution=56)
    src = torch.rand(2, 3, policy.height, policy.width)
    prompts = ["make the red circle blue", "remove the green square"]
    plain = policy.encode(src, prompts)
    padded = encode_padded(policy, src, prompts, min_prompts=4)
    assert padded["prompt_embeds"].shape[0] == 4
    torch.testing.assert_close(padded.select([0, 1])["image_latents"], plain["image_latents"])
    a = edit_images(policy, src, prompts, [1, 2], steps=2, solver="euler", batch_size=2).images
    b = edit_images(policy, src, prompts, [1, 2], steps=2, solver="euler", batch_size=2, min_prompts=4).images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    calls = []
    forward = policy.velocity
    policy.velocity = lambda *a: calls.append(1) or forward(*a)
    empty = edit_images(policy, src[:0], [], [], steps=2, solver="euler", batch_size=2, min_prompts=3)
    del policy.velocity
    assert len(calls) == 2 * 2  # the chunks 3 prompts would take (2 of batch 2) × 2 steps
    assert empty.images.shape == (0, 3, policy.height, policy.width) and empty.x0.shape[0] == 0
    with pytest.raises(ValueError, match="nothing to edit"):
        edit_images(policy, src[:0], [], [], steps=2, solver="euler", batch_size=2)


def test_policies_do_not_import_the_data_package():
    """The tiny policies' word lists come from editr1.scene_vocabulary, not editr1.data (no import cycle)."""
    import subprocess
    import sys

    code = (
        "import sys, editr1.policies; bad = sorted(m for m in sys.modules if m.startswith('editr1.data')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
