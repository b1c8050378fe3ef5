"""``editr1 plan`` (editr1.planning.command): the real FLUX.1-Kontext and Qwen-Image-Edit built on the meta device
from the shipped model configs have the published parameter counts, exactly; the table of a run; config handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from editr1.cli import cli_main
from editr1.planning.command import build_on_meta, load_run_config, merge, split_configs
from editr1.policies.flux_kontext import FluxKontextPolicy
from editr1.policies.lora import LoraSettings, adapter_parameters, add_adapters
from editr1.policies.qwen_image_edit import QwenImageEditPolicy

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "model"


def _architecture(name: str) -> dict:
    return yaml.safe_load((MODELS / name).read_text())["model"]["policy"]["init_args"]["architecture"]


# Published sizes: FLUX.1 [dev] transformer 11,901,408,320 (the guidance embedding included); CLIP ViT-L/14 text
# tower 123,060,480; T5 v1.1 XXL encoder 4,762,310,656; FLUX VAE 83,819,683; Qwen-Image transformer
# 20,430,401,088; Qwen2.5-VL-7B-Instruct 8,292,166,656; Qwen-Image VAE 126,892,531.
# LoRA r 32 on a 3072 → 3072 projection: 32·(3072 + 3072) = 196,608 parameters. FLUX: 19 double blocks × 8
# projections + 38 single blocks × 3 (to_q, to_k, to_v; no to_out) = 266 → 52,297,728. Qwen-Image: 60 blocks × 8
# = 480 → 94,371,840.
CASES = {
    "flux_kontext_dev.yaml": (
        FluxKontextPolicy,
        {
            "transformer": 11_901_408_320,
            "vae": 83_819_683,
            "text_encoder": 123_060_480,
            "text_encoder_2": 4_762_310_656,
        },
        266 * 196_608,
    ),
    "qwen_image_edit.yaml": (
        QwenImageEditPolicy,
        {"transformer": 20_430_401_088, "vae": 126_892_531, "text_encoder": 8_292_166_656},
        480 * 196_608,
    ),
}


@pytest.mark.parametrize("config", sorted(CASES))
def test_meta_builds_have_the_published_parameter_counts(config):
    cls, expected, lora = CASES[config]
    with torch.device("meta"):
        policy = cls(torch_dtype="bfloat16", architecture=_architecture(config))
        add_adapters(policy.transformer, LoraSettings(rank=32, alpha=64.0), ["default"])
    counts = {
        name: sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n) for name, m in policy.named_children()
    }
    assert counts == expected
    assert sum(p.numel() for p in adapter_parameters(policy.transformer, "default").values()) == lora
    assert all(p.is_meta for p in policy.parameters())
    assert {p.dtype for n, p in policy.named_parameters() if "lora_" not in n} == {torch.bfloat16}


def test_qwen_image_edit_2509_has_the_architecture_of_qwen_image_edit():
    assert _architecture("qwen_image_edit_2509.yaml") == _architecture("qwen_image_edit.yaml")


def test_configs_compose_as_fit_composes_them():
    # the demo's FLUX.1-Kontext, then the tiny Qwen-Image-Edit: a new class_path drops the FLUX arguments
    cfg = load_run_config([str(ROOT / "configs" / "demo.yaml"), str(MODELS / "tiny_qwen_image_edit.yaml")])
    policy = cfg["model"]["policy"]
    assert policy["class_path"] == "editr1.policies.QwenImageEditPolicy"
    assert "guidance_scale" not in policy["init_args"] and policy["init_args"]["tiny"]["layers"] == 1
    assert cfg["model"]["lora"]["rank"] == 4 and cfg["data"]["batch_size"] == 8  # the demo's, kept


def test_split_configs_and_merge():
    files, rest = split_configs(["-c", "a.yaml", "--devices", "2", "--config=b.yaml", "--config", "c.yaml"])
    assert files == ["a.yaml", "b.yaml", "c.yaml"] and rest == ["--devices", "2"]
    base = {"model": {"lora": {"rank": 4, "alpha": 8}, "seed": 1}, "trainer": {"callbacks": [1, 2]}}
    over = {"model": {"lora": {"rank": 32}}, "trainer": {"callbacks": [3]}}
    assert merge(base, over) == {"model": {"lora": {"rank": 32, "alpha": 8}, "seed": 1}, "trainer": {"callbacks": [3]}}


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_run_config([str(tmp_path / "missing.yaml")])
    (tmp_path / "t.yaml").write_text("model: {lora: {rank: many}}\n")
    with pytest.raises(ValueError, match="do not parse"):
        load_run_config([str(tmp_path / "t.yaml")])
    hub = {
        "policy": {
            "class_path": "editr1.policies.FluxKontextPolicy",
            "init_args": {"pretrained_model_name_or_path": "x/y"},
        }
    }
    with pytest.raises(ValueError, match="architecture"):
        build_on_meta(hub)


def test_plan_prints_the_table_for_the_demo_sharded_over_two_processes(capsys, tmp_path):
    fsdp = tmp_path / "fsdp.yaml"
    run = {
        "trainer": {"devices": 4, "strategy": {"class_path": "editr1.strategies.FSDP2Strategy"}},
        "model": {"nft": {"micro_batch_size": 8}, "rollout": {"batch_size": 8}},
    }
    fsdp.write_text(yaml.safe_dump(run))
    cli_main(
        ["plan", "-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(fsdp), "--devices", "2", "--gpu_memory", "100MB"]
    )
    out = capsys.readouterr().out
    assert "FluxKontextPolicy at 32x32, 1 machine(s) x 2 process(es) = 2 (FSDP2 sharded)" in out
    assert "transformer (frozen)" in out and "LoRA, per adapter" in out and "FSDP2 units gathered" in out
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert "micro-batch 8, ckpt off" in out and "rollout chunk (8 samples" in out
    assert "fits" in lines["peak"] and "DOES NOT FIT" not in lines["peak"]
    largest = [int(line.rsplit(":", 1)[1]) for line in out.splitlines() if line.startswith("largest micro-batch")]
    # the demo's 8 prompts x K 8 = 64 samples a step need more than 100 MB in one micro-batch without checkpointing
    assert len(largest) == 2 and 8 <= largest[0] < 64 and largest[1] > largest[0]  # checkpointing fits more


def test_a_model_config_alone_is_enough_no_reward_needed():
    from editr1.planning.command import load_run_config

    cfg = load_run_config([str(ROOT / "configs" / "model" / "flux_kontext_dev.yaml")])  # no reward config given
    assert cfg["model"]["policy"]["class_path"].endswith("FluxKontextPolicy")
    assert cfg["reward"]["model"]["class_path"] == "editr1.rewards.SceneReward"  # the stand-in: not part of the plan
