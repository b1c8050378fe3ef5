"""LoRA export for diffusers: ``pytorch_lora_weights.safetensors`` that the pipeline's own
``load_lora_weights`` reads, with the rank/alpha metadata so the strength is right.

    editr1 export-lora runs/demo/version_0/checkpoints/last.ckpt out/lora [--adapter ema]

The file is written by the diffusers pipeline class's ``save_lora_weights`` (the format diffusers
itself writes), from a checkpoint (adapters only, read with ``weights_only=True``) or, at the end of
``fit``, from the live module (:class:`editr1.callbacks.ExportLora`; gathered whole under FSDP2, written
by rank 0).
"""

from __future__ import annotations

from pathlib import Path

import torch

PIPELINES = ("FluxKontextPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")
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
    metadata = {"r": int(lora["r"]), "lora_alpha": float(lora["lora_alpha"]), "target_modules": list(lora["target_modules"])}
    _pipeline_class(pipeline).save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata, safe_serialization=True
    )
    path = out / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise RuntimeError(f"diffusers did not write {path}")
    return path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, adapter: str = "default") -> Path:
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    extra = ck.get("editr1") or {}
    if "lora" not in extra or "pipeline" not in extra:
        raise ValueError(f"{checkpoint} is not an editr1 checkpoint with LoRA settings (written by editr1 >= this version)")
    if adapter not in extra.get("adapters", []):
        raise ValueError(f"{checkpoint} has adapters {extra.get('adapters')}, not {adapter!r}")
    return write_lora(out_dir, diffusers_lora_state(ck["state_dict"], adapter), extra["lora"], extra["pipeline"])


def export_module(module, out_dir: str | Path, adapter: str = "default") -> Path | None:
    """From the live module; every rank must call it (sharded weights are gathered), rank 0 writes."""
    state = {}
    for name, param in module.named_parameters():
        if ".lora_" in name:
            state[name] = param.full_tensor() if hasattr(param, "full_tensor") else param
    lora = {"r": module.lora_settings.rank, "lora_alpha": module.lora_settings.alpha,
            "target_modules": module.lora_settings.target_modules}
    if getattr(module, "global_rank", 0) != 0:
        return None
    return write_lora(out_dir, diffusers_lora_state(state, adapter), lora, type(module.policy.pipe).__name__)


def export_lora_main(args: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="editr1 export-lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="an editr1 checkpoint (e.g. runs/demo/version_0/checkpoints/last.ckpt)")
    ap.add_argument("out_dir", help="folder for pytorch_lora_weights.safetensors")
    ap.add_argument("--adapter", default="default", choices=["default", "ema", "old"], help="which adapter to export")
    a = ap.parse_args(args)
    path = export_checkpoint(a.checkpoint, a.out_dir, a.adapter)
    print(f"wrote {path} (load it with pipe.load_lora_weights({str(Path(a.out_dir))!r}))")
