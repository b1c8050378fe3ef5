"""The source tree's shape: every module under ``src/editr1`` has a test module, and none grows past 500 lines.

A module ``src/editr1/<stem>.py`` is tested in ``tests/test_<stem>.py``; one in a package,
``src/editr1/<package>/<stem>.py``, in ``tests/test_<stem>.py`` or ``tests/test_<package>_<stem>.py``.
Modules whose tests carry another name are listed in :data:`TESTED_IN`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "editr1"
TESTS = ROOT / "tests"
MAX_LINES = 500
NOT_MODULES = ("__init__.py", "__main__.py")

# Source modules (paths under src/editr1) whose test module does not follow the naming rule, or where the rule
# would find another module's tests (a shared stem): the entry names the test file that really covers it.
TESTED_IN: dict[str, str] = {
    # historical names, from before the rewards/ and policies/ packages were split up
    "policies/base.py": "test_policy_base.py",
    "rewards/mllm.py": "test_reward_mllm.py",
    "rewards/served.py": "test_reward_served.py",
    "rewards/server.py": "test_reward_server.py",
    "rewards/server_http.py": "test_reward_server.py",  # the HTTP side, tested through the server
    "rewards/scoring.py": "test_reward_scoring.py",
    # shared stems: the rule alone would accept test_scenes.py (data/scenes.py) or test_nft.py (algorithms/nft.py)
    "rewards/scenes.py": "test_scene_reward.py",
    "evaluation/scenes.py": "test_scene_evaluation.py",  # beside the callback that runs it
    "objectives/nft.py": "test_objectives_nft.py",
    "objectives/flow_grpo.py": "test_objectives_flow_grpo.py",  # test_flow_grpo.py: algorithms/flow_grpo.py
    "objectives/awm.py": "test_objectives_awm.py",  # test_awm.py: algorithms/awm.py
    # one test module for the benchmark protocol and its callback
    "evaluation/benchmark.py": "test_benchmark.py",
    "config_errors.py": "test_cli.py",  # the CLI's errors, tested through the CLI
    "callbacks/reward_eval.py": "test_callbacks_reward.py",  # the reward callback's evaluation half
    "callbacks/benchmark.py": "test_benchmark.py",
}


def source_modules(src: Path) -> list[str]:
    """Every module under ``src`` (``__init__``/``__main__`` excepted), as posix paths relative to it."""
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py") if p.name not in NOT_MODULES)


def expected_test_names(module: str) -> list[str]:
    """The test file names the rule accepts for ``module`` (a path relative to the source root)."""
    path = Path(module)
    names = [f"test_{path.stem}.py"]
    if path.parent != Path("."):
        names.append(f"test_{path.parent.name}_{path.stem}.py")
    return names


def missing_tests(src: Path, tests: Path, tested_in: dict[str, str]) -> list[str]:
    """One line per module without a test module, saying which names would do."""
    out = []
    for module in source_modules(src):
        if module in tested_in:
            if not (tests / tested_in[module]).is_file():
                out.append(f"{module}: TESTED_IN names tests/{tested_in[module]}, which does not exist")
            continue
        names = expected_test_names(module)
        if not any((tests / n).is_file() for n in names):
            out.append(f"{module}: add {' or '.join('tests/' + n for n in names)} (or an entry in TESTED_IN)")
    return out


def oversized(src: Path, limit: int = MAX_LINES) -> list[str]:
    out = []
    for module in source_modules(src):
        lines = len((src / module).read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append(f"{module}: {lines} lines (more than {limit})")
    return out


# ------------------------------------------------------------------------------------------ the real tree
def test_the_tree_is_where_this_test_expects_it():
    modules = source_modules(SRC)
    assert "module.py" in modules and "training/rollout.py" in modules
    assert not any(m.endswith(NOT_MODULES) for m in modules)


def test_every_source_module_has_a_test_module():
    offenders = missing_tests(SRC, TESTS, TESTED_IN)
    assert not offenders, "source modules without a test module:\n  " + "\n  ".join(offenders)


def test_every_mapping_entry_names_an_existing_module():
    stale = sorted(set(TESTED_IN) - set(source_modules(SRC)))
    assert not stale, f"TESTED_IN lists modules that no longer exist: {stale}"


def test_no_source_module_exceeds_the_line_limit():
    offenders = oversized(SRC)
    assert not offenders, "source modules to split:\n  " + "\n  ".join(offenders)


# ------------------------------------------------------------------------------------------ the rule itself
def test_expected_names_for_top_level_and_package_modules():
    assert expected_test_names("settings.py") == ["test_settings.py"]
    assert expected_test_names("training/state.py") == ["test_state.py", "test_training_state.py"]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    src, tests = tmp_path / "src", tmp_path / "tests"
    for rel in ("__init__.py", "__main__.py", "alpha.py", "pkg/__init__.py", "pkg/beta.py", "pkg/gamma.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x = 1\n")
    tests.mkdir()
    for name in ("test_alpha.py", "test_pkg_beta.py", "test_old_gamma_name.py"):
        (tests / name).write_text("")
    return src, tests


def test_a_tested_tree_passes(tree):
    src, tests = tree
    assert source_modules(src) == ["alpha.py", "pkg/beta.py", "pkg/gamma.py"]
    assert missing_tests(src, tests, {"pkg/gamma.py": "test_old_gamma_name.py"}) == []


def test_a_new_module_without_tests_is_named_in_the_failure(tree):
    src, tests = tree
    (src / "pkg" / "delta.py").write_text("y = 2\n")
    (src / "epsilon.py").write_text("z = 3\n")
    offenders = missing_tests(src, tests, {"pkg/gamma.py": "test_old_gamma_name.py"})
    assert offenders == [
        "epsilon.py: add tests/test_epsilon.py (or an entry in TESTED_IN)",
        "pkg/delta.py: add tests/test_delta.py or tests/test_pkg_delta.py (or an entry in TESTED_IN)",
    ]
    # without its mapping entry the historically named module is an offender too
    assert "pkg/gamma.py" in " ".join(missing_tests(src, tests, {}))


def test_a_mapping_entry_to_a_missing_test_file_fails(tree):
    src, tests = tree
    offenders = missing_tests(src, tests, {"pkg/gamma.py": "test_renamed_away.py"})
    assert offenders == ["pkg/gamma.py: TESTED_IN names tests/test_renamed_away.py, which does not exist"]


def test_an_oversized_module_is_named(tree):
    src, _ = tree
    (src / "pkg" / "beta.py").write_text("x = 1\n" * 12)
    assert oversized(src, limit=10) == ["pkg/beta.py: 12 lines (more than 10)"]
    assert oversized(src, limit=12) == []
