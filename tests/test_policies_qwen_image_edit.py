"""Qwen-Image-Edit specifics beyond the shared policy contract of test_policies.py: resolutions and latent
sizes by hand, the tiny build's checks and determinism, prompt padding and truncation, encode_multi's errors
and the scheduler's terminal σ."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

from editr1.policies import QwenImageEditPolicy, TinyQwenImage
from editr1.policies.qwen_image_edit import QWEN_SCHEDULER_CONFIG, _hw, build_tiny_pipeline


@pytest.fixture(scope="module")
def policy():
    return QwenImageEditPolicy(resolution=[32, 48])


def test_resolution_forms():
    assert _hw(64) == (64, 64)
    assert _hw([32, 48]) == (32, 48) and _hw((16.0, 8)) == (16, 8)


def test_latent_sizes_by_hand(policy):
    # default tiny VAE: two stages, downsampling 2; 2 x 2 packing: (32/2/2)·(48/2/2) tokens of 4·4 channels
    assert policy.vae_scale_factor == 2 and (policy.latent_h, policy.latent_w) == (16, 24)
    assert policy.latent_shape() == (8 * 12, 16) and policy.condition_hw == (32, 48)
    deeper = QwenImageEditPolicy(resolution=32, tiny=TinyQwenImage(vae_dim_mult=[1, 2, 2]))
    assert deeper.vae_scale_factor == 4 and deeper.latent_shape() == (4 * 4, 16)
    with pytest.raises(ValueError, match="resolution 36x36 must be a multiple of 8"):
        QwenImageEditPolicy(resolution=36, tiny=TinyQwenImage(vae_dim_mult=[1, 2, 2]))


def test_pipeline_class_follows_the_variant(policy):
    assert type(policy.pipe) is QwenImageEditPipeline and policy.variant == "edit"
    assert type(QwenImageEditPolicy(resolution=32, variant="edit_plus").pipe) is QwenImageEditPlusPipeline


def test_tiny_settings_and_pipeline_checks():
    with pytest.raises(ValueError, match="at least two stages"):
        TinyQwenImage(vae_dim_mult=[1])
    with pytest.raises(ValueError, match="variant must be one of"):
        build_tiny_pipeline(TinyQwenImage(), variant="plus")
    with pytest.raises(ValueError, match="torch_dtype must be one of"):
        QwenImageEditPolicy(resolution=32, torch_dtype="fp16")


def test_tiny_build_is_deterministic_in_its_seed_and_leaves_the_global_generator_alone():
    torch.manual_seed(11)
    expected = torch.rand(2)
    torch.manual_seed(11)
    a = build_tiny_pipeline(TinyQwenImage(seed=5)).transformer.state_dict()
    assert torch.equal(torch.rand(2), expected)
    b = build_tiny_pipeline(TinyQwenImage(seed=5)).transformer.state_dict()
    c = build_tiny_pipeline(TinyQwenImage(seed=6)).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_prompts_of_different_lengths_are_zero_padded_with_a_mask(policy):
    short, long = "a", "a much longer prompt with many more words in it"
    cond = policy.encode(torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)), [short, long])
    mask, embeds = cond["prompt_mask"], cond["prompt_embeds"]
    lengths = mask.sum(dim=1).tolist()
    assert lengths[1] - lengths[0] == len(long) - len(short)  # the tiny tokenizer: one token per byte
    assert lengths[1] == mask.shape[1] and embeds.shape[:2] == mask.shape
    assert mask[0, : lengths[0]].all() and not mask[0, lengths[0] :].any()  # a prefix, then padding
    assert torch.equal(embeds[0, lengths[0] :], torch.zeros_like(embeds[0, lengths[0] :]))
    assert int(cond["num_images"]) == 1 and cond["image_latents"].shape == (2, *policy.latent_shape())


def test_prompt_embeddings_are_cut_at_max_sequence_length():
    p = QwenImageEditPolicy(resolution=32, max_sequence_length=5)
    cond = p.encode(torch.rand(1, 3, 32, 32), ["a long prompt here"])
    assert cond["prompt_embeds"].shape[1] == 5 and cond["prompt_mask"].shape == (1, 5)


def test_encode_multi_errors(policy):
    with pytest.raises(ValueError, match="at least one condition image"):
        policy.encode_multi([], ["x"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        policy.encode_multi([torch.rand(2, 3, 32, 48)], ["x"])


def test_schedule_ends_at_the_terminal_sigma_then_zero(policy):
    s = policy.sigmas(3)
    assert QWEN_SCHEDULER_CONFIG["shift_terminal"] == 0.02
    assert s.shape == (4,) and float(s[0]) == pytest.approx(1.0) and float(s[-2]) == pytest.approx(0.02, abs=1e-6)
    assert float(s[-1]) == 0.0


def test_architecture_builds_those_sizes_with_random_weights_and_runs():
    arch = {
        "transformer": dict(
            in_channels=16,
            out_channels=4,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            axes_dims_rope=[4, 6, 6],
        ),
        "vae": dict(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        ),
        "text_encoder": dict(
            text_config=dict(
                vocab_size=400,
                hidden_size=24,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=24,
                window_size=56,
                fullatt_block_indexes=[0],
            ),
        ),
    }
    p = QwenImageEditPolicy(resolution=32, condition_resolution=56, architecture=arch)
    assert p.transformer.config.joint_attention_dim == 24 and p.text_encoder.config.text_config.hidden_size == 24
    cond = p.encode(torch.rand(1, 3, 32, 32), ["make it blue"])
    assert cond["prompt_embeds"].shape[2] == 24
    v = p.velocity(torch.zeros(1, *p.latent_shape()), torch.full((1,), 0.5), cond)
    assert v.shape == (1, *p.latent_shape()) and torch.isfinite(v).all()
    example = p.example_condition(2, 7)
    assert example["prompt_embeds"].shape == (2, 7, 24) and example["prompt_mask"].device.type == "cpu"


def test_2511_zero_cond_t_modulates_the_condition_tokens_at_t_zero():
    """Qwen-Image-Edit-2511's transformer (zero_cond_t) is 2509's with the condition images' tokens modulated at
    t = 0: the same weights give the same velocity at σ = 0 and a different one elsewhere."""
    plus = QwenImageEditPolicy(resolution=32, variant="edit_plus")
    zero = QwenImageEditPolicy(resolution=32, variant="edit_plus", tiny=TinyQwenImage(zero_cond_t=True))
    assert zero.transformer.config.zero_cond_t and not plus.transformer.config.zero_cond_t
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cond = plus.encode_multi([images, images.flip(-1)], ["put picture 2 on picture 1"])
    x = torch.randn((2, *plus.latent_shape()), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 0.6])
    a, b = plus.velocity(x, t, cond.select([0, 0])), zero.velocity(x, t, cond.select([0, 0]))
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(b[1], a[1], atol=1e-4)
    with pytest.raises(ValueError, match="zero_cond_t.*edit_plus"):
        QwenImageEditPolicy(resolution=32, tiny=TinyQwenImage(zero_cond_t=True))
