"""Three policies on one transformer with peft LoRA adapters.

``default`` is θ (trained), ``old`` is θ_old (samples the rollouts), and the reference is the base
with every adapter disabled — no copy of the base weights is ever made. An optional ``ema`` adapter
holds an exponential moving average of θ for evaluation and export.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, set_adapter
from torch import nn

DEFAULT = "default"
OLD = "old"
EMA = "ema"

PAPER_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the transformer (the paper: r 32, α 64, Gaussian init, the attention projections); the
    ``model.lora`` section of the config (the other sections are in :mod:`editr1.settings`).

    Attributes:
        rank: the LoRA rank r.
        alpha: LoRA α; the update is scaled by α / r.
        init: peft's init_lora_weights: ``gaussian`` (A ~ N, B = 0), ``true`` (Kaiming A), …
        target_modules: module-name suffixes that get an adapter.
        old_init: how θ_old starts: ``copy`` (an exact copy of θ) or ``independent`` (its own random A, B = 0,
            so it is the base model too, as the released code's ``add_adapter("old")``). The EMA adapter
            always starts as a copy.
    """

    rank: int = 32
    alpha: float = 64.0
    init: str = "gaussian"
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_TARGET_MODULES))
    old_init: str = "copy"

    def __post_init__(self) -> None:
        if self.old_init not in ("copy", "independent"):
            raise ValueError(f"lora.old_init must be 'copy' or 'independent', got {self.old_init!r}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module")

    def peft_config(self) -> LoraConfig:
        init: bool | str = {"true": True, "false": False}.get(str(self.init).lower(), self.init)
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, init_lora_weights=init, target_modules=list(self.target_modules)
        )


def add_adapters(model: nn.Module, settings: LoraSettings, names: list[str]) -> None:
    """Inject one LoRA adapter per name; every adapter starts as an exact copy of the first one (``old``
    keeps its own initialisation when ``settings.old_init`` is ``independent``).

    Only the first adapter (normally ``default``) is trainable and active afterwards. Adapter weights
    are float32 whatever the base's dtype (a bf16 base trains float32 LoRA; peft casts the inputs).
    """
    if not names:
        raise ValueError("need at least one adapter name")
    config = settings.peft_config()
    _LAYERS.pop(model, None)  # the tuner layers are about to change
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # several adapters is the point
        for name in names:
            inject_adapter_in_model(config, model, adapter_name=name)
    _LAYERS.pop(model, None)
    if not list(_tuner_layers(model)):
        raise ValueError(f"LoRA target_modules {settings.target_modules} matched no module of {type(model).__name__}")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname and p.dtype != torch.float32:
                p.data = p.data.float()
    for name in names[1:]:
        if name == OLD and settings.old_init == "independent":
            continue
        copy_adapter(model, src=names[0], dst=name)
    activate(model, names[0])


# model -> its LoRA layers, found once: switching adapters (three times per training forward round)
# then touches only those layers instead of walking every module of the transformer.
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    layers = _LAYERS.get(model)
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        _LAYERS[model] = layers
    return layers


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter ``name`` keyed by their name with the adapter part removed."""
    marker = f".{name}."
    out = {}
    for pname, p in model.named_parameters():
        if "lora_" in pname and marker in pname:
            out[pname.replace(marker, ".")] = p
    if not out:
        raise KeyError(f"no LoRA adapter named {name!r} on {type(model).__name__}")
    return out


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A detached copy of adapter ``name``'s weights (keys without the adapter name)."""
    return {k: p.detach().clone() for k, p in adapter_parameters(model, name).items()}


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    params = adapter_parameters(model, name)
    missing = set(params) - set(state)
    unexpected = set(state) - set(params)
    if missing or unexpected:
        raise KeyError(f"adapter {name!r}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


@torch.no_grad()
def copy_adapter(model: nn.Module, src: str, dst: str) -> None:
    mix_adapter(model, src=src, dst=dst, keep=0.0)


@torch.no_grad()
def mix_adapter(model: nn.Module, src: str, dst: str, keep: float) -> None:
    """``dst ← keep·dst + (1 − keep)·src`` for every LoRA weight (θ_old / EMA update)."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    src_p = adapter_parameters(model, src)
    dst_p = adapter_parameters(model, dst)
    for k, d in dst_p.items():
        d.lerp_(src_p[k].to(d.dtype), 1.0 - keep)


def activate(model: nn.Module, name: str) -> None:
    """Make ``name`` the only active adapter: trainable if it is ``default``, frozen otherwise.

    The same end state as peft's ``enable_adapters(True)`` then ``set_adapter(model, name, ...)`` on every
    layer (no auxiliary peft modules exist here: editr1 injects LoRA layers only), without walking the
    whole module tree at each switch."""
    layers = _tuner_layers(model)
    if not layers:  # nothing injected: let peft say so
        set_adapter(model, name, inference_mode=name != DEFAULT)
        return
    for layer in layers:
        if layer.merged:
            raise RuntimeError("editr1 never merges LoRA weights into the base; found a merged layer")
        if layer.disable_adapters:
            layer.enable_adapters(True)
        layer.set_adapter(name, inference_mode=name != DEFAULT)


@contextlib.contextmanager
def using(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run the block with adapter ``name`` active, or with all adapters off for ``None`` (the
    reference policy). ``default`` is active and trainable again afterwards."""
    try:
        if name is None:
            for layer in _tuner_layers(model):
                layer.enable_adapters(False)
        else:
            activate(model, name)
        yield
    finally:
        activate(model, DEFAULT)


def adapter_names(model: nn.Module) -> list[str]:
    names: set[str] = set()
    for layer in _tuner_layers(model):
        for layer_name in layer.adapter_layer_names:
            names.update(getattr(layer, layer_name).keys())
    return sorted(names)
