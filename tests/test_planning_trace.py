"""The meta-device simulation of ``editr1 plan`` (editr1.planning.trace): hand-counted toy work, then the peaks it
simulates for real tiny models against the peaks torch's profiler measures when the same work runs on the CPU —
a real NFT training step (module.training_step) at two sizes (FLUX.1-Kontext at 32² without activation
checkpointing, Qwen-Image-Edit at 48² with it), and a rollout chunk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from editr1.module import EditR1Module, EfficiencySettings, NFTSettings
from editr1.planning.measure import cpu_peak_bytes
from editr1.planning.trace import (
    TOLERANCE,
    fused_attention_on_meta,
    peak_bytes,
    rollout_peak_bytes,
    training_peak_bytes,
)
from editr1.policies.flux_kontext import FluxKontextPolicy, TinyFlux
from editr1.policies.lora import LoraSettings
from editr1.policies.qwen_image_edit import QwenImageEditPolicy, TinyQwenImage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from perf_common import detach_from_trainer, nft_step, step_data  # noqa: E402

MB = 1_000_000


def test_live_bytes_of_hand_counted_work_on_meta():
    def work():
        a = torch.ones(1000, 1000, device="meta")  # 4 MB
        b = a.view(-1)[:10]  # a view: no new storage, and it keeps a's storage alive
        del a
        c = torch.ones(2000, 1000, device="meta")  # 8 MB: 12 MB held
        del c
        return b

    assert peak_bytes(work) == 12 * MB
    existing = torch.ones(1000, device="meta")
    assert peak_bytes(lambda: existing.view(10, 100)) == 0  # views of what existed count nothing


def test_saved_tensors_live_until_backward_releases_them():
    w = torch.ones(1000, 1000, device="meta", requires_grad=True)

    def forward_only():
        x = torch.ones(1000, 1000, device="meta")  # 4 MB
        return (x * w).sin()  # x·w (4 MB) is kept for sin's backward, the result (4 MB)

    assert peak_bytes(forward_only) == 12 * MB


def test_fused_attention_shapes_on_meta_and_untouched_elsewhere():
    q = torch.ones(2, 3, 10, 8, device="meta", requires_grad=True)
    v = torch.ones(2, 3, 12, 4, device="meta", requires_grad=True)
    k = torch.ones(2, 3, 12, 8, device="meta", requires_grad=True)
    with fused_attention_on_meta():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.sum().backward()
        cpu = torch.nn.functional.scaled_dot_product_attention(*(torch.ones(1, 1, 2, 4),) * 3)
    assert out.shape == (2, 3, 10, 4) and q.grad.shape == q.shape and v.grad.shape == v.shape
    assert torch.allclose(cpu, torch.ones(1, 1, 2, 4))
    # kept: q, k, v exist; the output (2·3·10·4·4 B) and one float32 per query row (2·3·10·4 B)
    assert peak_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) > 0
    with fused_attention_on_meta():
        assert peak_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 960 + 240


_BUILT: dict = {}


def _module(kind: str, resolution: int, checkpointing: bool, device: str) -> EditR1Module:
    """One tiny build per settings for the whole module (the rollout test reuses the first training case's)."""
    key = (kind, resolution, checkpointing, device)
    if key not in _BUILT:
        _BUILT[key] = _build(*key)
    return _BUILT[key]


def _build(kind: str, resolution: int, checkpointing: bool, device: str) -> EditR1Module:
    with torch.device(device):
        if kind == "flux":
            tiny = TinyFlux(heads=2, head_dim=16, layers=2, single_layers=2)
            policy = FluxKontextPolicy(resolution=resolution, tiny=tiny, max_sequence_length=16)
        else:
            tiny = TinyQwenImage(heads=2, head_dim=16, layers=2)
            policy = QwenImageEditPolicy(resolution=resolution, tiny=tiny, condition_resolution=56)
        return EditR1Module(
            policy=policy,
            lora=LoraSettings(rank=4, alpha=8.0),
            nft=NFTSettings(micro_batch_size=2, kl_weight=1e-4),
            seed=1,
            efficiency=EfficiencySettings(activation_checkpointing=checkpointing),
        )


@pytest.mark.parametrize("kind, resolution, checkpointing", [("flux", 32, False), ("qwen", 48, True)])
def test_simulated_training_peak_is_within_tolerance_of_the_measured_step(kind, resolution, checkpointing):
    torch.manual_seed(0)
    module = _module(kind, resolution, checkpointing, "cpu")
    detach_from_trainer(module)
    data = step_data(module, groups=1, k=2, steps=2)  # one group of 2 = one micro-batch, one trained timestep
    nft_step(module, data)  # the optimiser's states exist from here on, as in any step after the first
    measured = cpu_peak_bytes(lambda: nft_step(module, data))
    meta = _module(kind, resolution, checkpointing, "meta")
    tokens = data.rollout.cond["prompt_embeds"].shape[1]
    simulated = training_peak_bytes(meta.policy, 2, tokens, kl=True)
    print(
        f"{kind} {resolution}² checkpointing {checkpointing}: measured {measured / MB:.2f} MB, simulated "
        f"{simulated / MB:.2f} MB ({simulated / measured - 1:+.1%})"
    )
    assert abs(simulated / measured - 1) < TOLERANCE


def test_simulated_rollout_chunk_matches_the_measured_one():
    cpu, meta = _module("flux", 32, False, "cpu").policy, _module("flux", 32, False, "meta").policy
    cond = cpu.example_condition(3)
    x, t = torch.zeros(3, *cpu.latent_shape()), torch.full((3,), 0.5)
    with torch.no_grad():
        measured = max(cpu_peak_bytes(lambda: cpu.velocity(x, t, cond)), cpu_peak_bytes(lambda: cpu.decode(x)))
    simulated = rollout_peak_bytes(meta, 3)
    assert abs(simulated / measured - 1) < TOLERANCE, (simulated, measured)
