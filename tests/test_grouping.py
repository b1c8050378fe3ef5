"""Hand-computed checks of rewards → advantages → r and the low-variance group filter (DESIGN §2)."""

from __future__ import annotations

import math

import pytest
import torch

from editr1.algorithms.grouping import advantages, decide, group_stats, low_variance_drop, optimality_probability

NAN = float("nan")
F64 = torch.float64


def t64(rows):
    return torch.tensor(rows, dtype=F64)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    """Elementwise comparison where NaN must match NaN."""
    exp = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, exp, atol=atol, rtol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------- group_stats


def test_group_stats_population_std_ignores_nan():
    rewards = t64(
        [
            [0.2, 0.4, 0.6, NAN],  # mean 0.4; devs -0.2, 0, 0.2 → var 0.08/3 → std sqrt(0.08/3) = 0.163299...
            [1.0, 1.0, 1.0, 1.0],  # mean 1, std 0
            [NAN, NAN, NAN, NAN],  # no finite reward → NaN, NaN
            [0.0, 1.0, NAN, NAN],  # mean 0.5, population std 0.5 (ddof=1 would be 0.7071)
        ]
    )
    mean, std = group_stats(rewards)
    assert_close(mean, [0.4, 1.0, NAN, 0.5])
    assert_close(std, [math.sqrt(0.08 / 3), 0.0, NAN, 0.5])
    # ddof = 0, not 1: the sample std of group 0 would be sqrt(0.08/2) = 0.2
    assert abs(float(std[0]) - 0.2) > 0.03


def test_group_stats_validation():
    with pytest.raises(ValueError):
        group_stats(torch.tensor([0.1, 0.2, 0.3]))  # 1-d
    with pytest.raises(ValueError):
        group_stats(torch.zeros(2, 3, 1))  # 3-d
    with pytest.raises(ValueError):
        group_stats(torch.tensor([[1, 2], [3, 4]]))  # integer


# ---------------------------------------------------------------------------------------------- advantages

# Groups [-1, 1] (mean 0, std 1) and [17, 31] (mean 24, std 7).
# All four rewards: mean 12, deviations -13, -11, 5, 19 → squares 169 + 121 + 25 + 361 = 676,
# population variance 676/4 = 169 → global std 13 (the ddof=1 std would be sqrt(676/3) = 15.01).
REWARDS_13 = [[-1.0, 1.0], [17.0, 31.0]]


def test_advantages_global_std_over_all_rewards():
    adv = advantages(t64(REWARDS_13))  # default: global
    d = 13.0 + 1e-4
    assert_close(adv, [[-1 / d, 1 / d], [-7 / d, 7 / d]])


def test_advantages_group_std():
    adv = advantages(t64(REWARDS_13), std_mode="group")
    assert_close(adv, [[-1 / 1.0001, 1 / 1.0001], [-7 / 7.0001, 7 / 7.0001]])


def test_advantages_step_std_override():
    # step_std replaces the (local) global std; group means are still local.
    adv = advantages(t64(REWARDS_13), std_mode="global", step_std=torch.tensor(1.0))
    assert_close(adv, [[-1 / 1.0001, 1 / 1.0001], [-7 / 1.0001, 7 / 1.0001]])
    adv2 = advantages(t64(REWARDS_13), std_mode="global", step_std=torch.tensor(3.0, dtype=torch.float32))
    assert adv2.dtype == F64
    assert_close(adv2, [[-1 / 3.0001, 1 / 3.0001], [-7 / 3.0001, 7 / 3.0001]])


def test_advantages_nan_excluded_from_stats_and_stays_nan():
    # Same finite values as REWARDS_13 plus NaNs: statistics unchanged, NaN samples stay NaN.
    rewards = t64([[-1.0, NAN, 1.0], [17.0, 31.0, NAN]])
    d = 13.0 + 1e-4
    assert_close(advantages(rewards), [[-1 / d, NAN, 1 / d], [-7 / d, 7 / d, NAN]])


def test_advantages_bad_std_mode():
    with pytest.raises(ValueError):
        advantages(t64(REWARDS_13), std_mode="batch")


# ---------------------------------------------------------------------------------------------- optimality_probability


def test_optimality_probability_clip_and_scale():
    adv = t64([-10.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0, NAN])
    # clip ±5 → [-5, -5, -2.5, 0, 1, 5, 5, NaN]; /10 + 0.5
    assert_close(optimality_probability(adv), [0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0, NAN])


def test_optimality_probability_other_clip():
    adv = t64([-3.0, -1.0, 1.0, 3.0])
    # c = 2: clip → [-2, -1, 1, 2]; /4 + 0.5
    assert_close(optimality_probability(adv, clip=2.0), [0.0, 0.25, 0.75, 1.0])
    with pytest.raises(ValueError):
        optimality_probability(adv, clip=0.0)
    with pytest.raises(ValueError):
        optimality_probability(adv, clip=-1.0)


# ---------------------------------------------------------------------------------------------- low_variance_drop

# (mean, std, paper drops, strict drops) with τμ = 0.9, τσ = 0.05.
# paper : drop  ⇔ mean > 0.9 and std < 0.05
# strict: keep  ⇔ std > 0.05 and mean < 0.9
FILTER_TABLE = [
    (0.95, 0.01, True, True),  # high and flat: both drop
    (0.50, 0.20, False, False),  # informative: both keep
    (0.50, 0.01, False, True),  # low and flat: only strict drops          (differ)
    (0.95, 0.20, False, True),  # high but spread: only strict drops       (differ)
    (0.10, 0.00, False, True),  # all rewards equal and low: strict drops  (differ)
    (0.90, 0.01, False, True),  # mean == τμ: paper needs mean > τμ        (differ)
    (0.95, 0.05, False, True),  # std == τσ: paper needs std < τσ          (differ)
    (0.90, 0.20, False, True),  # mean == τμ: strict needs mean < τμ       (differ)
    (0.50, 0.05, False, True),  # std == τσ: strict needs std > τσ         (differ)
    (0.90, 0.05, False, True),  # both on the boundary                     (differ)
    (0.91, 0.049, True, True),  # just inside the paper's region
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_variance_drop_table(dtype):
    mean = torch.tensor([row[0] for row in FILTER_TABLE], dtype=dtype)
    std = torch.tensor([row[1] for row in FILTER_TABLE], dtype=dtype)
    paper = [row[2] for row in FILTER_TABLE]
    strict = [row[3] for row in FILTER_TABLE]
    assert low_variance_drop(mean, std).tolist() == paper  # paper is the default
    assert low_variance_drop(mean, std, rule="paper").tolist() == paper
    assert low_variance_drop(mean, std, rule="strict").tolist() == strict
    assert low_variance_drop(mean, std, rule="none").tolist() == [False] * len(FILTER_TABLE)
    # the table really contains cases where the two rules disagree
    assert sum(p != s for p, s in zip(paper, strict)) >= 5


def test_low_variance_drop_custom_thresholds_and_nan():
    mean = t64([0.6, 0.6, 0.4, NAN, 0.6])
    std = t64([0.1, 0.4, 0.1, 0.0, NAN])
    # τμ = 0.5, τσ = 0.3: paper drops mean > 0.5 and std < 0.3 → only group 0; NaN stats are never dropped here
    assert low_variance_drop(mean, std, "paper", 0.5, 0.3).tolist() == [True, False, False, False, False]
    # strict keeps std > 0.3 and mean < 0.5 → none of the finite groups qualifies → drop 0, 1, 2
    assert low_variance_drop(mean, std, "strict", 0.5, 0.3).tolist() == [True, True, True, False, False]


def test_low_variance_drop_bad_rule():
    with pytest.raises(ValueError):
        low_variance_drop(t64([0.5]), t64([0.1]), rule="loose")


# ---------------------------------------------------------------------------------------------- decide

# G = 5, K = 3.
DECIDE_REWARDS = [
    [0.95, 0.95, 0.95],  # g0: mean 0.95, std 0 → low-variance drop (paper)
    [0.2, 0.5, 0.8],  # g1: mean 0.5, std sqrt(0.06) = 0.245 → kept
    [0.1, NAN, 0.7],  # g2: one NaN; finite mean 0.4, std 0.3
    [NAN, NAN, NAN],  # g3: all NaN
    [0.95, NAN, 0.95],  # g4: one NaN; finite part would be low-variance (mean 0.95, std 0)
]


def _decide_r_expected():
    # step_std = 0.5 → denominator 0.5001; r = A/10 + 0.5 (no clipping: |A| < 1)
    a = 0.3 / 0.5001 / 10  # 0.05998800...
    return [
        [0.5, 0.5, 0.5],
        [0.5 - a, 0.5, 0.5 + a],
        [0.5 - a, NAN, 0.5 + a],
        [NAN, NAN, NAN],
        [0.5, NAN, 0.5],
    ]


def test_decide_nan_policy_group():
    d = decide(t64(DECIDE_REWARDS), step_std=torch.tensor(0.5))
    assert_close(d.r, _decide_r_expected())
    assert_close(d.mean, [0.95, 0.5, 0.4, NAN, 0.95])
    assert_close(d.std, [0.0, math.sqrt(0.06), 0.3, NAN, 0.0])
    assert d.dropped_nan.tolist() == [False, False, True, True, True]  # any NaN drops the whole group
    assert d.dropped_low_variance.tolist() == [True, False, False, False, False]  # disjoint from dropped_nan
    assert d.train_mask.tolist() == [
        [False, False, False],
        [True, True, True],
        [False, False, False],
        [False, False, False],
        [False, False, False],
    ]
    assert d.num_groups == 5
    assert d.frac_groups_dropped == pytest.approx(4 / 5)


def test_decide_nan_policy_sample():
    d = decide(t64(DECIDE_REWARDS), step_std=torch.tensor(0.5), nan_policy="sample")
    assert_close(d.r, _decide_r_expected())
    assert d.dropped_nan.tolist() == [False, False, False, True, False]  # only the all-NaN group
    assert d.dropped_low_variance.tolist() == [True, False, False, False, True]  # g4 judged on its finite part
    assert d.train_mask.tolist() == [
        [False, False, False],
        [True, True, True],
        [True, False, True],  # only the NaN sample gets no loss
        [False, False, False],
        [False, False, False],
    ]
    assert d.frac_groups_dropped == pytest.approx(3 / 5)


def test_decide_nan_sample_never_trained_on():
    for policy in ("group", "sample"):
        for rule in ("paper", "strict", "none"):
            d = decide(t64(DECIDE_REWARDS), nan_policy=policy, rule=rule)
            nan = torch.isnan(t64(DECIDE_REWARDS))
            assert not (d.train_mask & nan).any()
            assert torch.isnan(d.r[nan]).all()
            assert torch.isfinite(d.r[~nan]).all()


def test_decide_global_std_default():
    # REWARDS_13: global std 13 → r = A/10 + 0.5
    d = decide(t64(REWARDS_13), rule="none")
    s = 13.0001
    assert_close(d.r, [[0.5 - 0.1 / s, 0.5 + 0.1 / s], [0.5 - 0.7 / s, 0.5 + 0.7 / s]])
    assert d.train_mask.all()
    assert d.frac_groups_dropped == 0.0
    # group std: |A| ≈ 1 → r ≈ 0.4 / 0.6
    g = decide(t64(REWARDS_13), rule="none", std_mode="group")
    assert_close(g.r, [[0.5 - 0.1 / 1.0001, 0.5 + 0.1 / 1.0001], [0.5 - 0.7 / 7.0001, 0.5 + 0.7 / 7.0001]])


def test_decide_advantage_clip_passed_through():
    # step_std 1 → A = [-1, 1]/1.0001 ≈ ±0.9999; clip 0.5 → ±0.5 → r = ±0.5/1 + 0.5 = [0, 1]
    d = decide(t64([[0.0, 2.0]]), rule="none", step_std=torch.tensor(1.0), adv_clip=0.5)
    assert_close(d.r, [[0.0, 1.0]])


def test_decide_thresholds_passed_through():
    rewards = t64([[0.6, 0.6], [0.2, 0.8]])  # g0 mean 0.6 std 0; g1 mean 0.5 std 0.3
    assert decide(rewards).dropped_low_variance.tolist() == [False, False]  # 0.6 < τμ = 0.9
    d = decide(rewards, mean_threshold=0.5, std_threshold=0.01)
    assert d.dropped_low_variance.tolist() == [True, False]
    d = decide(rewards, rule="strict", mean_threshold=0.7, std_threshold=0.2)
    assert d.dropped_low_variance.tolist() == [True, False]  # g1: std 0.3 > 0.2 and mean 0.5 < 0.7 → kept


def test_decide_all_groups_dropped():
    rewards = t64([[0.95, 0.95], [1.0, 1.0]])
    d = decide(rewards)
    assert d.dropped_low_variance.all()
    assert not d.train_mask.any()
    assert d.frac_groups_dropped == 1.0


def test_decide_group_size_one():
    rewards = t64([[0.3], [0.95], [0.6]])
    for mode in ("global", "group"):
        d = decide(rewards, std_mode=mode)
        # each group's std is 0 and R equals its own mean → A = 0 → r = 0.5
        assert_close(d.r, [[0.5], [0.5], [0.5]])
        assert_close(d.std, [0.0, 0.0, 0.0])
        assert d.dropped_low_variance.tolist() == [False, True, False]  # paper: mean 0.95 > 0.9, std 0 < 0.05
    strict = decide(rewards, rule="strict")
    assert strict.dropped_low_variance.all()  # std 0 is never > τσ
    assert strict.frac_groups_dropped == 1.0


def test_decide_all_nan_step():
    rewards = torch.full((2, 3), NAN, dtype=F64)
    for policy in ("group", "sample"):
        d = decide(rewards, nan_policy=policy)
        assert torch.isnan(d.r).all()
        assert not d.train_mask.any()
        assert d.dropped_nan.all()
        assert not d.dropped_low_variance.any()
        assert d.frac_groups_dropped == 1.0


def test_decide_empty_step():
    d = decide(torch.empty(0, 3))
    assert d.num_groups == 0
    assert d.frac_groups_dropped == 0.0


def test_decide_validation():
    good = t64([[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError):
        decide(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError):
        decide(torch.tensor([[1, 0], [0, 1]]))
    with pytest.raises(ValueError):
        decide(good, rule="paperish")
    with pytest.raises(ValueError):
        decide(good, std_mode="local")
    with pytest.raises(ValueError):
        decide(good, nan_policy="drop")


# ---------------------------------------------------------------------------------------------- reference parity


def test_group_statistics_in_float64_whatever_the_reward_dtype():
    """An all-equal float32 group: mean exactly its value, std exactly 0, r exactly 0.5 under the group std
    (float32 statistics gave 0.5001: the mean missed 0.7 by an ulp, then /(0 + 1e-4) amplified it)."""
    rewards = torch.tensor([[0.7] * 12, [0.1, 0.3] * 6], dtype=torch.float32)
    mean, std = group_stats(rewards)
    assert mean.dtype == F64 and std.dtype == F64
    assert float(mean[0]) == float(torch.tensor(0.7, dtype=torch.float32)) and float(std[0]) == 0.0
    d = decide(rewards, std_mode="group", rule="none")
    assert d.r.dtype == F64
    assert torch.equal(d.r[0], torch.full((12,), 0.5, dtype=F64))
    # what float32 statistics give for the same group: not 0.5
    m32 = rewards[0].sum() / 12
    assert float(((rewards[0] - m32) / 1e-4).abs().max()) > 1e-4


def test_strict_mask_with_paper_ban_rule():
    """The reference masks with the strict rule and bans with the paper's (ban_rule), by hand:
    g0 mean 0.95 std 0 → masked (strict) and banned (paper); g1 mean 0.5 std 0.03 → masked (std < τσ), not
    banned (mean < τμ); g2 mean 0.5 std 0.3 → kept, not banned."""
    rewards = t64([[0.95, 0.95], [0.47, 0.53], [0.2, 0.8]])
    d = decide(rewards, rule="strict", ban_rule="paper")
    assert d.dropped_low_variance.tolist() == [True, True, False]
    assert d.ban.tolist() == [True, False, False]
    assert d.train_mask.tolist() == [[False, False], [False, False], [True, True]]
    same = decide(rewards, rule="strict")  # ban_rule defaults to the mask rule
    assert same.ban.tolist() == [True, True, False]
    none = decide(rewards, rule="none", ban_rule="paper")  # everything trains; bans still follow the paper rule
    assert none.train_mask.all() and none.ban.tolist() == [True, False, False]


def test_ban_rule_never_bans_a_group_dropped_for_nan():
    d = decide(t64([[0.95, NAN], [0.95, 0.95]]), ban_rule="paper", rule="none")
    assert d.dropped_nan.tolist() == [True, False] and d.ban.tolist() == [False, True]


def test_pooled_groups_share_mean_and_std_by_hand():
    """group_by instruction: rows 0 and 2 share an instruction → one group of 4 samples.
    Pool {0.2, 0.4, 0.6, 0.8}: mean 0.5, population std sqrt((0.09 + 0.01 + 0.01 + 0.09)/4) = sqrt(0.05).
    Row 1 alone: {0.9, 0.9} mean 0.9 std 0."""
    from editr1.algorithms.grouping import pool_index

    pool = pool_index(["make it red", "add a cat", "make it red"])
    assert pool.tolist() == [0, 1, 0]
    rewards = t64([[0.2, 0.4], [0.9, 0.9], [0.6, 0.8]])
    mean, std = group_stats(rewards, pool)
    assert_close(mean, [0.5, 0.9, 0.5])
    assert_close(std, [math.sqrt(0.05), 0.0, math.sqrt(0.05)])
    s = math.sqrt(0.05) + 1e-4
    a = advantages(rewards, "group", pool=pool)
    assert_close(a, [[-0.3 / s, -0.1 / s], [0.0, 0.0], [0.1 / s, 0.3 / s]])
    # unpooled, rows 0 and 2 would each be centred on their own mean
    assert_close(advantages(rewards, "group")[0], [-0.1 / 0.1001, 0.1 / 0.1001])
    d = decide(rewards, pool=pool, std_threshold=0.3, mean_threshold=0.6)  # paper: pooled mean 0.5 < 0.6 → kept
    assert d.dropped_low_variance.tolist() == [False, True, False]
    nan_pool = group_stats(t64([[NAN, NAN], [0.4, NAN]]), torch.tensor([0, 0]))
    assert_close(nan_pool[0], [0.4, 0.4]) and assert_close(nan_pool[1], [0.0, 0.0])
    with pytest.raises(ValueError, match="pool"):
        group_stats(rewards, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------- combine_advantages


def test_combine_advantages_group_std_by_hand():
    from editr1.algorithms.grouping import combine_advantages

    a = t64([[0.0, 1.0], [1.0, 1.0]])  # group 0: mean 0.5, std 0.5; group 1: all equal → 0
    b = t64([[0.5, 0.5], [0.0, 1.0]])  # group 0: all equal → 0; group 1: mean 0.5, std 0.5
    x = 0.5 / (0.5 + 1e-4)
    got = combine_advantages({"a": a, "b": b}, {"a": 2.0, "b": 1.0}, "group")
    assert_close(got, [[-2 * x, 2 * x], [-x, x]])
    # the weighted mean's own advantages differ: (2a + b)/3 = [[1/6, 5/6], [2/3, 1]] → ±1/(1/3 + ε), ±1/(1/6 + ε)·(1/6)
    total = (2 * a + b) / 3
    assert_close(
        advantages(total, "group"),
        [[-(1 / 3) / (1 / 3 + 1e-4), (1 / 3) / (1 / 3 + 1e-4)], [-(1 / 6) / (1 / 6 + 1e-4), (1 / 6) / (1 / 6 + 1e-4)]],
    )


def test_combine_advantages_global_std_by_hand():
    from editr1.algorithms.grouping import combine_advantages

    a = t64([[0.0, 1.0], [1.0, 1.0]])  # all four: mean 0.75, population var (0.5625 + 3·0.0625)/4 = 0.1875
    b = t64([[0.5, 0.5], [0.0, 1.0]])  # all four: mean 0.5, population var (0 + 0 + 0.25 + 0.25)/4 = 0.125
    sa, sb = math.sqrt(0.1875) + 1e-4, math.sqrt(0.125) + 1e-4
    got = combine_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, "global")
    assert_close(got, [[-0.5 / sa, 0.5 / sa], [-0.25 / sb, 0.25 / sb]])


def test_combine_advantages_a_nan_in_one_component_is_nan_in_all():
    from editr1.algorithms.grouping import combine_advantages

    a = t64([[0.0, 1.0, 0.3]])  # the third sample is left out of a's statistics too: mean 0.5, std 0.5
    b = t64([[1.0, 0.5, NAN]])  # finite: mean 0.75, std 0.25
    got = combine_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, "group")
    assert_close(got, [[-0.5 / 0.5001 + 0.25 / 0.2501, 0.5 / 0.5001 - 0.25 / 0.2501, NAN]])


def test_combine_advantages_checks():
    from editr1.algorithms.grouping import combine_advantages

    with pytest.raises(ValueError, match="at least one component"):
        combine_advantages({}, {})
    with pytest.raises(ValueError, match=r"scores for \['a'\] but weights for \['b'\]"):
        combine_advantages({"a": t64([[0.0, 1.0]])}, {"b": 1.0})
    with pytest.raises(ValueError, match="different shapes"):
        combine_advantages({"a": t64([[0.0, 1.0]]), "b": t64([[0.0, 1.0, 1.0]])}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="need their weights"):
        decide(t64([[0.0, 1.0]]), components={"a": t64([[0.0, 1.0]])})


def test_decide_with_components_filters_on_the_total():
    # group 0: the components disagree → the total is flat (0.95, 0.95) and the paper rule drops it, though
    # the components' advantages do not cancel under the global std; group 1 trains on the advantage sum
    a = t64([[1.0, 0.9], [0.0, 1.0]])
    b = t64([[0.9, 1.0], [0.0, 0.0]])
    total = (a + b) / 2
    d = decide(total, std_mode="group", components={"a": a, "b": b}, weights={"a": 1.0, "b": 1.0})
    assert d.dropped_low_variance.tolist() == [True, False]
    assert d.train_mask.tolist() == [[False, False], [True, True]]
    x = 0.5 / 0.5001
    assert_close(d.r[1], [-x / 10 + 0.5, x / 10 + 0.5])  # r = clip(A, ±5)/10 + 0.5 with A = A_a + A_b
    assert_close(d.mean, [0.95, 0.25])
