"""FLUX.2 [klein] specifics beyond the shared policy contract of test_policies.py: a full edit (decoded image)
and a two-reference edit equal Flux2KleinPipeline's, the position ids and batch-norm latent normalisation, the
σ schedule's step-dependent μ by hand, the LoRA targets, the tiny build's checks and weights file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from editr1.policies import Flux2KleinPolicy, TinyFlux2Klein, lora
from editr1.policies.flux2_klein import FLUX2_TARGET_MODULES, build_tiny_pipeline
from editr1.sampling import sample

PROMPT = "put the cat from picture 2 on the sofa"


@pytest.fixture(scope="module")
def policy() -> Flux2KleinPolicy:
    p = Flux2KleinPolicy(resolution=64, max_sequence_length=64, tiny=TinyFlux2Klein(vae_channels=[8, 16, 16]))
    p.pipe.set_progress_bar_config(disable=True)
    return p


def _pil(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _noise(p: Flux2KleinPolicy, seed: int = 0) -> torch.Tensor:
    return torch.randn((1, *p.latent_shape()), generator=torch.Generator().manual_seed(seed))


def _pipeline(p: Flux2KleinPolicy, images, noise, steps, output_type):
    h, w = p.latent_h // 2, p.latent_w // 2
    return p.pipe(
        image=images,
        prompt=PROMPT,
        height=p.height,
        width=p.width,
        num_inference_steps=steps,
        guidance_scale=1.0,
        max_sequence_length=p.max_sequence_length,
        text_encoder_out_layers=p.text_encoder_out_layers,
        latents=noise.transpose(1, 2).reshape(1, -1, h, w).clone(),
        output_type=output_type,
    ).images


def test_a_two_reference_edit_decodes_to_the_pipelines_image(policy):
    p, a, b = policy, _pil(0), _pil(1)
    cond = p.encode_multi([p.preprocess([a]), p.preprocess([b])], [PROMPT])
    assert cond["image_latents"].shape == (1, 2 * p.latent_shape()[0], p.latent_shape()[1])
    ids = cond["img_ids"][0]  # (T, H, W, L): the noisy latents at T = 0, the references at T = 10 and 20
    n = p.latent_shape()[0]
    assert [int(ids[i * n, 0]) for i in range(3)] == [0, 10, 20] and int(ids[:, 3].abs().sum()) == 0
    assert int(ids[n - 1, 1]) == p.latent_h // 2 - 1 and int(ids[n - 1, 2]) == p.latent_w // 2 - 1
    noise = _noise(p)
    ours = p.decode(sample(lambda x, t: p.velocity(x, t, cond), noise, p.sigmas(2), "euler"))
    expected = _pipeline(p, [a, b], noise, 2, "pt")
    assert ours.shape == expected.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ours, expected.float(), atol=1e-4, rtol=0)
    one = p.encode(p.preprocess([a]), [PROMPT])  # the second reference changes the edit
    x, t = _noise(p, 1), torch.tensor([0.5])
    assert not torch.allclose(p.velocity(x, t, one), p.velocity(x, t, cond), atol=1e-5)


def test_latents_are_patchified_and_batch_norm_normalised(policy):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    z = policy.encode_images(images)
    raw = policy.vae.encode(images * 2 - 1).latent_dist.mode()  # (1, c, 16, 16)
    bn = policy.vae.bn
    assert bn.running_mean.abs().sum() > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    c = policy.latent_channels
    token = raw[:, :, 2:4, 6:8].reshape(1, c, 4)  # the 2x2 patch of token (row 1, column 3): channel-major
    expected = (token.reshape(1, 4 * c) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(z[:, 1 * 8 + 3], expected, atol=1e-5, rtol=1e-5)
    out = policy.decode(z)
    reference = ((policy.vae.decode(raw).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_sigmas_follow_the_empirical_mu_by_hand(policy):
    # seq_len 64, 4 steps: mu = a·4 + b with the pipeline's two fitted lines at 10 and 200 steps
    m10, m200 = 8.73809524e-05 * 64 + 1.89833333, 0.00016927 * 64 + 0.45666666
    a = (m200 - m10) / 190.0
    mu = a * 4 + (m200 - 200.0 * a)
    expected = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    torch.testing.assert_close(policy.sigmas(4), torch.tensor(expected), atol=1e-6, rtol=0)
    assert not torch.allclose(policy.sigmas(4)[1:3], policy.sigmas(8)[[2, 4]], atol=1e-4)  # μ depends on steps
    with pytest.raises(ValueError):
        policy.sigmas(0)


def test_prompts_are_padded_to_max_sequence_length_and_batched_alike(policy):
    cond = policy.encode(torch.rand(2, 3, 64, 64), ["a", "a much longer instruction than the first one"])
    assert cond["prompt_embeds"].shape == (2, 64, 3 * 16)  # three stacked Qwen3 hidden states of width 16
    assert cond["text_ids"].shape == (1, 64, 4) and torch.equal(cond["text_ids"][0, :, 3], torch.arange(64))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        policy.encode(torch.rand(2, 3, 64, 64), ["x"])
    with pytest.raises(ValueError, match="at least one condition image"):
        policy.encode_multi([], ["x"])


def test_lora_targets_reach_both_kinds_of_block(policy):
    p = Flux2KleinPolicy(resolution=32, max_sequence_length=16, tiny=TinyFlux2Klein(layers=1, single_layers=2))
    p.add_adapters(lora.LoraSettings(rank=2, alpha=4.0, target_modules=FLUX2_TARGET_MODULES), [lora.DEFAULT])
    adapted = {n.split(".lora_")[0] for n, _ in p.transformer.named_parameters() if ".lora_A." in n}
    assert {f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj" for i in range(2)} <= adapted
    double = {f"transformer_blocks.0.attn.{m}" for m in lora.PAPER_TARGET_MODULES}
    assert double <= adapted and len(adapted) == len(double) + 2


def test_tiny_build_checks_seed_and_weights_file(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="head_dim"):
        TinyFlux2Klein(head_dim=12)
    with pytest.raises(ValueError, match="vae_channels"):
        TinyFlux2Klein(vae_channels=[])
    with pytest.raises(ValueError, match="out_layers"):
        TinyFlux2Klein(text_layers=2, out_layers=[1, 3])
    with pytest.raises(ValueError, match="multiple of 4"):
        Flux2KleinPolicy(resolution=34)
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    source = build_tiny_pipeline(TinyFlux2Klein(seed=1))
    assert torch.equal(torch.rand(2), expected)  # the global generator is left alone
    state = {
        f"{n}.{k}": v.detach().clone().contiguous()
        for n in ("transformer", "vae", "text_encoder")
        for k, v in getattr(source, n).state_dict().items()
    }
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = build_tiny_pipeline(TinyFlux2Klein(seed=2, weights=str(tmp_path / "w.safetensors")))
    assert torch.equal(loaded.vae.bn.running_mean, source.vae.bn.running_mean)  # buffers travel too
    assert all(torch.equal(v, loaded.transformer.state_dict()[k]) for k, v in source.transformer.state_dict().items())
    other = build_tiny_pipeline(TinyFlux2Klein(seed=2)).transformer.state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in source.transformer.state_dict().items())
