"""The `editr1` command: configs parse, the default config, a real run's folder, `python -m editr1`."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from editr1.callbacks import RewardCallback
from editr1.cli import EditR1CLI, cli_main, config_path, describe_weights, find_last_checkpoint, is_empty_run, plain
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


def _exit(capsys, args: list[str]) -> tuple[int | str | None, str, str]:
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _option_help(help_text: str, option: str) -> str:
    """One option's help from ``--help`` output, whitespace collapsed."""
    flat = " ".join(help_text.split())
    return flat.split(f" {option} ", 1)[1].split(" --", 1)[0]


def test_default_config_is_the_demo_and_help_and_print_config_show_its_values(capsys, tmp_path):
    assert config_path() == ROOT / "configs" / "demo.yaml"  # installed with the package
    code, out, _ = _exit(capsys, ["fit", "--help"])
    assert code == 0 and str(config_path()) in out  # jsonargparse names its default config file
    assert "default: 8)" in _option_help(out, "--model.rollout.group_size")  # demo.yaml's, what `fit` runs
    assert "default: 0.001)" in _option_help(out, "--model.optim.lr")
    code, out, _ = _exit(capsys, ["fit", "--print_config"])
    cfg = yaml.safe_load(out)
    assert (cfg["model"]["rollout"]["group_size"], cfg["model"]["optim"]["lr"], cfg["seed_everything"]) == (8, 1e-3, 0)
    code, out, _ = _exit(capsys, ["fit", *DEMO, "--print_config"])  # -c files compose, later ones win
    cfg = yaml.safe_load(out)
    assert (cfg["model"]["rollout"]["group_size"], cfg["model"]["optim"]["lr"]) == (4, 1e-3)
    part = tmp_path / "part.yaml"
    part.write_text("trainer:\n  max_steps: 5\n")
    code, out, _ = _exit(capsys, ["fit", "-c", str(part), "--print_config"])  # a config file replaces the demo
    cfg = yaml.safe_load(out)
    assert cfg["trainer"]["max_steps"] == 5 and cfg["seed_everything"] is True  # LightningCLI's own default


def test_help_is_plain_text(capsys):
    assert plain("``x`` is a :class:`~a.b.C`, see :func:`f` and\n   `the docs <https://x.y>`_") == (
        "x is a C, see f and the docs"
    )
    code, out, _ = _exit(capsys, ["fit", "--help"])
    assert code == 0
    for markup in ("``", ":class:", ":func:", ":meth:", ":ref:", "`_"):
        assert markup not in out, markup
    assert 'Default: "auto"' in _option_help(out, "--trainer.strategy")  # Lightning writes ``"auto"``


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


def test_demo_config_runs_in_process_into_one_run_folder(tmp_path, monkeypatch, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["fit", *DEMO, "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--reward.log_images_every_n_steps=2"]
    )
    captured = capfd.readouterr()
    err = captured.err
    lines = [line.strip() for line in captured.out.splitlines()]
    done = [i for i, line in enumerate(lines) if line.startswith("editr1 fit: done in ")]
    assert len(done) == 1 and any(line.startswith("editr1 run summary") for line in lines[: done[0]])  # at the end
    assert "litlogger" not in err and "LeafSpec" not in err and "kernels-community" not in err  # quiet
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
        "learning_rate",
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
    last = ea.Scalars("reward/mean")[-1].step  # one axis: the after-training evaluation sits at the last batch
    assert ea.Scalars("eval/heldout/before")[0].step == 0 and ea.Scalars("eval/heldout/after")[-1].step == last + 1
    assert "custom_scalars__config__" in ea.Tags()["tensors"]  # the dashboard layout
    assert (run / "scene_eval.json").is_file()
    assert any(isinstance(cb, RewardCallback) for cb in cli.trainer.callbacks)
    # --ckpt_path last in validate: the newest run's last checkpoint, not the untrained base
    cli = cli_main(["validate", *DEMO, "--ckpt_path", "last", "--trainer.enable_progress_bar=false"])
    assert Path(cli.trainer.ckpt_path).resolve() == (run / "checkpoints" / "last.ckpt").resolve()
    last = Path("runs", "demo", run.name, "checkpoints", "last.ckpt")
    assert f"validate: checkpoint {last} (the newest run's last.ckpt)" in capfd.readouterr().out


def test_validate_subcommand(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["validate", *DEMO])
    assert "val/reward" in cli.trainer.callback_metrics
    out = capsys.readouterr().out
    assert "validate: the base model with fresh adapters (no --ckpt_path, no model.lora_weights)" in out


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


# tiny_flux2_klein.yaml is parsed by test_every_config_parses; its fit step runs in test_policies_multi_image.py
@pytest.mark.parametrize("model", ["tiny_qwen_image_edit"])
def test_fit_step_with_a_tiny_model_config(tmp_path, monkeypatch, model):
    from editr1.policies import Flux2KleinPolicy, QwenImageEditPolicy

    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            *DEMO,
            "-c",
            str(ROOT / "configs" / "model" / f"{model}.yaml"),
            "--trainer.max_steps=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.model.policy, QwenImageEditPolicy if "qwen" in model else Flux2KleinPolicy)
    assert cli.trainer.global_step == 1
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()


REAL_MODELS = [
    "flux_kontext_dev",
    "qwen_image_edit",
    "qwen_image_edit_2509",
    "qwen_image_edit_2511",
    "flux2_klein_base_4b",
]


@pytest.mark.parametrize("model", REAL_MODELS)
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
    assert "did you mean --trainer.max_steps?" in err and len(err.splitlines()) <= 4  # not every option's usage


def test_config_errors_name_the_file_the_nearest_key_and_the_known_classes(tmp_path, capsys):
    def error(yaml_text: str, *extra: str) -> tuple[str, str]:
        path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml_text)
        code, _, err = _exit(capsys, ["fit", "-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(path), *extra])
        assert code == 2 and "Traceback" not in err
        return err, f"(in config file {path})"

    err, where = error("model:\n  rollout:\n    group_sise: 4\n")
    assert "model.rollout.group_sise" in err and where in err and "did you mean model.rollout.group_size?" in err
    err, where = error(
        "reward:\n  model:\n    class_path: editr1.rewards.SceneReward\n    init_args:\n      tolerence: 1\n"
    )
    assert "tolerence" in err and where in err and "did you mean tolerance?" in err
    err, where = error("model:\n  policy:\n    class_path: editr1.policies.FluxKontextPolicyy\n")
    assert where in err and "did you mean editr1.policies.FluxKontextPolicy?" in err
    known = err.split("known classes for model.policy: ", 1)[1].split("\n")[0].split(", ")
    assert {"editr1.policies.FluxKontextPolicy", "editr1.policies.QwenImageEditPolicy"} <= set(known)
    err, where = error("reward:\n  model:\n    class_path: SceneRewardd\n")
    known = err.split("known classes for reward.model: ", 1)[1].split("\n")[0].split(", ")
    assert {"editr1.rewards.SceneReward", "editr1.rewards.ServedMLLMReward", "editr1.rewards.LocalMLLMReward"} <= set(
        known
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  rollout:\n    group_size: [4\n")
    with pytest.raises(
        SystemExit, match=f"YAML syntax error in config file {re.escape(str(bad))}, line 4, column 1: .* from line 3"
    ):
        cli_main(["fit", "-c", str(bad)])


def test_an_unknown_command_after_options_lists_every_command(capsys):
    code, _, err = _exit(capsys, ["-c", str(ROOT / "configs" / "demo.yaml"), "fitt"])
    assert code == 2 and "fit, validate, test, predict, serve-reward, export-lora, make-shards, plan" in err
    assert "did you mean 'fit'?" in err


def test_a_missing_data_folder_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _exit(capsys, ["fit", *DEMO, f"--data.path={tmp_path / 'nope'}"])
    assert code == f"editr1 fit: error: data folder {tmp_path / 'nope'} does not exist"
    assert "removed runs/demo/version_0" in err and not list(tmp_path.rglob("version_*"))


def test_a_hub_model_not_in_the_local_cache_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    config = str(ROOT / "configs" / "model" / "flux_kontext_dev.yaml")
    code, _, _ = _exit(capsys, ["fit", *DEMO, "-c", config, "--trainer.accelerator=cpu"])
    assert isinstance(code, str) and code.startswith("editr1 fit: error: ") and "FLUX.1-Kontext-dev" in code
    assert "Traceback" not in code and not list(tmp_path.rglob("version_*"))


def test_only_a_run_folder_with_nothing_but_configs_and_hparams_counts_as_empty(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="run")
    logger.log_hyperparams({"lr": 0.1})  # hparams.yaml and the hyperparameter summaries
    logger.experiment.flush()
    run = Path(logger.log_dir)
    (run / "config.yaml").write_text("seed_everything: 0\n")
    (run / "checkpoints").mkdir()
    assert is_empty_run(run)
    logger.log_metrics({"reward/mean": 0.5}, step=0)
    logger.experiment.flush()
    assert not is_empty_run(run)  # a logged step
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert not is_empty_run(other)  # a checkpoint


def test_known_noise_is_silenced_and_other_warnings_are_not():
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from editr1.cli import _quiet

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet()
        warnings.warn(
            "You're resuming from a checkpoint that ended before the epoch ended and ...", UserWarning, stacklevel=1
        )
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]
    records = []
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        rank_zero_info("💡 Tip: ... try installing [litlogger](https://pypi.org/project/litlogger/) ...")
        rank_zero_info("GPU available: False, used: False")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["GPU available: False, used: False"]


def test_which_weights_validate_test_and_predict_use(tmp_path):
    trainer = {"logger": {"init_args": {"save_dir": str(tmp_path), "name": "demo"}}}
    assert find_last_checkpoint(trainer) is None
    for v in (1, 3, 10):
        (tmp_path / "demo" / f"version_{v}" / "checkpoints").mkdir(parents=True)
        (tmp_path / "demo" / f"version_{v}" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "demo" / "version_11").mkdir()  # a validate run: no checkpoint
    assert find_last_checkpoint(trainer) == (tmp_path / "demo" / "version_10" / "checkpoints" / "last.ckpt", 10)
    assert describe_weights("test", "a/last.ckpt", None, last=True) == (
        "test: checkpoint a/last.ckpt (the newest run's last.ckpt)"
    )
    assert describe_weights("predict", None, "out/lora") == (
        "predict: the base model with the LoRA out/lora (model.lora_weights)"
    )
    assert describe_weights("validate", None, None, newest=Path("runs/demo/version_0/checkpoints/last.ckpt")) == (
        "validate: the base model with fresh adapters (no --ckpt_path, no model.lora_weights); `--ckpt_path last` "
        "edits with the newest run's runs/demo/version_0/checkpoints/last.ckpt"
    )


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


@pytest.mark.parametrize(
    ("objective", "model"),
    [("nft", "qwen_image_edit"), ("flow_grpo", "flux_kontext_dev"), ("awm", "qwen_image_edit_2509")],
)
def test_objective_configs_compose_with_the_demo_model_and_reward_configs(objective, model):
    obj = ROOT / "configs" / "objectives" / f"{objective}.yaml"
    cfg = parse(
        ROOT / "configs" / "model" / f"{model}.yaml",
        ROOT / "configs" / "reward" / "qwen25vl_32b_vllm.yaml",
        obj,
        ROOT / "configs" / "trainer" / "gpu.yaml",
    )
    assert cfg.model.objective == objective
    model_cfg = yaml.safe_load((ROOT / "configs" / "model" / f"{model}.yaml").read_text())["model"]
    assert cfg.model.rollout.steps == model_cfg["rollout"]["steps"]  # the objective leaves the model's settings
    demo = parse(ROOT / "configs" / "demo.yaml", obj, ROOT / "configs" / "demo_smoke.yaml")
    assert demo.model.objective == objective and demo.trainer.max_steps == 2
    section = yaml.safe_load(obj.read_text())["model"][objective]
    assert {k: v for k, v in vars(cfg.model[objective]).items() if k in section} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in section.items()
    }
