"""The judge ablation script's table and results file (benchmarks/judge_ablations.py), on hand-made runs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import judge_ablations as ja  # noqa: E402


def _run(arm, seed, before, after, unseen, judge, dropped=None):
    ev = {"before": {"heldout": {"mean": before}}, "after": {"heldout": {"mean": after}, "unseen": {"mean": unseen}}}
    curves = {"val/reward": [[29, judge[0]], [89, judge[1]]]}
    if dropped is not None:
        curves[ja.DROP] = [[i, d] for i, d in enumerate(dropped)]
    return {"arm": arm, "seed": seed, "wall_s": 1.0, "scene_eval": ev, "curves": curves}


def test_table_means_and_sample_stds_over_seeds_and_the_share_dropped():
    runs = [
        _run("default", 0, 0.8, 0.9, 0.7, (0.6, 0.7), dropped=[0.0, 0.5]),
        _run("default", 1, 0.8, 0.8, 0.9, (0.6, 0.5), dropped=[0.5, 0.5]),
        _run("no_filter", 0, 0.8, 0.85, 0.8, (0.6, 0.6)),
    ]
    rows = ja.table(runs).splitlines()
    # after: mean 0.85, sample std of 0.9 and 0.8 = 0.0707; dropped: mean of the runs' means 0.25 and 0.5
    assert rows[2] == (
        "| judge, logit-expected score, paper filter | 0.800 ± 0.000 → 0.850 ± 0.071 | 0.800 ± 0.141 "
        "| 0.600 ± 0.000 → 0.600 ± 0.141 | 37.5% (2 runs) |"
    )
    assert rows[3] == "| judge, without group filtering | 0.800 → 0.850 | 0.800 | 0.600 → 0.600 | – |"


def test_a_stopped_run_is_a_row_with_its_reason(tmp_path):
    log = tmp_path / "strict-seed0.log"
    why = "20 steps in a row trained nothing (optim.max_idle_steps = 20)"
    log.write_text(f"Seed set to 0\neditr1 fit: stopped: {why}; stopped. Last: step 9: nothing to train. State…\n")
    run_dir = tmp_path / "strict" / "seed0" / "version_0"
    run_dir.mkdir(parents=True)
    r = ja.collect("strict", 0, tmp_path, 5.0, returncode=1)
    assert r["stopped"].startswith(f"editr1 fit: stopped: {why}; stopped. Last: step 9") and "scene_eval" not in r
    label = ja.ARMS["strict"][0]
    assert f"| {label}, seed 0 | stopped after 9 trained steps: {why} | | | – |" in ja.table([r])


def test_save_keeps_the_arms_order_and_every_command(tmp_path):
    path = tmp_path / "r.json"
    ja.save(path, ["a", "b"], [_run("sampled", 1, 0, 0, 0, (0, 0)), _run("default", 2, 0, 0, 0, (0, 0))])
    saved = json.loads(path.read_text())
    assert saved["command"] == ["a", "b"] and [(r["arm"], r["seed"]) for r in saved["runs"]] == [
        ("default", 2),
        ("sampled", 1),
    ]


def test_curves_table_means_each_validation_over_seeds():
    a, b = _run("default", 0, 0, 0, 0, (0.6, 0.7)), _run("default", 1, 0, 0, 0, (0.4, 0.5))
    a["curves"]["val/gold_reward"] = [[29, 0.8], [59, 0.9]]
    b["curves"]["val/gold_reward"] = [[29, 0.6], [59, 0.7]]
    row = ja.curves_table([a, b]).splitlines()[2]
    assert row == "| judge, logit-expected score, paper filter | 2 | 0.500 → 0.600 | 0.700 → 0.800 |"


def test_runs_that_are_not_arm_colon_seed_are_a_clear_error(capsys, tmp_path):
    for bad in (["sampled"], ["bogus:1"], ["sampled:x"]):
        with pytest.raises(SystemExit):
            ja.main(["--runs", *bad, "--out", str(tmp_path / "out")])
        assert "--runs takes ARM:SEED (e.g. sampled:0)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is made
