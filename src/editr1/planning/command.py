"""``editr1 plan``: will a run fit? Before a GPU is rented.

    editr1 plan -c configs/model/flux_kontext_dev.yaml -c configs/trainer/fsdp.yaml --devices 8 --gpu_memory 80GB

The run's config files (``-c``, composed as ``fit`` composes them; the demo when none is given) name the model.
Its real architecture — the ``architecture:`` sizes of the model config, or the tiny in-code build — is built on
the meta device with the real diffusers / transformers classes (no weights, no download, no memory), with the
configured LoRA adapters injected by the module itself. The table gives, per process: parameters (frozen per
component, LoRA per adapter), bytes of the frozen weights under the FSDP2 plan, LoRA weights and gradients,
optimiser states, the step's rollout data, the activations of a training micro-batch (with the configured
checkpointing) and of a rollout chunk, simulated by running the model's own code on the meta device
(:mod:`editr1.planning.trace`), whether that fits ``--gpu_memory``, and the largest micro-batch that does, with
activation checkpointing off and on. The text encoders' own forward (once per prompt, without gradient) and the
CUDA context and allocator slack (about 0.5–1 GiB) are not counted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from editr1.planning.estimate import (
    GiB,
    ModelSizes,
    Parallel,
    Peak,
    largest_micro_batch,
    linear,
    parse_size,
    per_device,
)


def split_configs(args: list[str]) -> tuple[list[str], list[str]]:
    """``-c FILE`` / ``--config FILE`` / ``--config=FILE`` (the run's config files) apart from plan's own options."""
    files, rest, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a in ("-c", "--config") and i + 1 < len(args):
            files.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return files, rest


def merge(base: dict, over: dict) -> dict:
    """``over`` composed onto ``base`` as later config files compose onto earlier ones (mappings merge, the rest
    replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_run_config(files: list[str]) -> dict:
    """The run's config as ``editr1 fit`` composes it (its own parser: later files override earlier ones, a new
    ``class_path`` drops the old class's arguments, defaults filled in), as plain dicts; the demo when no file is
    given. Nothing is built."""
    from editr1.cli import EditR1CLI, config_path
    from editr1.data.datamodule import EditDataModule
    from editr1.module import EditR1Module

    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"config file {f} not found")

    class ParseOnly(EditR1CLI):
        def instantiate_classes(self) -> None:
            pass

        def _set_seed(self) -> None:  # nothing runs: no global seed
            pass

    # the reward does not change what the policy needs: a model config alone is enough (a reward config given
    # after it replaces this stand-in)
    stand_in = '{"reward": {"model": {"class_path": "editr1.rewards.SceneReward"}}}'
    args = ["--config", stand_in] if files else []
    args += [a for f in files or [str(config_path())] for a in ("--config", f)]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")  # plan's own options are in argv
            cli = ParseOnly(EditR1Module, EditDataModule, args=args, run=False, auto_configure_optimizers=False)
    except SystemExit as e:  # jsonargparse has printed the reason
        raise ValueError(f"the config files {files} do not parse as an editr1 fit config") from e
    return cli.config.as_dict()


def build_on_meta(model_cfg: dict):
    """The run's ``EditR1Module`` on the meta device: the policy at its ``architecture`` sizes (random-weight build,
    nothing downloaded) or its tiny build, with the configured adapters and efficiency switches."""
    import torch
    from jsonargparse import ArgumentParser

    from editr1.module import EditR1Module

    model_cfg = merge(model_cfg, {"lora_weights": None})
    init = model_cfg.get("policy", {}).get("init_args", {})
    if isinstance(init.get("tiny"), dict):  # trained weights of a tiny build do not change its sizes
        model_cfg = merge(model_cfg, {"policy": {"init_args": {"tiny": {"weights": None}}}})
    if init.get("pretrained_model_name_or_path") is not None:
        if not init.get("architecture"):
            raise ValueError(
                "the model config loads pretrained weights but gives no policy.init_args.architecture: add the "
                "components' sizes (see configs/model/flux_kontext_dev.yaml) so editr1 plan can build it"
            )
        model_cfg = merge(model_cfg, {"policy": {"init_args": {"pretrained_model_name_or_path": None}}})
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EditR1Module, "model")
    parsed = parser.parse_object({"model": model_cfg})
    with torch.device("meta"):
        return parser.instantiate_classes(parsed).model


def model_sizes(module) -> ModelSizes:
    from torch import nn

    from editr1.policies import lora
    from editr1.policies.base import _largest_module_lists

    policy = module.policy
    components = {}
    for name, m in policy.named_children():
        params = [p for n, p in m.named_parameters() if "lora_" not in n]
        components[name] = (sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params))
    roots = policy.shard_roots()
    sharded = tuple(name for name, m in policy.named_children() if any(m is r for r in roots))

    def frozen_bytes(m: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "lora_" not in n)

    units = []
    for root in roots:
        blocks = (
            _largest_module_lists(root)
            if root is not policy.transformer
            else [b for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(root, name, [])]
        )
        block_bytes = [frozen_bytes(b) for b in blocks]
        units += [*block_bytes, frozen_bytes(root) - sum(block_bytes)]
    names = lora.adapter_names(policy.transformer)
    one = sum(p.numel() for p in lora.adapter_parameters(policy.transformer, lora.DEFAULT).values())
    return ModelSizes(components, sharded, max(units, default=0), one, tuple(names))


@dataclass
class Setup:
    """What the run's config says about the step and the processes."""

    parallel: Parallel
    groups: int  # prompts per process and step
    group_size: int
    rollout_batch: int
    micro_batch: int
    checkpointing: bool
    optimizer: str
    kl: bool


def run_setup(cfg: dict, module, devices: int | None, num_nodes: int | None) -> Setup:
    trainer = cfg.get("trainer", {}) or {}
    given = trainer.get("devices", 1) if devices is None else devices
    if not isinstance(given, int) or given < 1:
        raise ValueError(f"trainer.devices is {given!r}: give the number of processes per machine with --devices N")
    strategy = trainer.get("strategy") or {}
    shard = (
        bool((strategy.get("init_args") or {}).get("shard", True))
        if isinstance(strategy, dict) and str(strategy.get("class_path", "")).endswith("FSDP2Strategy")
        else False
    )
    nodes = trainer.get("num_nodes", 1) if num_nodes is None else num_nodes
    return Setup(
        parallel=Parallel(devices=given, num_nodes=int(nodes), shard=shard),
        groups=int((cfg.get("data") or {}).get("batch_size", 1)),
        group_size=module.rollout_settings.group_size,
        rollout_batch=module.rollout_settings.batch_size,
        micro_batch=module.nft.micro_batch_size,
        checkpointing=module.efficiency.activation_checkpointing,
        optimizer=module.optim.name,
        kl=module.nft.kl_weight > 0,
    )


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rollout_data_bytes(policy, groups: int, group_size: int) -> int:
    """A step's rollouts kept until its training is done: clean latents (float32), decoded edits (float32 images)
    and one condition per prompt."""
    samples = groups * group_size
    latents = samples * math.prod(policy.latent_shape()) * 4
    edits = samples * 3 * policy.height * policy.width * 4
    cond = policy.example_condition(1, device="meta")
    return latents + edits + groups * _tensor_bytes(cond.tensors.values())


def _simulate(module, setup: Setup) -> dict:
    """Activation peaks (bytes) simulated on the meta device: training at 1 and the configured micro-batch with
    checkpointing as configured, at 1 with it switched; a rollout chunk."""
    from editr1.planning.trace import rollout_peak_bytes, training_peak_bytes

    policy = module.policy
    transformer = policy.transformer
    configured = bool(getattr(transformer, "gradient_checkpointing", False))
    out = {}
    for ckpt in (configured, not configured):
        transformer.enable_gradient_checkpointing() if ckpt else transformer.disable_gradient_checkpointing()
        at_one = training_peak_bytes(policy, 1, kl=setup.kl)
        m = setup.micro_batch if ckpt == configured else 1
        at_m = training_peak_bytes(policy, m, kl=setup.kl) if m > 1 else at_one
        out[ckpt] = linear(at_one, at_m, m)
    transformer.enable_gradient_checkpointing() if configured else transformer.disable_gradient_checkpointing()
    out["rollout"] = rollout_peak_bytes(policy, setup.rollout_batch)
    return out


def _gib(b: int | float) -> str:
    return f"{b / GiB:8.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:8.1f} MiB"


def plan_report(cfg: dict, devices: int | None = None, num_nodes: int | None = None, gpu_memory="80GB") -> str:
    """The plan of a composed run config, as the table ``editr1 plan`` prints."""
    capacity = parse_size(gpu_memory)
    module = build_on_meta(cfg["model"])
    setup = run_setup(cfg, module, devices, num_nodes)
    sizes = model_sizes(module)
    state = per_device(sizes, setup.parallel, setup.optimizer)
    policy = module.policy
    data = rollout_data_bytes(policy, setup.groups, setup.group_size)
    sim = _simulate(module, setup)
    training = sim[setup.checkpointing]
    peak = Peak(state.total, data, training(setup.micro_batch), sim["rollout"])
    p = setup.parallel
    plan = "FSDP2 sharded" if p.sharded else "replicated" if p.world > 1 else "one process"
    lines = [
        f"editr1 plan: {type(policy).__name__} at {policy.height}x{policy.width}, {p.num_nodes} machine(s) x "
        f"{p.devices} process(es) = {p.world} ({plan}); {setup.groups} prompt(s) x K {setup.group_size} per "
        f"process and step",
        "",
        f"{'parameters':<54}{'total':>16}",
    ]
    for name, (n, b) in sizes.components.items():
        lines.append(f"  {name + ' (frozen)':<52}{n:>16,}   {_gib(b).strip()}")
    lines.append(f"  {'LoRA, per adapter':<52}{sizes.lora:>16,}   adapters: {', '.join(sizes.adapters)}")
    lines += ["", "memory per process"]
    for name, b in state.parts.items():
        lines.append(f"  {'weights: ' + name:<52}{_gib(b)}")
    if p.sharded:
        lines.append(f"  {'weights: FSDP2 units gathered (2 x largest)':<52}{_gib(2 * sizes.largest_unit)}")
    ckpt = "on" if setup.checkpointing else "off"
    lines += [
        f"  {'LoRA weights (' + str(len(sizes.adapters)) + ' adapters, float32)':<52}{_gib(state.lora)}",
        f"  {'LoRA gradients':<52}{_gib(state.grads)}",
        f"  {'optimiser states (' + setup.optimizer + ')':<52}{_gib(state.optimizer)}",
        f"  {'rollout data (latents, edits, conditions)':<52}{_gib(data)}",
        f"  {f'training activations (micro-batch {setup.micro_batch}, ckpt {ckpt})':<52}{_gib(peak.training)}",
        f"  {f'rollout chunk ({setup.rollout_batch} samples, no grad)':<52}{_gib(peak.rollout)}",
        f"  {'peak':<52}{_gib(peak.total)}  of {_gib(capacity).strip()}: "
        + ("fits" if peak.total <= capacity else "DOES NOT FIT"),
        "",
    ]
    most = setup.groups * setup.group_size
    for ck in (False, True):
        b = largest_micro_batch(capacity, state.total, data, peak.rollout, sim[ck], most)
        what = f"{b}" if b else "none (not even 1 sample)"
        lines.append(f"largest micro-batch that fits, activation checkpointing {'on' if ck else 'off'}: {what}")
    if peak.rollout + state.total + data > capacity:
        lines.append("the rollout alone does not fit: lower model.rollout.batch_size or data.batch_size")
    return "\n".join(lines) + "\n"


def plan(devices: int | None = None, num_nodes: int | None = None, gpu_memory: str = "80GB") -> None:
    """Will a run fit? Builds the configured model on the meta device (no download, no memory) and prints, per
    process, its parameters and the memory of its weights, LoRA adapters and gradients, optimiser states,
    rollout data and activations, whether that fits, and the largest micro-batch that does. Give the run's
    config files with ``-c`` as for ``fit`` (the demo when none is given), e.g.
    ``editr1 plan -c configs/model/flux_kontext_dev.yaml -c configs/trainer/fsdp.yaml --devices 8``.

    Args:
        devices: processes (GPUs) per machine; default: the config's trainer.devices.
        num_nodes: machines; default: the config's trainer.num_nodes.
        gpu_memory: memory of one GPU (80GB, 141GiB, ...; GB means GiB).
    """
    print(plan_report(load_run_config(_FILES), devices, num_nodes, gpu_memory), end="")


_FILES: list[str] = []  # the run's config files of the command being run (set by plan_main)


def plan_main(args: list[str]) -> None:
    """``editr1 plan [-c FILE ...] [--devices N] [--num_nodes M] [--gpu_memory 80GB]``."""
    from editr1.cli import PROG, _quiet, function_cli

    _quiet()  # as fit: no bitsandbytes kernel notice, no Lightning advertisement
    files, rest = split_configs(list(args))
    _FILES[:] = files
    function_cli(plan, rest, f"{PROG} plan", as_positional=False, user_errors=(FileNotFoundError, ValueError))
