"""Tests for the three-policies-on-one-transformer LoRA helpers (editr1.policies.lora), on the tiny
FLUX transformer: θ = "default", θ_old = "old", EMA = "ema", reference = adapters disabled."""

from __future__ import annotations

import copy

import pytest
import torch

from editr1.policies import lora
from editr1.policies.flux_kontext import TinyFlux, build_tiny_pipeline
from editr1.policies.lora import LoraSettings

NAMES = ["default", "old", "ema"]
SETTINGS = LoraSettings(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base_transformer():
    t = build_tiny_pipeline(TinyFlux()).transformer.eval()
    t.requires_grad_(False)
    return t


@pytest.fixture(scope="module")
def inputs(base_transformer):
    cfg = base_transformer.config
    g = torch.Generator().manual_seed(0)
    seq, txt = 16, 6
    img_ids = torch.zeros(seq, 3)
    img_ids[:, 1] = torch.arange(seq) // 4
    img_ids[:, 2] = torch.arange(seq) % 4
    return {
        "hidden_states": torch.randn(2, seq, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(2, txt, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.8, 0.3]),
        "guidance": torch.full((2,), 2.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(txt, 3),
    }


@pytest.fixture
def model(base_transformer):
    m = copy.deepcopy(base_transformer)
    lora.add_adapters(m, SETTINGS, NAMES)
    return m


def forward(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@torch.no_grad()
def perturb(model, name: str, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in lora.adapter_parameters(model, name).values():
        p.add_(scale * torch.randn(p.shape, generator=g))


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- construction
def test_adapters_start_identical(model, base_transformer, inputs):
    assert lora.adapter_names(model) == sorted(NAMES)
    default = lora.adapter_state(model, "default")
    assert states_equal(lora.adapter_state(model, "old"), default)
    assert states_equal(lora.adapter_state(model, "ema"), default)
    # every paper target module of the transformer got an adapter
    wrapped = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in default}
    wrapped |= {k.rsplit(".lora_", 1)[0].rsplit(".", 2)[-2] + ".0" for k in default if ".to_out.0." in k}
    assert {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= wrapped
    assert any(".to_out.0." in k for k in default)
    # Gaussian init: B = 0, so the adapted model starts as the base model
    torch.testing.assert_close(forward(model, inputs), forward(base_transformer, inputs), atol=1e-6, rtol=0)


def test_old_init_independent_keeps_its_own_a_and_is_still_the_base(base_transformer, inputs):
    """lora.old_init: independent (the reference's add_adapter("old")): θ_old has its own random A, B = 0 like
    every adapter, so it is the base model too; the EMA adapter still starts as a copy of θ."""
    m = copy.deepcopy(base_transformer)
    torch.manual_seed(3)
    lora.add_adapters(m, LoraSettings(rank=4, alpha=8.0, old_init="independent"), NAMES)
    default, old = lora.adapter_state(m, "default"), lora.adapter_state(m, "old")
    a_keys = [k for k in default if "lora_A" in k]
    assert a_keys and all(not torch.equal(default[k], old[k]) for k in a_keys)
    assert all(not old[k].any() for k in old if "lora_B" in k)
    assert states_equal(lora.adapter_state(m, "ema"), default)
    with lora.using(m, "old"):
        torch.testing.assert_close(forward(m, inputs), forward(base_transformer, inputs), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="old_init"):
        LoraSettings(old_init="random")


def test_only_default_requires_grad(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".default." in n and "lora_" in n for n in trainable)
    assert trainable == {n for n in dict(model.named_parameters()) if ".default." in n}


def test_using_old_then_default_again(model, inputs):
    perturb(model, "default", seed=1)
    perturb(model, "old", seed=2)
    out_default = forward(model, inputs)
    with lora.using(model, "old"):
        assert not any(p.requires_grad for p in model.parameters())
        out_old = forward(model, inputs)
    assert not torch.allclose(out_old, out_default, atol=1e-4)
    # afterwards default is active and trainable again
    torch.testing.assert_close(forward(model, inputs), out_default)
    assert all(p.requires_grad for p in lora.adapter_parameters(model, "default").values())
    assert not any(p.requires_grad for p in lora.adapter_parameters(model, "old").values())
    # the "old" output is the one its weights give: load them into default and compare
    lora.load_adapter_state(model, "default", lora.adapter_state(model, "old"))
    torch.testing.assert_close(forward(model, inputs), out_old)


def test_using_none_is_the_base_model(model, base_transformer, inputs):
    reference = forward(base_transformer, inputs)
    perturb(model, "default", seed=3)
    perturb(model, "old", seed=4)
    assert not torch.allclose(forward(model, inputs), reference, atol=1e-4)
    with lora.using(model, None):
        torch.testing.assert_close(forward(model, inputs), reference, atol=1e-6, rtol=0)
    assert not torch.allclose(forward(model, inputs), reference, atol=1e-4)
    assert all(p.requires_grad for p in lora.adapter_parameters(model, "default").values())


def test_using_restores_default_after_error(model, inputs):
    perturb(model, "default", seed=5)
    out_default = forward(model, inputs)
    with pytest.raises(RuntimeError), lora.using(model, None):
        raise RuntimeError("boom")
    torch.testing.assert_close(forward(model, inputs), out_default)
    assert all(p.requires_grad for p in lora.adapter_parameters(model, "default").values())


def test_gradients_reach_only_default(model, inputs):
    perturb(model, "default", seed=6)  # B ≠ 0 so lora_A gets gradients too
    perturb(model, "old", seed=7)
    with torch.no_grad():
        with lora.using(model, "old"):
            v_old = forward(model, inputs)
        with lora.using(model, None):
            v_ref = forward(model, inputs)
    with lora.using(model, "default"):
        v = forward(model, inputs)
    assert v.requires_grad and not v_old.requires_grad and not v_ref.requires_grad
    ((v - v_old) ** 2).mean().add(((v - v_ref) ** 2).mean()).backward()
    for name, p in model.named_parameters():
        if ".default." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


# ------------------------------------------------------------------------------- weights
def test_mix_adapter(model):
    perturb(model, "default", seed=8)
    perturb(model, "old", seed=9)
    src, dst = lora.adapter_state(model, "default"), lora.adapter_state(model, "old")
    eta = 0.3
    lora.mix_adapter(model, src="default", dst="old", keep=eta)
    mixed = lora.adapter_state(model, "old")
    for k in src:
        torch.testing.assert_close(mixed[k], eta * dst[k] + (1 - eta) * src[k], atol=1e-7, rtol=1e-6)
    assert states_equal(lora.adapter_state(model, "default"), src)  # the source is untouched
    lora.mix_adapter(model, src="default", dst="ema", keep=1.0)  # keep everything
    assert not states_equal(lora.adapter_state(model, "ema"), src)
    lora.mix_adapter(model, src="default", dst="ema", keep=0.0)  # = copy
    assert states_equal(lora.adapter_state(model, "ema"), src)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            lora.mix_adapter(model, src="default", dst="old", keep=bad)


def test_adapter_state_round_trip(model, inputs):
    perturb(model, "default", seed=10)
    state = lora.adapter_state(model, "default")
    out = forward(model, inputs)
    assert all(".default." not in k for k in state)
    perturb(model, "default", seed=11)
    assert not torch.allclose(forward(model, inputs), out, atol=1e-4)
    lora.load_adapter_state(model, "default", state)
    assert states_equal(lora.adapter_state(model, "default"), state)
    torch.testing.assert_close(forward(model, inputs), out)
    # the state is a detached copy, and loads into another adapter with the same keys
    assert all(not v.requires_grad for v in state.values())
    lora.load_adapter_state(model, "ema", state)
    assert states_equal(lora.adapter_state(model, "ema"), state)
    with pytest.raises(KeyError):
        lora.load_adapter_state(model, "default", dict(list(state.items())[1:]))
    with pytest.raises(KeyError):
        lora.load_adapter_state(model, "default", {**state, "extra.lora_A.weight": torch.zeros(1)})
    with pytest.raises(KeyError):
        lora.adapter_state(model, "nope")


# ------------------------------------------------------------------------------- settings
def test_target_modules_matching_nothing_raise(base_transformer):
    m = copy.deepcopy(base_transformer)
    with pytest.raises(ValueError):
        lora.add_adapters(m, LoraSettings(rank=2, target_modules=["no_such_module"]), ["default"])
    with pytest.raises(ValueError):
        lora.add_adapters(m, SETTINGS, [])


def test_lora_settings_validation():
    with pytest.raises(ValueError):
        LoraSettings(rank=0)
    with pytest.raises(ValueError):
        LoraSettings(alpha=0.0)
    with pytest.raises(ValueError):
        LoraSettings(target_modules=[])
    s = LoraSettings()
    assert (s.rank, s.alpha, s.init) == (32, 64.0, "gaussian")
    assert s.target_modules == lora.PAPER_TARGET_MODULES
    cfg = s.peft_config()
    assert cfg.r == 32 and cfg.lora_alpha == 64.0 and cfg.init_lora_weights == "gaussian"
    assert set(cfg.target_modules) == set(lora.PAPER_TARGET_MODULES)
    assert LoraSettings(init="true").peft_config().init_lora_weights is True
    assert LoraSettings(init="False").peft_config().init_lora_weights is False


def test_scaling_is_alpha_over_rank(base_transformer, inputs):
    """Doubling α doubles the LoRA contribution (to first order: compare on one linear layer)."""
    m = copy.deepcopy(base_transformer)
    lora.add_adapters(m, LoraSettings(rank=4, alpha=8.0, target_modules=["to_q"]), ["default"])
    layer = next(mod for name, mod in m.named_modules() if name.endswith("attn.to_q"))
    assert layer.scaling["default"] == pytest.approx(2.0)
    perturb(m, "default", seed=12)
    x = torch.randn(3, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * x @ a.T @ b.T, atol=1e-5, rtol=1e-5)
