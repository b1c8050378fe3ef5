"""LoRA export: diffusers' own ``load_lora_weights`` on a fresh pipeline reproduces the trained policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import small_module, small_trainer, tiny_policy
from editr1.callbacks import ExportLora, RewardCallback
from editr1.cli import cli_main
from editr1.export import diffusers_lora_state, export_checkpoint, export_module
from editr1.policies import Flux2KleinPolicy, QwenImageEditPolicy
from editr1.policies import lora as adapters
from editr1.rewards import SceneReward

PROMPT = "make the red circle blue"


def _velocity(policy, seed=0):
    img = Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (policy.height, policy.width, 3), dtype=np.uint8)
    )
    cond = policy.encode(policy.preprocess([img]), [PROMPT])
    x = torch.randn((2, *policy.latent_shape()), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return policy.velocity(x, torch.tensor([0.8, 0.3]), cond.select([0, 0]))


def test_checkpoint_export_loads_in_diffusers_and_matches_the_trained_policy(tmp_path, scenes_data):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = small_module()
    exporter = ExportLora()
    trainer = small_trainer(
        [
            RewardCallback(model=SceneReward(), log_images_every_n_steps=0),
            exporter,
            ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True),
        ],
        max_steps=2,
        enable_checkpointing=True,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=scenes_data)
    trained = _velocity(module.policy)
    with module.policy.adapter(None):
        base = _velocity(module.policy)
    assert (trained - base).abs().max() > 1e-4  # training moved the adapter

    out = export_checkpoint(tmp_path / "ck" / "last.ckpt", tmp_path / "lora")
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("transformer.") and ".default." not in k for k in keys)
    info = json.loads(meta["lora_adapter_metadata"])
    assert info["transformer.r"] == 4 and info["transformer.lora_alpha"] == 8.0  # strength = alpha / r = 2

    fresh = tiny_policy()  # the same base, no adapters
    fresh.pipe.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader
    torch.testing.assert_close(_velocity(fresh), trained, atol=1e-5, rtol=1e-5)
    # the automatic export at the end of fit wrote the same thing
    assert exporter.path and Path(exporter.path).is_file()
    with safe_open(exporter.path, "pt") as a, safe_open(str(out), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)


def test_qwen_image_edit_export_round_trip(tmp_path):
    make = lambda: QwenImageEditPolicy(resolution=32, condition_resolution=56)  # noqa: E731
    module = small_module(policy=make())
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p, generator=None))
    trained = _velocity(module.policy)
    export_module(module, tmp_path / "q")
    fresh = make()
    fresh.pipe.load_lora_weights(str(tmp_path / "q"))
    torch.testing.assert_close(_velocity(fresh), trained, atol=1e-5, rtol=1e-5)


def test_flux2_klein_export_round_trip(tmp_path):
    from editr1.policies.flux2_klein import FLUX2_TARGET_MODULES

    make = lambda: Flux2KleinPolicy(resolution=32, max_sequence_length=24)  # noqa: E731
    settings = adapters.LoraSettings(rank=4, alpha=8.0, target_modules=FLUX2_TARGET_MODULES)
    module = small_module(policy=make(), lora=settings)
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained = _velocity(module.policy)
    export_module(module, tmp_path / "k")
    with safe_open(str(tmp_path / "k" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(".to_qkv_mlp_proj.lora_A." in k for k in f.keys())  # noqa: SIM118
    fresh = make()
    fresh.pipe.load_lora_weights(str(tmp_path / "k"))  # Flux2LoraLoaderMixin's own loader
    torch.testing.assert_close(_velocity(fresh), trained, atol=1e-5, rtol=1e-5)


def test_export_lora_command_and_errors(tmp_path, scenes_data, capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = small_module(ema=True)
    trainer = small_trainer(
        [
            RewardCallback(model=SceneReward(), log_images_every_n_steps=0),
            ModelCheckpoint(dirpath=tmp_path, save_last=True),
        ],
        max_steps=1,
        enable_checkpointing=True,
    )
    trainer.fit(module, datamodule=scenes_data)
    cli_main(["export-lora", str(tmp_path / "last.ckpt"), str(tmp_path / "ema"), "--adapter", "ema"])
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().out
    ema = diffusers_lora_state(
        {f"policy.transformer.{k}": v for k, v in module.policy.transformer.state_dict().items()}, "ema"
    )
    with safe_open(str(tmp_path / "ema" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor("transformer." + k), v) for k, v in ema.items())
    # the same export from a config file (jsonargparse's --config), and a missing checkpoint is a message
    cfg = tmp_path / "export.yaml"
    cfg.write_text(
        json.dumps({"checkpoint": str(tmp_path / "last.ckpt"), "out_dir": str(tmp_path / "cfg"), "adapter": "ema"})
    )
    cli_main(["export-lora", "--config", str(cfg)])
    with safe_open(str(tmp_path / "cfg" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor("transformer." + k), v) for k, v in ema.items())
    with pytest.raises(SystemExit, match=r"^editr1 export-lora: error: .*No such file.*missing\.ckpt"):
        cli_main(["export-lora", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")])
    with pytest.raises(ValueError, match="not 'old'|adapters"):
        export_checkpoint(tmp_path / "last.ckpt", tmp_path / "x", adapter="nope")
    with pytest.raises(KeyError):
        diffusers_lora_state({"policy.transformer.a.weight": torch.zeros(1)})
    assert adapters.EMA == "ema"


def test_lora_weights_start_every_adapter_from_an_exported_lora(tmp_path):
    module = small_module()
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained = _velocity(module.policy)
    export_module(module, tmp_path / "lora")
    loaded = small_module(lora_weights=str(tmp_path / "lora"))
    torch.testing.assert_close(_velocity(loaded.policy), trained, atol=1e-6, rtol=1e-6)
    with loaded.policy.adapter(adapters.OLD):  # θ_old starts equal to θ
        torch.testing.assert_close(_velocity(loaded.policy), trained, atol=1e-6, rtol=1e-6)
    from editr1.policies.lora import LoraSettings

    with pytest.raises(ValueError, match="rank 4, alpha 8.0"):
        small_module(lora=LoraSettings(rank=8, alpha=8.0), lora_weights=str(tmp_path / "lora"))
    with pytest.raises(FileNotFoundError):
        small_module(lora_weights=str(tmp_path / "nowhere"))


def test_predict_a_folder_of_images_with_one_instruction_and_a_lora(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    demo = ["-c", str(root / "configs" / "demo.yaml"), "-c", str(root / "configs" / "demo_smoke.yaml")]
    base = cli_main(demo, run=False).model
    with torch.no_grad():
        for p in base.policy.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    export_module(base, tmp_path / "lora")
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(["one.png", "two.jpg"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / name)
    written = {}
    for run, extra in (("base", []), ("with_lora", [f"--model.lora_weights={tmp_path / 'lora'}"])):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        cli_main(
            [
                "predict",
                *demo,
                f"--data.predict_path={images}",
                "--data.predict_instruction=make the red circle blue",
                "--trainer.enable_progress_bar=false",
                *extra,
            ]
        )
        out = tmp_path / run / "runs" / "demo" / "predictions"
        lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert sorted(line["key"] for line in lines) == ["one", "two"]
        assert all(line["prompt"] == "make the red circle blue" for line in lines)
        written[run] = {line["key"]: np.asarray(Image.open(out / line["file"])) for line in lines}
    assert written["base"]["one"].shape == (32, 32, 3)
    assert np.abs(written["base"]["one"].astype(int) - written["with_lora"]["one"]).max() > 0  # the LoRA was applied


def test_exported_lora_file_gets_the_mode_every_other_output_gets(tmp_path):
    """safetensors writes through a private temporary file (mode 0600); the export must not keep that mode."""
    import os
    import stat

    from editr1.export import write_lora

    state = {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
    settings = {"r": 2, "lora_alpha": 4, "target_modules": ["a"]}
    previous = os.umask(0o002)  # a group-shared folder
    try:
        path = write_lora(tmp_path / "lora", state, settings, "FluxKontextPipeline")
        probe = tmp_path / "lora" / "probe"
        with open(probe, "w"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(probe.stat().st_mode) == 0o664
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("transformer.a.lora_B.weight"), state["a.lora_B.weight"])
