"""Both notebooks run headless, top to bottom, with a seconds-long budget."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_inspect_rollouts.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    monkeypatch.setenv("EDITR1_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )
    if name.startswith("01"):
        assert "heldout" in text and "identity" in text
        assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
    else:
        assert "trained" in text or "dropped" in text
        assert "drops" in text
