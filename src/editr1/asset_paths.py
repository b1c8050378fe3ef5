"""``asset:<name>`` paths: files shipped with editr1 (the repository's ``data/`` folder, installed as the
package ``editr1.assets``). Used by data loading and by policies, so it belongs to neither.

(Not named ``editr1/assets.py``: that name is the bundled-files package itself.)
"""

from __future__ import annotations

from pathlib import Path


def resolve_asset(path: str) -> str:
    """``asset:<name>`` names a file shipped with editr1 (the repository's ``data/`` folder, installed
    as the package ``editr1.assets``); anything else is an ordinary path."""
    if not path.startswith("asset:"):
        return path
    from importlib import resources

    root = Path(str(resources.files("editr1.assets")))
    found = root.joinpath(path[len("asset:") :])
    if not found.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{path}: an asset path must stay inside editr1's bundled assets ({root})")
    if not found.exists():
        raise FileNotFoundError(f"{path}: no such file or folder among editr1's bundled assets ({found})")
    return str(found)
