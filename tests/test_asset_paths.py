"""``asset:<name>`` paths resolve into the bundled ``editr1.assets`` package; other paths pass through."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from editr1.asset_paths import resolve_asset

ASSETS = Path(str(resources.files("editr1.assets")))


@pytest.mark.parametrize("path", ["weights.safetensors", "/abs/dir/x.png", "", "assets:x", "ASSET:x", "my asset:x"])
def test_other_paths_are_returned_unchanged(path):
    assert resolve_asset(path) == path  # not checked for existence: that is the caller's business


def test_asset_prefix_names_a_bundled_file_or_folder():
    readme = resolve_asset("asset:README.md")
    assert Path(readme) == ASSETS / "README.md" and Path(readme).is_file()
    folder = resolve_asset("asset:sample_uniworld")
    assert Path(folder) == ASSETS / "sample_uniworld" and Path(folder).is_dir()
    assert isinstance(readme, str) and isinstance(folder, str)


def test_missing_asset_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"asset:no/such\.file: no such file or folder among editr1's bundled"):
        resolve_asset("asset:no/such.file")


def test_an_asset_path_cannot_leave_the_assets_folder():
    with pytest.raises(ValueError, match="must stay inside"):
        resolve_asset("asset:../src/editr1/cli.py")
