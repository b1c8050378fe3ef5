"""LoRA export for diffusers: ``pytorch_lora_weights.safetensors`` that the pipeline's own
``load_lora_weights`` reads, with the rank/alpha metadata so the strength is right.

    editr1 export-lora runs/demo/version_0/checkpoints/last.ckpt out/lora [--adapter ema]

The file is written by the diffusers pipeline class's ``save_lora_weights`` (the format diffusers
itself writes), from a checkpoint (adapters only, read with ``weights_only=True``) or, at the end of
``fit``, from the live module (:class:`editr1.callbacks.ExportLora`; gathered whole under FSDP2, written
by rank 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

PIPELINES = ("FluxKontextPipeline", "Flux2KleinPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")
PREFIX = "policy.transformer."


def _pipeline_class(name: str):
    if name not in PIPELINES:
        raise ValueError(f"don't know how to export a LoRA for pipeline {name!r} (known: {PIPELINES})")
    import diffusers

    return getattr(diffusers, name)


def diffusers_lora_state(state_dict: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, torch.Tensor]:
    """Module state-dict keys ``policy.transformer.<module>.lora_A.<adapter>.weight`` → peft/diffusers keys
    ``<module>.lora_A.weight`` (diffusers adds the ``transformer.`` prefix when saving)."""
    marker = f".{adapter}."
    out = {}
    for key, value in state_dict.items():
        if key.startswith(PREFIX) and ".lora_" in key and marker in key:
            out[key[len(PREFIX) :].replace(marker, ".")] = value.detach().to("cpu", torch.float32).contiguous()
    if not out:
        raise KeyError(f"no weights of LoRA adapter {adapter!r} in this state dict")
    return out


def write_lora(out_dir: str | Path, state: dict[str, torch.Tensor], lora: dict, pipeline: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "r": int(lora["r"]),
        "lora_alpha": float(lora["lora_alpha"]),
        "target_modules": list(lora["target_modules"]),
    }
    _pipeline_class(pipeline).save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata, safe_serialization=True
    )
    path = out / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise RuntimeError(f"diffusers did not write {path}")
    # safetensors (0.8) creates the file with mode 0600 whatever the umask: give it the mode open() gives
    # every other output, so the group can read it when the umask lets it
    os.chmod(path, 0o666 & ~_umask())
    return path


def _umask() -> int:
    """The process's umask; read from /proc where it can be (setting it to read it back is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # restrictive while it is read, should another thread create a file meanwhile
    os.umask(mask)
    return mask


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, adapter: str = "default") -> Path:
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    extra = ck.get("editr1") or {}
    if "lora" not in extra or "pipeline" not in extra:
        raise ValueError(
            f"{checkpoint} is not an editr1 checkpoint with LoRA settings (written by editr1 >= this version)"
        )
    if adapter not in extra.get("adapters", []):
        raise ValueError(f"{checkpoint} has adapters {extra.get('adapters')}, not {adapter!r}")
    return write_lora(out_dir, diffusers_lora_state(ck["state_dict"], adapter), extra["lora"], extra["pipeline"])


def export_module(module, out_dir: str | Path, adapter: str = "default") -> Path | None:
    """From the live module; every rank must call it (sharded weights are gathered), rank 0 writes."""
    state = {}
    for name, param in module.named_parameters():
        if ".lora_" in name:
            state[name] = param.full_tensor() if hasattr(param, "full_tensor") else param
    lora = {
        "r": module.lora_settings.rank,
        "lora_alpha": module.lora_settings.alpha,
        "target_modules": module.lora_settings.target_modules,
    }
    if getattr(module, "global_rank", 0) != 0:
        return None
    return write_lora(out_dir, diffusers_lora_state(state, adapter), lora, type(module.policy.pipe).__name__)


def export_lora(checkpoint: str, out_dir: str, adapter: Literal["default", "ema", "old"] = "default") -> Path:
    """Write one adapter of an editr1 checkpoint as a diffusers LoRA.

    Args:
        checkpoint: an editr1 checkpoint (e.g. runs/demo/version_0/checkpoints/last.ckpt).
        out_dir: folder for pytorch_lora_weights.safetensors (made if absent).
        adapter: which adapter to export: default (the trained one), ema (its moving average, in runs that
            keep one) or old (the θ_old copy).
    """
    path = export_checkpoint(checkpoint, out_dir, adapter)
    print(f"wrote {path} (load it with pipe.load_lora_weights({str(Path(out_dir))!r}))")
    return path


def export_lora_main(args: list[str]) -> None:
    """``editr1 export-lora CHECKPOINT OUT_DIR [--adapter ema]`` (:func:`export_lora`)."""
    import pickle

    from editr1.cli import function_cli

    function_cli(
        export_lora,
        args,
        "editr1 export-lora",
        description=__doc__,
        user_errors=(OSError, ValueError, KeyError, pickle.UnpicklingError),
    )


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers LoRA file (``pytorch_lora_weights.safetensors``, or the folder holding it) → the
    transformer's LoRA weights keyed ``<module>.lora_A.weight`` and its adapter metadata (``r``,
    ``lora_alpha``, …; empty when the file carries none)."""
    import json

    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "pytorch_lora_weights.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file {p} not found (expected pytorch_lora_weights.safetensors)")
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: only .safetensors LoRA files are loaded (no pickle)")
    state = {}
    with safe_open(str(p), framework="pt") as f:
        raw_meta = (f.metadata() or {}).get("lora_adapter_metadata")
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if not key.startswith("transformer."):
                raise ValueError(
                    f"{p}: weight {key!r} is not for the transformer (text-encoder LoRAs are not supported)"
                )
            state[key[len("transformer.") :]] = f.get_tensor(key)
    meta = {}
    if raw_meta:
        meta = {k.split(".", 1)[1]: v for k, v in json.loads(raw_meta).items() if k.startswith("transformer.")}
    if not state:
        raise ValueError(f"{p} holds no LoRA weights")
    return state, meta


def load_lora(policy, path: str | Path, settings, adapters: list[str]) -> None:
    """Load a diffusers LoRA file into the policy's ``adapters`` (all of them: a run that continues from
    it starts with θ_old = θ). Rank and α must match the run's LoRA settings, so the strength is right."""
    from editr1.policies import lora as lora_lib

    state, meta = read_lora(path)
    if meta:
        r, alpha = int(meta.get("r", settings.rank)), float(meta.get("lora_alpha", settings.alpha))
        if r != settings.rank or abs(alpha - settings.alpha) > 1e-6:
            raise ValueError(
                f"{path}: LoRA rank {r}, alpha {alpha}; this run's lora settings are rank "
                f"{settings.rank}, alpha {settings.alpha} — set model.lora to match"
            )
    for name in adapters:
        params = lora_lib.adapter_parameters(policy.transformer, name)
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit this model's LoRA layout: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]} (check model.lora.target_modules and the base model)"
            )
        lora_lib.load_adapter_state(
            policy.transformer, name, {k: v.to(p.dtype) for k, p in params.items() for v in [state[k]]}
        )
