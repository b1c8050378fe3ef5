"""Group editing with a fake linear policy (no model): argument errors, padded encoding, one encoding per
prompt shared by its K samples, results that do not depend on the chunk size, and the chunk callback."""

from __future__ import annotations

import pytest
import torch

from editr1.editing import edit_images, encode_padded
from editr1.policies.base import Condition
from editr1.seeding import per_sample_randn


class FakePolicy:
    """Latents of shape (2,); the condition is one number per prompt; v = x − cond (linear, elementwise)."""

    height = width = 2
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.encoded: list[tuple[torch.Tensor, list[str]]] = []
        self.velocity_calls = 0

    def encode(self, sources, prompts):
        self.encoded.append((sources.clone(), list(prompts)))
        return Condition(
            {"c": sources.mean(dim=(1, 2, 3)) + torch.tensor([len(p) for p in prompts], dtype=torch.float32)}
        )

    def sigmas(self, steps):
        return torch.linspace(1, 0, steps + 1)

    def latent_shape(self):
        return (2,)

    def velocity(self, x, t, cond):
        self.velocity_calls += 1
        return x - cond["c"][:, None]

    def decode(self, x0):
        return torch.sigmoid(x0.mean(dim=1)).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()


def _sources(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2) / 10


PROMPTS = ["make it red", "remove the square", "add a circle"]


# ---------------------------------------------------------------------------------------------- encode_padded
def test_no_padding_needed_is_one_plain_encode():
    p = FakePolicy()
    cond = encode_padded(p, _sources(2), PROMPTS[:2], min_prompts=2)
    assert len(cond) == 2 and len(p.encoded) == 1 and p.encoded[0][1] == PROMPTS[:2]
    encode_padded(p, _sources(2), PROMPTS[:2])  # min_prompts 0
    assert p.encoded[1][1] == PROMPTS[:2]


def test_padding_repeats_the_first_prompt_and_source():
    p = FakePolicy()
    src = _sources(2)
    cond = encode_padded(p, src, PROMPTS[:2], min_prompts=5)
    sources, prompts = p.encoded[0]
    assert prompts == PROMPTS[:2] + [PROMPTS[0]] * 3
    assert torch.equal(sources, torch.cat([src, src[:1].expand(3, 3, 2, 2)]))
    assert len(cond) == 5 and torch.equal(cond["c"][2:], cond["c"][:1].expand(3))


def test_with_no_prompt_of_its_own_a_process_encodes_blank_pictures():
    p = FakePolicy()
    cond = encode_padded(p, torch.zeros(0, 3, 2, 2), [], min_prompts=2)
    sources, prompts = p.encoded[0]
    assert prompts == ["", ""] and torch.equal(sources, torch.zeros(2, 3, 2, 2)) and len(cond) == 2


# ---------------------------------------------------------------------------------------------- edit_images
def _edit(p, n_prompts=3, k=2, batch_size=4, seeds=None, **kw):
    seeds = list(range(100, 100 + n_prompts * k)) if seeds is None else seeds
    return edit_images(
        p,
        _sources(n_prompts),
        PROMPTS[:n_prompts],
        seeds,
        steps=3,
        solver="euler",
        batch_size=batch_size,
        group_size=k,
        **kw,
    )


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"seeds": [1, 2, 3, 4, 5]}, r"need 6 seeds \(one per edit\), got 5"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"n_prompts": 0, "seeds": []}, "nothing to edit: no prompts"),
    ],
)
def test_argument_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        _edit(FakePolicy(), **kwargs)


def test_one_encoding_per_prompt_shared_by_its_samples():
    p = FakePolicy()
    out = _edit(p, seeds=[7, 7, 7, 7, 8, 8])  # groups 0 and 1 draw the same noise
    assert len(p.encoded) == 1 and p.encoded[0][1] == PROMPTS and len(out.cond) == 3
    assert out.x0.shape == (6, 2) and out.images.shape == (6, 3, 2, 2)
    assert torch.equal(out.x0[0], out.x0[1]) and torch.equal(out.x0[2], out.x0[3])  # same seed, same prompt
    assert not torch.equal(out.x0[1], out.x0[2])  # same seed, another prompt
    assert torch.equal(out.sigmas, torch.linspace(1, 0, 4))


def test_sample_i_starts_from_the_noise_of_seeds_i():
    p = FakePolicy()
    out = _edit(p, n_prompts=1, k=1, seeds=[42])
    x = per_sample_randn((2,), [42])
    c = p.encode(_sources(1), PROMPTS[:1])["c"][:, None]
    for s, s_next in [(1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)]:  # Euler by hand on v = x − c
        x = x + (s_next - s) * (x - c)
    torch.testing.assert_close(out.x0, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.images, p.decode(x))


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_results_do_not_depend_on_the_chunk_size(batch_size):
    reference = _edit(FakePolicy(), batch_size=6)
    out = _edit(FakePolicy(), batch_size=batch_size)
    assert torch.equal(out.x0, reference.x0) and torch.equal(out.images, reference.images)


def test_on_chunk_gets_each_decoded_chunk_with_its_flat_indices():
    seen = []
    out = _edit(FakePolicy(), batch_size=4, on_chunk=lambda idx, images: seen.append((idx.tolist(), images)))
    assert [idx for idx, _ in seen] == [[0, 1, 2, 3], [4, 5]]
    assert torch.equal(torch.cat([images for _, images in seen]), out.images)


def test_min_prompts_adds_idle_passes_and_keeps_the_real_results():
    plain_policy, padded_policy = FakePolicy(), FakePolicy()
    plain = _edit(plain_policy, n_prompts=1, k=2, batch_size=2)
    padded = _edit(padded_policy, n_prompts=1, k=2, batch_size=2, min_prompts=3)
    assert torch.equal(plain.x0, padded.x0) and len(padded.cond) == 1
    assert plain_policy.velocity_calls == 3  # one chunk, 3 Euler steps
    assert padded_policy.velocity_calls == 3 * 3  # the chunks of 3 prompts × 2 edits at batch 2
    assert padded_policy.encoded[0][1] == [PROMPTS[0]] * 3


def test_sde_edits_keep_their_trajectory_whatever_the_chunk_size():
    from editr1.sampling import SDESampling

    whole = _edit(FakePolicy(), batch_size=6, sde=SDESampling(0.7))
    split = _edit(FakePolicy(), batch_size=4, sde=SDESampling(0.7))
    assert whole.latents.shape == (6, 4, 2) and whole.log_probs.shape == (6, 3)
    for a, b in [(whole.x0, split.x0), (whole.latents, split.latents), (whole.log_probs, split.log_probs)]:
        torch.testing.assert_close(a, b)
    assert torch.equal(whole.latents[:, -1], whole.x0)
    ode = _edit(FakePolicy(), batch_size=6)
    assert ode.latents is None and ode.log_probs is None
    assert not torch.allclose(ode.x0, whole.x0)  # the SDE adds noise the ODE does not
