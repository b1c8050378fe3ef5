"""The settings dataclasses: documented defaults, frozen, and a bad value refused with its field named."""

from __future__ import annotations

import dataclasses

import pytest

from editr1.settings import (
    FILTER_RULES,
    AWMSettings,
    EfficiencySettings,
    EvalSettings,
    FilterSettings,
    FlowGRPOSettings,
    NFTSettings,
    OldPolicySettings,
    OptimSettings,
    RolloutSettings,
    SFTSettings,
)

ALL = (
    RolloutSettings,
    NFTSettings,
    SFTSettings,
    OldPolicySettings,
    OptimSettings,
    EvalSettings,
    EfficiencySettings,
    FilterSettings,
    FlowGRPOSettings,
    AWMSettings,
)


def test_defaults_are_the_papers_where_it_gives_them():
    r = RolloutSettings()
    assert (r.group_size, r.steps, r.solver, r.first_order_second_to_last) == (12, 6, "dpmpp_2m", False)
    old = OldPolicySettings()
    assert (old.rate, old.cap, old.delay) == (0.001, 0.5, 0)
    f = FilterSettings()
    assert (f.rule, f.mean_threshold, f.std_threshold, f.ban, f.ban_rule) == ("paper", 0.9, 0.05, False, None)
    assert (f.nan_policy, f.group_by) == ("group", "key")
    n = NFTSettings()
    assert (n.beta, n.adv_clip, n.std_mode, n.normalize, n.timesteps) == (1.0, 5.0, "global", "kept", "rollout")
    assert EfficiencySettings() == EfficiencySettings(False, False, "inductor", "no")  # every switch off
    assert FILTER_RULES == ("paper", "strict", "none")
    g = FlowGRPOSettings()  # yifan123/flow_grpo config/base.py and config/grpo.py
    assert (g.noise_level, g.clip_range, g.adv_clip, g.kl_weight, g.timestep_fraction) == (0.7, 1e-4, 5.0, 0.04, 0.99)
    a = AWMSettings()  # scxue/advantage_weighted_matching config/dgx_awm.py
    assert (a.weighting, a.ghuber_power, a.clip_range, a.advantage_max, a.kl_weight) == ("ghuber", 0.25, 1.0, 1.0, 1e-3)


@pytest.mark.parametrize("cls", ALL)
def test_every_section_is_frozen_and_documents_each_field(cls):
    obj = cls()
    field = dataclasses.fields(cls)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field.name, getattr(obj, field.name))
    doc = cls.__doc__ or ""
    undocumented = [f.name for f in dataclasses.fields(cls) if f"{f.name}:" not in doc]
    assert not undocumented, f"{cls.__name__} fields missing from its docstring: {undocumented}"


def test_equal_settings_compare_and_hash_equal():
    assert RolloutSettings(group_size=4) == RolloutSettings(group_size=4) != RolloutSettings(group_size=5)
    assert len({FilterSettings(), FilterSettings(), FilterSettings(rule="none")}) == 2


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: RolloutSettings(group_size=0), "group_size"),
        (lambda: RolloutSettings(steps=0), "steps"),
        (lambda: RolloutSettings(batch_size=0), "batch_size"),
        (lambda: NFTSettings(beta=0.0), "beta"),
        (lambda: NFTSettings(adv_clip=-1.0), "adv_clip"),
        (lambda: NFTSettings(kl_weight=-1e-4), "kl_weight"),
        (lambda: NFTSettings(micro_batch_size=0), "micro_batch_size"),
        (lambda: NFTSettings(normalize="mean"), "nft.normalize"),
        (lambda: SFTSettings(micro_batch_size=0), "sft.micro_batch_size"),
        (lambda: EfficiencySettings(autocast="fp16"), "efficiency.autocast"),
        (lambda: FilterSettings(rule="loose"), "rule"),
        (lambda: FilterSettings(ban_rule="loose"), "ban_rule"),
        (lambda: FilterSettings(group_by="prompt"), "reward.filter.group_by"),
        (lambda: FlowGRPOSettings(noise_level=0.0), "noise_level"),
        (lambda: FlowGRPOSettings(timestep_fraction=0.0), "timestep_fraction"),
        (lambda: AWMSettings(weighting="huber"), "awm.weighting"),
        (lambda: AWMSettings(advantage_max=0.0), "advantage_max"),
        (lambda: AWMSettings(micro_batch_size=0), "micro_batch_size"),
    ],
)
def test_a_bad_value_is_refused_with_its_field_named(build, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build()


def test_the_bad_value_itself_is_quoted_where_it_is_a_choice():
    with pytest.raises(ValueError, match="'mean'"):
        NFTSettings(normalize="mean")
    with pytest.raises(ValueError, match="'paper', 'loose'"):
        FilterSettings(ban_rule="loose")  # both the rule and the ban rule are shown


@pytest.mark.parametrize(
    "build",
    [
        NFTSettings,
        lambda: NFTSettings(kl_weight=0.0, normalize="reference"),
        lambda: FilterSettings(rule="strict", ban_rule="paper", group_by="instruction"),
        lambda: FilterSettings(rule="none", ban=True),
        lambda: RolloutSettings(group_size=1, steps=1, batch_size=1, solver="euler"),
        lambda: EfficiencySettings(autocast="bf16"),
    ],
)
def test_edge_values_that_are_allowed(build):
    build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: EvalSettings(steps=0),
        lambda: EvalSettings(batch_size=0),
        lambda: OldPolicySettings(cap=1.5),
        lambda: OldPolicySettings(rate=-0.001),
        lambda: OldPolicySettings(delay=-1),
    ],
)
def test_out_of_range_evaluation_and_old_policy_settings_are_refused(build):
    with pytest.raises(ValueError):
        build()
