"""Base editing models behind one interface, one file each."""

from editr1.policies.base import Condition, EditPolicy
from editr1.policies.flux2_klein import Flux2KleinPolicy, TinyFlux2Klein
from editr1.policies.flux_kontext import FluxKontextPolicy, TinyFlux
from editr1.policies.lora import LoraSettings
from editr1.policies.qwen_image_edit import QwenImageEditPolicy, TinyQwenImage

__all__ = [
    "Condition",
    "EditPolicy",
    "Flux2KleinPolicy",
    "FluxKontextPolicy",
    "LoraSettings",
    "QwenImageEditPolicy",
    "TinyFlux",
    "TinyFlux2Klein",
    "TinyQwenImage",
]
