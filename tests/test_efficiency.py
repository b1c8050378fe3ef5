"""The efficiency work of issue 8 leaves the algorithm's results unchanged.

Each optimisation is compared with and without it on one NFT training step of the tiny FLUX.1-Kontext:
the loss and the gradient of every trained LoRA weight (captured just before the optimiser step; after
it, Adam's first step — about lr·sign(g) — would magnify float rounding in near-zero gradients).
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_policy
from editr1.algorithms.grouping import GroupDecision
from editr1.editing import edit_images
from editr1.module import EditR1Module
from editr1.policies import lora
from editr1.policies.lora import LoraSettings
from editr1.settings import EfficiencySettings, NFTSettings
from editr1.training.experience import Experience
from editr1.training.rollout import Rollout

PROMPTS = ["make the red circle blue", "add a green square", "remove the triangle", "move the circle left"]


def module(efficiency: EfficiencySettings = EfficiencySettings(), **nft) -> EditR1Module:
    torch.manual_seed(0)  # the LoRA initialisation draws from the global generator
    m = EditR1Module(
        policy=tiny_policy(),
        lora=LoraSettings(rank=4, alpha=8.0, init="true"),
        nft=NFTSettings(**{"micro_batch_size": 4, **nft}),
        seed=7,
        efficiency=efficiency,
    )
    m.setup("fit")
    opt = m.configure_optimizers()
    m.optimizers = lambda: opt
    m.lr_schedulers = lambda: None
    m.manual_backward = lambda loss: loss.backward()
    m.log = m.log_dict = lambda *a, **k: None
    return m


def step_data(
    m: EditR1Module, groups: list[int], k: int = 3, steps: int = 4, keep: list[int] | None = None
) -> Experience:
    """A rollout of the given prompts (indices into PROMPTS) with fixed latents and r; ``keep`` lists the
    groups that train (all by default). Samples depend only on their key, never on the batch position."""
    policy = m.policy
    g = torch.Generator().manual_seed(0)
    images = torch.rand(len(PROMPTS), 3, policy.height, policy.width, generator=g)
    x0_all = torch.randn(len(PROMPTS), k, *policy.latent_shape(), generator=g)
    r_all = torch.rand(len(PROMPTS), k, generator=g)
    prompts = [PROMPTS[i] for i in groups]
    cond = policy.encode(images[groups], prompts)
    ro = Rollout(
        prompts=prompts,
        requirements=[""] * len(groups),
        keys=[f"key{i}" for i in groups],
        sources=images[groups],
        targets=None,
        cond=cond,
        x0=x0_all[groups].flatten(0, 1),
        edits=torch.zeros(len(groups) * k, 3, 1, 1),
        sigmas=policy.sigmas(steps),
        group_size=k,
        index=0,
        base_seed=7,
    )
    kept = torch.tensor([keep is None or i in keep for i in groups])
    mask = kept[:, None].expand(len(groups), k).clone()
    rewards = torch.rand(len(groups), k, generator=g)
    decision = GroupDecision(
        r=r_all[groups],
        train_mask=mask,
        dropped_low_variance=~kept,
        dropped_nan=torch.zeros(len(groups), dtype=torch.bool),
        mean=rewards.mean(1),
        std=rewards.std(1),
    )
    return Experience(ro, rewards, decision)


def loss_and_grads(m: EditR1Module, data: Experience) -> tuple[float, dict[str, torch.Tensor]]:
    grads = {}

    def capture(opt):
        for name, p in lora.adapter_parameters(m.policy.transformer, lora.DEFAULT).items():
            grads[name] = p.grad.detach().clone()
        opt.zero_grad(set_to_none=True)
        return torch.tensor(1.0)

    m._clip_and_step = capture
    loss = float(m.training_step({"experience": data}, 0))
    return loss, grads


def assert_grads_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def reference():
    m = module()
    return loss_and_grads(m, step_data(m, [0, 1]))


def test_defaults_change_nothing():
    m = module()
    assert not m.policy.transformer.is_gradient_checkpointing
    assert m.policy.autocast_dtype is None
    assert getattr(m.policy.transformer, "_compiled_call_impl", None) is None


def test_activation_checkpointing_same_loss_and_gradients(reference):
    m = module(EfficiencySettings(activation_checkpointing=True))
    assert m.policy.transformer.is_gradient_checkpointing
    loss, grads = loss_and_grads(m, step_data(m, [0, 1]))
    assert loss == pytest.approx(reference[0], rel=1e-6)
    assert_grads_close(grads, reference[1], rtol=1e-5, atol=1e-8)


def test_compile_same_loss_and_gradients(reference):
    # aot_eager: Dynamo's graph capture and AOTAutograd's backward, without inductor's slow CPU code generation
    m = module(EfficiencySettings(compile=True, compile_backend="aot_eager"))
    loss, grads = loss_and_grads(m, step_data(m, [0, 1]))
    assert loss == pytest.approx(reference[0], rel=1e-6)
    assert_grads_close(grads, reference[1], rtol=1e-5, atol=1e-8)


def test_bf16_autocast_close_loss_and_gradients(reference):
    # bf16 keeps 8 bits of mantissa: the same loss to bf16 precision; the gradient of this random tiny model
    # points the same way (cosine 0.98 here), with bf16's rounding in every matmul of forward and backward
    m = module(EfficiencySettings(autocast="bf16"))
    assert m.policy.autocast_dtype == torch.bfloat16
    loss, grads = loss_and_grads(m, step_data(m, [0, 1]))
    assert loss == pytest.approx(reference[0], rel=2e-2)
    a = torch.cat([g.flatten() for g in grads.values()])
    b = torch.cat([g.flatten() for g in reference[1].values()])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95
    assert float((a - b).norm() / b.norm()) < 0.3


def test_autocast_setting_is_validated():
    with pytest.raises(ValueError, match="autocast"):
        EfficiencySettings(autocast="fp8")


def test_filtered_groups_cost_nothing_and_change_nothing():
    """Half the groups dropped: the step equals a step on a rollout of the kept groups alone (the same
    samples, timesteps and noise), and the dropped samples never reach the model."""
    m = module(kl_weight=1e-4)
    full = step_data(m, [0, 1, 2, 3], keep=[0, 2])
    calls = []
    velocity = m.policy.velocity

    def counting(x_t, t, cond):
        calls.append(x_t.shape[0])
        return velocity(x_t, t, cond)

    m.policy.velocity = counting
    loss_full, grads_full = loss_and_grads(m, full)
    del m.policy.velocity
    rounds = 3  # ⌊0.99 · 4⌋ rollout timesteps
    assert sum(calls) == 3 * rounds * 2 * 3  # (θ_old, reference, θ) × rounds × 2 kept groups × K
    m2 = module(kl_weight=1e-4)
    loss_kept, grads_kept = loss_and_grads(m2, step_data(m2, [0, 2]))
    assert loss_full == pytest.approx(loss_kept, rel=1e-6)
    assert_grads_close(grads_full, grads_kept, rtol=1e-5, atol=1e-8)


def _scaled(grads: dict, factor: float) -> dict:
    return {k: v * factor for k, v in grads.items()}


def test_reference_normalisation_by_hand():
    """nft.normalize: reference. 4 groups × K 3 = 12 samples, groups 0 and 2 kept (6 samples).
    Micro-batch 1: every kept sample is alone in its micro-batch and there are 12 micro-batches, so each kept
    sample weighs 1/12 instead of 1/6 — the step is the kept-mode step × 6/12, whatever the shuffle.
    Micro-batch 12: one micro-batch, its mean over the 6 kept samples — the kept-mode step exactly."""
    kept_grads = {}
    for mb in (1, 12):
        m = module(kl_weight=1e-4, micro_batch_size=mb)
        _, kept_grads[mb] = loss_and_grads(m, step_data(m, [0, 1, 2, 3], keep=[0, 2]))
    m = module(kl_weight=1e-4, micro_batch_size=1, normalize="reference")
    _, ref1 = loss_and_grads(m, step_data(m, [0, 1, 2, 3], keep=[0, 2]))
    assert_grads_close(ref1, _scaled(kept_grads[1], 6 / 12), rtol=1e-5, atol=1e-9)
    m = module(kl_weight=1e-4, micro_batch_size=12, normalize="reference")
    _, ref12 = loss_and_grads(m, step_data(m, [0, 1, 2, 3], keep=[0, 2]))
    assert_grads_close(ref12, kept_grads[12], rtol=1e-5, atol=1e-9)
    # nothing filtered, micro-batch 1: 12 micro-batches of one kept sample each → 1/12 each, as in kept mode
    m = module(micro_batch_size=1, normalize="reference")
    _, ref_all = loss_and_grads(m, step_data(m, [0, 1, 2, 3]))
    m = module(micro_batch_size=1)
    _, kept_all = loss_and_grads(m, step_data(m, [0, 1, 2, 3]))
    assert_grads_close(ref_all, kept_all, rtol=1e-5, atol=1e-9)


def test_reference_normalisation_filtered_samples_cost_nothing():
    """P3 holds under nft.normalize: reference too: the masked samples are weighed, never computed."""
    m = module(kl_weight=1e-4, normalize="reference")
    calls = []
    velocity = m.policy.velocity

    def counting(x_t, t, cond):
        calls.append(x_t.shape[0])
        return velocity(x_t, t, cond)

    m.policy.velocity = counting
    loss_and_grads(m, step_data(m, [0, 1, 2, 3], keep=[0, 2]))
    assert sum(calls) == 3 * 3 * 2 * 3  # (θ_old, reference, θ) × 3 rounds × 2 kept groups × K


def test_reference_normalisation_steps_on_a_zero_gradient_when_all_is_filtered():
    """The reference takes an optimiser step (zero gradient: AdamW's weight decay still moves the weights) when
    every sample is masked; editr1's default skips the step and leaves the weights alone."""
    for normalize, steps in (("kept", 0), ("reference", 1)):
        m = module(normalize=normalize)
        before = lora.adapter_state(m.policy.transformer, lora.DEFAULT)
        taken = []
        real = m._clip_and_step

        def counting(opt, real=real, taken=taken):
            taken.append(1)
            return real(opt)

        m._clip_and_step = counting
        m.training_step({"experience": step_data(m, [0, 1], keep=[])}, 0)
        assert len(taken) == steps and m.skipped_steps == 1
        after = lora.adapter_state(m.policy.transformer, lora.DEFAULT)
        changed = any(not torch.equal(before[k], after[k]) for k in before)
        assert changed == (normalize == "reference")


def test_one_batched_group_equals_separate_calls():
    """A group's K edits in one batch, the prompt encoded once, equal K separate one-edit calls."""
    policy = tiny_policy()
    policy.add_adapters(LoraSettings(rank=4, alpha=8.0), [lora.DEFAULT])
    src = torch.rand(1, 3, policy.height, policy.width, generator=torch.Generator().manual_seed(1))
    seeds = [11, 12, 13, 14, 15, 16]
    group = edit_images(policy, src, PROMPTS[:1], seeds, steps=4, solver="dpmpp_2m", batch_size=6, group_size=6)
    for i, s in enumerate(seeds):
        one = edit_images(policy, src, PROMPTS[:1], [s], steps=4, solver="dpmpp_2m", batch_size=1)
        torch.testing.assert_close(group.x0[i : i + 1], one.x0, rtol=1e-5, atol=1e-5)


def test_adapter_switching_matches_peft(reference):
    """editr1's cached adapter switch leaves every LoRA layer as peft's own set_adapter does."""
    from peft.tuners.tuners_utils import BaseTunerLayer, set_adapter

    m = module()
    model = m.policy.transformer

    def state():
        out = []
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                out.append(
                    (
                        tuple(layer.active_adapters),
                        layer.disable_adapters,
                        tuple(sorted((n, p.requires_grad) for n, p in layer.named_parameters() if "lora_" in n)),
                    )
                )
        return out

    for name in (lora.OLD, None, lora.DEFAULT):
        with lora.using(model, name):
            ours = state()
        if name is None:
            for layer in model.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.enable_adapters(False)
        else:
            for layer in model.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.enable_adapters(True)
            set_adapter(model, name, inference_mode=name != lora.DEFAULT)
        assert ours == state()
        lora.activate(model, lora.DEFAULT)
