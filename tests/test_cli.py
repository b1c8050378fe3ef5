"""The `editr1` command: configs parse, the default config, a real run's folder, `python -m editr1`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from editr1.callbacks import RewardCallback
from editr1.cli import EditR1CLI, cli_main, config_path, with_default_config
from editr1.data.datamodule import EditDataModule
from editr1.module import EditR1Module

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))
KEY = re.compile(r"^\s*(- )?[A-Za-z_][\w.]*:")


DEMO = ["-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(ROOT / "configs" / "demo_smoke.yaml")]


class ParseOnlyCLI(EditR1CLI):
    """Parses and type-checks a config without building anything (real-model configs name hub ids)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*configs: Path):
    args = []
    for c in configs:
        args += ["--config", str(c)]
    cli = ParseOnlyCLI(EditR1Module, EditDataModule, args=args, run=False, auto_configure_optimizers=False)
    return cli.config


def test_there_are_configs():
    assert (ROOT / "configs" / "demo.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses(path):
    demo = ROOT / "configs" / "demo.yaml"
    cfg = parse(demo, path) if path != demo else parse(demo)  # partial configs compose onto the demo
    assert cfg.model.policy.class_path
    assert cfg.reward.model.class_path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_has_a_comment(path):
    missing = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if KEY.match(line) and "#" not in line and line.strip() not in ("init_args:", "- init_args:"):
            missing.append(f"{path.name}:{n}: {line.strip()}")
    assert not missing, "config keys without a comment:\n" + "\n".join(missing)


def test_default_config_is_the_demo_and_is_installed_with_the_package():
    assert config_path() == ROOT / "configs" / "demo.yaml"
    assert with_default_config(["fit"]) == ["fit", "--config", str(config_path())]
    assert with_default_config(["fit", "-c", "x.yaml"]) == ["fit", "-c", "x.yaml"]
    assert with_default_config(["fit", "--help"]) == ["fit", "--help"]


def test_packaging_lists_every_subpackage():
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"packages = \[(.*?)\]", text, re.S).group(1)
    listed = {p.strip().strip('"') for p in block.split(",") if p.strip()}
    found = {"editr1"} | {
        "editr1." + ".".join(p.parent.relative_to(ROOT / "src" / "editr1").parts)
        for p in (ROOT / "src" / "editr1").rglob("__init__.py")
        if p.parent != ROOT / "src" / "editr1"
    }
    assert found | {"editr1.configs", "editr1.assets"} == listed


def test_demo_config_runs_in_process_into_one_run_folder(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["fit", *DEMO, "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--reward.log_images_every_n_steps=2"]
    )
    assert cli.trainer.global_step == 3
    run = Path(cli.trainer.log_dir).resolve()
    assert run.parent.parent == tmp_path.resolve() / "runs"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    ea = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in (
        "reward/mean",
        "reward/std",
        "frac_reward_zero_std",
        "filter/frac_groups_dropped",
        "loss/policy",
        "loss/kl",
        "nft/old_deviation",
        "lr",
        "time/rollout_s",
        "time/reward_s",
        "time/train_s",
        "val/reward",
    ):
        assert tag in scalars, tag
    # one rollout per optimiser step, plus one per step skipped because the filter dropped every group
    skipped = int(ea.Scalars("filter/steps_skipped")[-1].value) if "filter/steps_skipped" in scalars else 0
    assert len(ea.Scalars("reward/mean")) == 3 + skipped
    assert "rollouts/source_edits" in ea.Tags()["images"]
    assert "val/source_edit" in ea.Tags()["images"]
    assert {"eval/heldout/before", "eval/heldout/after", "eval/unseen/after"} <= scalars
    assert (run / "scene_eval.json").is_file()
    assert any(isinstance(cb, RewardCallback) for cb in cli.trainer.callbacks)


def test_validate_subcommand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["validate", *DEMO])
    assert "val/reward" in cli.trainer.callback_metrics


def test_python_dash_m_prints_the_default_config(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, "-m", "editr1", "fit", "--print_config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["policy"]["class_path"] == "editr1.policies.FluxKontextPolicy"
    assert cfg["model"]["policy"]["init_args"]["resolution"] == 32
    assert cfg["reward"]["model"]["class_path"] == "editr1.rewards.SceneReward"
    assert cfg["seed_everything"] == 0
    assert cfg["model"]["policy"]["init_args"]["tiny"]["weights"] == "asset:demo_base/model.safetensors"


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("python3 -m venv")]
    assert len(commands) >= 2
    assert commands[0].endswith("&& editr1 fit")
    assert commands[1].endswith("python -m pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_fit_on_the_bundled_uniworld_folder(tmp_path, monkeypatch):
    sample = ROOT / "data" / "sample_uniworld"
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            *DEMO,
            f"--data.path={sample}",
            f"--data.val_path={sample}",
            "--model.rollout.group_size=2",
            "--trainer.callbacks=[]",
        ]
    )
    assert cli.trainer.global_step == 2
    assert 0.0 <= float(cli.trainer.callback_metrics["val/reward"]) <= 1.0


def test_fit_step_with_the_tiny_qwen_image_edit(tmp_path, monkeypatch):
    from editr1.policies import QwenImageEditPolicy

    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            *DEMO,
            "-c",
            str(ROOT / "configs" / "model" / "tiny_qwen_image_edit.yaml"),
            "--trainer.max_steps=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.model.policy, QwenImageEditPolicy)
    assert cli.trainer.global_step == 1
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("model", ["flux_kontext_dev", "qwen_image_edit", "qwen_image_edit_2509"])
def test_real_model_configs_compose_with_reward_and_trainer(model):
    cfg = parse(
        ROOT / "configs" / "model" / f"{model}.yaml",
        ROOT / "configs" / "reward" / "qwen25vl_32b_vllm.yaml",
        ROOT / "configs" / "trainer" / "gpu.yaml",
    )
    policy = cfg.model.policy.init_args
    assert policy.pretrained_model_name_or_path and policy.resolution == 512 and policy.torch_dtype == "bfloat16"
    assert (cfg.model.rollout.group_size, cfg.model.rollout.steps, cfg.data.batch_size) == (12, 6, 24)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.optim.lr) == (32, 64.0, 3e-4)
    assert cfg.reward.model.class_path.endswith("ServedMLLMReward")
    assert cfg.trainer.accelerator == "gpu"


def test_supervised_objective_requires_targets_unless_told_otherwise():
    class Stop(ParseOnlyCLI):
        def _run_subcommand(self, subcommand: str) -> None:
            pass

    sft = ["fit", "--config", str(ROOT / "configs" / "sft_demo.yaml")]
    cli = Stop(EditR1Module, EditDataModule, args=sft, auto_configure_optimizers=False)
    assert cli.config.fit.data.targets == "require"  # rows without a target are skipped, not a crash mid-run
    cli = Stop(EditR1Module, EditDataModule, args=sft + ["--data.targets=ignore"], auto_configure_optimizers=False)
    assert cli.config.fit.data.targets == "ignore"
    cli = Stop(
        EditR1Module,
        EditDataModule,
        args=["fit", "--config", str(ROOT / "configs" / "demo.yaml")],
        auto_configure_optimizers=False,
    )
    assert cli.config.fit.data.targets == "auto"


def test_fit_help_and_a_bad_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: editr1 [options] fit")
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--trainer.max_stepz=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --trainer.max_stepz" in err and "Traceback" not in err


def test_a_renamed_key_names_its_new_name(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  rollout:\n    lower_order_second: true\n")
    for extra in (["-c", str(old)], ["--model.rollout.lower_order_second=true"]):
        with pytest.raises(SystemExit, match="first_order_second_to_last"):
            cli_main(["fit", *DEMO, *extra], run=True)


RECIPE = ROOT / "configs" / "recipes" / "edit_r1_reference.yaml"


@pytest.mark.parametrize("model", ["flux_kontext_dev", "qwen_image_edit_2509"])
def test_reference_recipe_composes_with_the_paper_configs(model):
    cfg = parse(
        ROOT / "configs" / "model" / f"{model}.yaml",
        ROOT / "configs" / "reward" / "qwen25vl_32b_vllm_reference.yaml",
        RECIPE,
        ROOT / "configs" / "trainer" / "gpu.yaml",
    )
    f = cfg.reward.filter
    assert (f.rule, f.ban, f.ban_rule, f.group_by) == ("strict", True, "paper", "instruction")
    assert cfg.reward.on_failure == "zero"
    assert cfg.model.nft.normalize == "reference" and cfg.model.rollout.first_order_second_to_last is False
    judge = cfg.reward.model.init_args
    assert (judge.image_format, judge.digit_tokens, judge.max_pixels) == ("jpeg", "plain", None)
    assert cfg.model.policy.init_args.resolution == 512  # the model config's own settings stay


def test_reference_recipe_runs_a_cpu_smoke_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            "-c",
            str(ROOT / "configs" / "demo.yaml"),
            "-c",
            str(RECIPE),
            "-c",
            str(ROOT / "configs" / "demo_smoke.yaml"),
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 2
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, RewardCallback))
    assert cb.filter.rule == "strict" and cb.filter.group_by == "instruction"
    assert cli.model.nft.normalize == "reference" and cli.model.use_ema
    assert all(b.startswith("instruction:") for b in cb.banned)
    assert "val/reward" in cli.trainer.callback_metrics
