"""Tests for the FLUX.1-Kontext policy (editr1.policies.flux_kontext) and the tiny in-code
components it is built from (editr1.policies.tiny).

The central check runs diffusers' own FluxKontextPipeline on the same tiny weights and noise and
requires our encode → velocity → Euler rollout to land on the same latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer, T5Tokenizer

from editr1.data.scenes import vocabulary
from editr1.policies.flux_kontext import FluxKontextPolicy, TinyFlux, build_tiny_pipeline
from editr1.policies.tiny import LETTERS, clip_tokenizer, t5_tokenizer
from editr1.sampling import sample

RES = 32
SEQ = 16
PROMPTS = ["make the red circle blue", "remove the green square", "add a yellow triangle at top left"]


@pytest.fixture(scope="module")
def policy() -> FluxKontextPolicy:
    return FluxKontextPolicy(resolution=RES, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def wide() -> FluxKontextPolicy:
    return FluxKontextPolicy(resolution=[32, 48], max_sequence_length=SEQ)


def _pil(seed: int, height: int = RES, width: int = RES) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _noise(p: FluxKontextPolicy, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, *p.latent_shape()), generator=torch.Generator().manual_seed(seed))


def _pipeline_latents(p: FluxKontextPolicy, image, prompt, noise, steps, height, width) -> torch.Tensor:
    return p.pipe(
        image=image,
        prompt=prompt,
        height=height,
        width=width,
        max_area=height * width,
        _auto_resize=False,
        num_inference_steps=steps,
        guidance_scale=2.5,
        max_sequence_length=SEQ,
        latents=noise.clone(),
        output_type="latent",
    ).images


def _rollout(p: FluxKontextPolicy, image, prompt, noise, steps) -> torch.Tensor:
    cond = p.encode(p.preprocess([image]), [prompt])
    return sample(lambda x, t: p.velocity(x, t, cond), noise, p.sigmas(steps), "euler")


# ------------------------------------------------------------------------------- against diffusers
def test_euler_rollout_matches_diffusers_pipeline(policy):
    p = policy
    p.pipe.set_progress_bar_config(disable=True)
    image, prompt, noise = _pil(0), PROMPTS[0], _noise(p)
    ours = _rollout(p, image, prompt, noise, 4)
    expected = _pipeline_latents(p, image, prompt, noise, 4, RES, RES)
    assert ours.shape == expected.shape == (1, *p.latent_shape())
    assert ours.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-5)
    # the pipeline used exactly our σ schedule
    torch.testing.assert_close(p.sigmas(4), p.pipe.scheduler.sigmas.float().cpu(), atol=1e-7, rtol=0)


def test_non_square_rollout_matches_pipeline(wide):
    p = wide
    p.pipe.set_progress_bar_config(disable=True)
    image, prompt, noise = _pil(1, 32, 48), PROMPTS[1], _noise(wide, seed=1)
    ours = _rollout(p, image, prompt, noise, 2)
    expected = _pipeline_latents(p, image, prompt, noise, 2, 32, 48)
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-5)
    # μ of the time shift depends on the latent sequence length, so the schedules differ by resolution
    torch.testing.assert_close(p.sigmas(2), p.pipe.scheduler.sigmas.float().cpu(), atol=1e-7, rtol=0)


def test_sigmas_shape_and_shift(policy, wide):
    for n in (1, 6, 28):
        s = policy.sigmas(n)
        assert s.shape == (n + 1,) and s.dtype == torch.float32
        assert float(s[0]) == pytest.approx(1.0) and float(s[-1]) == 0.0
        assert torch.all(s[1:] < s[:-1])
    assert not torch.allclose(policy.sigmas(6), wide.sigmas(6))  # resolution-dependent shift
    unshifted = torch.cat([torch.linspace(1.0, 1 / 6, 6), torch.zeros(1)])
    assert not torch.allclose(policy.sigmas(6), unshifted, atol=1e-3)
    with pytest.raises(ValueError):
        policy.sigmas(0)


# ------------------------------------------------------------------------------- resolution
def test_resolution_from_config(wide):
    assert (wide.height, wide.width) == (32, 48)
    assert wide.latent_shape() == ((32 // 4) * (48 // 4), 16)
    latents = wide.encode_images(torch.rand(2, 3, 32, 48))
    assert latents.shape == (2, *wide.latent_shape()) and latents.dtype == torch.float32
    images = wide.decode(_noise(wide, batch=2))
    assert images.shape == (2, 3, 32, 48) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    cond = wide.encode(wide.preprocess([_pil(2, 100, 70)]), [PROMPTS[0]])
    v = wide.velocity(_noise(wide), torch.tensor([0.5]), cond)
    assert v.shape == (1, *wide.latent_shape())


def test_latents_are_packed_vae_latents(policy):
    """encode_images packs the VAE's latents in 2x2 patches and decode unpacks them again."""
    images = torch.zeros(1, 3, RES, RES)
    images[:, :, :, : RES // 2] = 1.0  # left half white
    lat = policy.encode_images(images)
    unpacked = policy.pipe._unpack_latents(lat, RES, RES, policy.vae_scale_factor)
    direct = policy.vae.encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(unpacked, direct)
    decoded = ((policy.vae.decode(direct).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(policy.decode(lat), decoded)


@pytest.mark.parametrize("resolution", [30, [32, 34], [18, 32]])
def test_bad_resolution_raises(resolution):
    with pytest.raises(ValueError, match="multiple of 4"):
        FluxKontextPolicy(resolution=resolution, max_sequence_length=SEQ)


def test_wrong_image_size_raises(policy):
    with pytest.raises(ValueError, match="preprocess"):
        policy.encode_images(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="prompts"):
        policy.encode(torch.rand(2, 3, RES, RES), [PROMPTS[0]])


# ------------------------------------------------------------------------------- preprocessing
def test_preprocess_any_size_and_mode(policy):
    rgba = Image.new("RGBA", (50, 70), (10, 200, 30, 128))
    gray = Image.new("L", (9, 13), 77)
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    large = _pil(3, 600, 400)
    out = policy.preprocess([rgba, gray, pal, large, torch.rand(3, 20, 20)])
    assert out.shape == (5, 3, RES, RES) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[1], torch.full((3, RES, RES), 77 / 255), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[2], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, RES, RES), atol=2e-3, rtol=0)


def test_preprocess_keeps_aspect_and_centre_crops(policy):
    """A 64x32 (w x h) image: black | white | black quarters → its centre half, all white."""
    a = np.zeros((32, 64, 3), dtype=np.uint8)
    a[:, 16:48] = 255
    out = policy.preprocess([Image.fromarray(a)])
    assert out.shape == (1, 3, RES, RES)
    assert out.min() > 0.95


def test_preprocess_errors(policy):
    with pytest.raises(ValueError):
        policy.preprocess([])
    with pytest.raises(ValueError):
        policy.preprocess([torch.rand(1, 8, 8)])
    with pytest.raises(TypeError):
        policy.preprocess([np.zeros((8, 8, 3))])


# ------------------------------------------------------------------------------- conditions
def test_condition_select_equals_repeated_encoding(policy):
    images = policy.preprocess([_pil(4), _pil(5)])
    cond = policy.encode(images, PROMPTS[:2])
    index = [0, 0, 1, 1, 1]
    selected = cond.select(index)
    repeated = policy.encode(images[index], [PROMPTS[i] for i in index])
    assert len(selected) == 5
    x, t = _noise(policy, batch=5, seed=3), torch.tensor([0.9, 0.5, 0.9, 0.3, 0.1])
    torch.testing.assert_close(policy.velocity(x, t, selected), policy.velocity(x, t, repeated), atol=1e-5, rtol=1e-5)


def test_batched_velocity_equals_per_sample(policy):
    images = policy.preprocess([_pil(6), _pil(7), _pil(8)])
    cond = policy.encode(images, PROMPTS)
    x, t = _noise(policy, batch=3, seed=4), torch.tensor([1.0, 0.6, 0.2])
    batched = policy.velocity(x, t, cond)
    for i in range(3):
        single = policy.velocity(x[i : i + 1], t[i : i + 1], policy.encode(images[i : i + 1], [PROMPTS[i]]))
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)
    # the condition matters: prompts and source images change the velocity
    swapped = policy.velocity(x, t, cond.select([1, 0, 2]))
    assert not torch.allclose(swapped[:2], batched[:2], atol=1e-4)


def test_velocity_deterministic_and_float32(policy):
    cond = policy.encode(policy.preprocess([_pil(9)]), [PROMPTS[2]])
    x, t = _noise(policy, seed=5), torch.tensor([0.4])
    a, b = policy.velocity(x, t, cond), policy.velocity(x, t, cond)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.allclose(a, policy.velocity(x, torch.tensor([0.8]), cond), atol=1e-5)


# ------------------------------------------------------------------------------- building/loading
def _state(p: FluxKontextPolicy) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
        for k, v in getattr(p, name).state_dict().items()
    }


def test_save_pretrained_round_trip(policy, tmp_path):
    policy.pipe.save_pretrained(tmp_path)
    loaded = FluxKontextPolicy(pretrained_model_name_or_path=str(tmp_path), resolution=RES, max_sequence_length=SEQ)
    assert all(not m.training for m in loaded.modules())
    images = policy.preprocess([_pil(10), _pil(11)])
    x, t = _noise(policy, batch=2, seed=6), torch.tensor([0.7, 0.3])
    a = policy.velocity(x, t, policy.encode(images, PROMPTS[:2]))
    b = loaded.velocity(x, t, loaded.encode(images, PROMPTS[:2]))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.sigmas(6), policy.sigmas(6))


def test_stays_in_eval_mode(policy):
    out = policy.train()
    assert out is policy
    assert not policy.training
    assert all(not m.training for m in policy.modules())
    assert all(not p.requires_grad for p in policy.parameters())


def test_bfloat16_builds_and_runs(policy):
    p = FluxKontextPolicy(resolution=RES, max_sequence_length=SEQ, torch_dtype="bfloat16")
    assert p.transformer.dtype == torch.bfloat16 and p.vae.dtype == torch.bfloat16
    images = p.preprocess([_pil(12)])
    cond = p.encode(images, [PROMPTS[0]])
    x, t = _noise(p, seed=7), torch.tensor([0.5])
    v = p.velocity(x, t, cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    ref = policy.velocity(x, t, policy.encode(images, [PROMPTS[0]]))
    assert (v - ref).abs().mean() < 0.1 * ref.abs().mean()  # same weights, bf16 rounding only
    img = p.decode(sample(lambda z, s: p.velocity(z, s, cond), x, p.sigmas(2), "dpmpp_2m"))
    assert img.shape == (1, 3, RES, RES) and img.dtype == torch.float32


def test_bad_dtype_raises():
    with pytest.raises(ValueError, match="torch_dtype"):
        FluxKontextPolicy(resolution=RES, max_sequence_length=SEQ, torch_dtype="float64")


def test_tiny_seed_determines_weights(policy):
    same = _state(FluxKontextPolicy(resolution=RES, max_sequence_length=SEQ, tiny=TinyFlux(seed=0)))
    base = _state(policy)
    assert same.keys() == base.keys()
    assert all(torch.equal(same[k], base[k]) for k in base)
    other = _state(FluxKontextPolicy(resolution=RES, max_sequence_length=SEQ, tiny=TinyFlux(seed=1)))
    differing = [k for k in base if not torch.equal(other[k], base[k])]
    for component in ("transformer.", "vae.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(component) for k in differing), component
    # building does not disturb the global RNG
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline(TinyFlux())
    assert torch.equal(torch.rand(3), expected)


def test_tiny_weights_file(tmp_path):
    from safetensors.torch import save_file

    source = FluxKontextPolicy(resolution=RES, max_sequence_length=SEQ, tiny=TinyFlux(seed=7))
    state = {k: v.detach().clone().contiguous() for k, v in _state(source).items()}  # clone: T5 ties embeddings
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    tiny = TinyFlux(seed=0, weights=str(path))
    loaded = _state(FluxKontextPolicy(resolution=RES, max_sequence_length=SEQ, tiny=tiny))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # a file with a wrong shape for a component is rejected
    bad = {"vae.encoder.conv_in.weight": torch.zeros(1)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(RuntimeError):
        build_tiny_pipeline(TinyFlux(weights=str(tmp_path / "bad.safetensors")))
    # keys without a known component prefix are an error, not silently random weights
    unprefixed = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("transformer.")}
    save_file(unprefixed, str(tmp_path / "unprefixed.safetensors"))
    with pytest.raises(ValueError, match="component"):
        build_tiny_pipeline(TinyFlux(weights=str(tmp_path / "unprefixed.safetensors")))


def test_tiny_config_validation():
    with pytest.raises(ValueError):
        TinyFlux(head_dim=12)
    with pytest.raises(ValueError):
        TinyFlux(vae_channels=[])
    p = FluxKontextPolicy(resolution=32, max_sequence_length=SEQ, tiny=TinyFlux(vae_channels=[8, 8, 16]))
    assert p.vae_scale_factor == 4 and p.latent_shape() == (16, 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        FluxKontextPolicy(resolution=36, max_sequence_length=SEQ, tiny=TinyFlux(vae_channels=[8, 8, 16]))


# ------------------------------------------------------------------------------- tokenizers
def test_clip_tokenizer_character_level_round_trip(tmp_path):
    tok = clip_tokenizer(64)
    texts = ["make the red circle blue", "Add a cat, then smile!", "ünïcode & 123"]
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    for text in texts:
        assert tok(text).input_ids == loaded(text).input_ids
    ids = tok("a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len("acat") + 2  # one token per character, no merges
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "c", "a", "t</w>"]
    assert tok.decode(tok("make the red circle blue").input_ids, skip_special_tokens=True).strip() == texts[0]
    assert tok.model_max_length == 64


def test_t5_tokenizer_word_level(tmp_path):
    words = vocabulary()
    tok = t5_tokenizer(words)
    unk = tok.unk_token_id
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != unk, (w, ids)
    ids = tok("zebra", add_special_tokens=False).input_ids
    assert len(ids) > 1 and unk not in ids
    assert tok.decode(ids) == "zebra"
    assert all(c in LETTERS for c in "zebra")
    tok.save_pretrained(tmp_path)
    loaded = T5Tokenizer.from_pretrained(tmp_path)
    for text in PROMPTS + ["make the zebra purple 42"]:
        assert tok(text).input_ids == loaded(text).input_ids
    assert tok("make the red circle blue").input_ids[-1] == tok.eos_token_id


def test_architecture_builds_those_sizes_with_random_weights_and_runs():
    from editr1.policies.base import check_architecture

    arch = {
        "transformer": dict(
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            pooled_projection_dim=20,
            guidance_embeds=True,
            axes_dims_rope=[4, 6, 6],
        ),
        "vae": dict(
            block_out_channels=[8, 16],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=8,
            shift_factor=0.0,
            scaling_factor=1.0,
        ),
        "text_encoder": dict(
            vocab_size=600,
            hidden_size=20,
            intermediate_size=40,
            projection_dim=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=40,
        ),
        "text_encoder_2": dict(vocab_size=400, d_model=24, d_ff=48, d_kv=12, num_heads=2, num_layers=1),
    }
    p = FluxKontextPolicy(resolution=RES, max_sequence_length=SEQ, architecture=arch)
    assert p.transformer.config.joint_attention_dim == 24 and p.text_encoder.config.hidden_size == 20
    cond = p.encode(p.preprocess([_pil(0)]), PROMPTS[:1])
    assert cond["prompt_embeds"].shape == (1, SEQ, 24) and cond["pooled"].shape == (1, 20)
    v = p.velocity(torch.zeros(1, *p.latent_shape()), torch.full((1,), 0.5), cond)
    assert v.shape == (1, *p.latent_shape()) and torch.isfinite(v).all()
    example = p.example_condition(3)
    assert {k: tuple(t.shape) for k, t in example.tensors.items()} == {
        "prompt_embeds": (3, SEQ, 24),
        "pooled": (3, 20),
        "image_latents": (3, *p.latent_shape()),
    }
    with pytest.raises(ValueError, match="exactly"):
        check_architecture({"transformer": {}}, ("transformer", "vae"))
    with pytest.raises(ValueError, match="mapping"):
        check_architecture({"transformer": 3}, ("transformer",))
