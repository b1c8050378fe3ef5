"""benchmarks/gpu_perf.py on the CPU at its tiny preset (CI has no GPU): every section runs and prints, the real
transformer sizes come from the model configs, and the real fit command parses as an editr1 fit config."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_perf  # noqa: E402


def test_tiny_preset_on_the_cpu_prints_every_figure(capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and steady on a shared machine
    try:
        _run()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for text in (
        "== flux (tiny)",
        "-- activation checkpointing off",
        "-- activation checkpointing on",
        "NFT step",
        "MFU: unknown peak rate",
        "the NFT step's own peak (above what was held before it): measured",
        "rollout of one group",
    ):
        assert text in out, text


def _run() -> None:
    gpu_perf.main(
        [
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--only",
            "flux",
            "--dtype",
            "fp32",
            "--resolution",
            "32",
            "--text-tokens",
            "8",
            "--group-size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--fit-steps",
            "0",
        ]
    )


def test_real_sizes_are_the_model_configs():
    flux, qwen = gpu_perf.transformer_sizes("flux", "real"), gpu_perf.transformer_sizes("qwen", "real")
    assert (flux["num_layers"], flux["num_single_layers"], flux["joint_attention_dim"]) == (19, 38, 4096)
    assert (qwen["num_layers"], qwen["num_attention_heads"], qwen["joint_attention_dim"]) == (60, 24, 3584)


def test_the_real_fit_command_parses(tmp_path):
    from editr1.cli import cli_main

    args = SimpleNamespace(preset="real", fit_groups=2, fit_steps=2)
    cmd = gpu_perf.fit_command(args, tmp_path)
    assert cmd[1:4] == ["-m", "editr1", "fit"] and "--model.policy.init_args.pretrained_model_name_or_path=null" in cmd
    from jsonargparse import capture_parser

    parser = capture_parser(lambda: cli_main(cmd[4:], run=False))
    cfg = parser.parse_args(cmd[4:])
    assert cfg.model.policy.init_args.pretrained_model_name_or_path is None
    assert cfg.model.policy.init_args.architecture["transformer"]["num_layers"] == 19
    assert cfg.reward.model.class_path == "editr1.rewards.LocalMLLMReward" and cfg.data.batch_size == 2
