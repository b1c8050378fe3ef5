"""ExportLora's choices: ``auto`` exports the EMA adapter when the run keeps one, else ``default``; the file goes
to the run folder (the export itself is checked end to end in test_export.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import editr1.export
from editr1.callbacks import ExportLora


@pytest.fixture
def exports(monkeypatch):
    calls = []

    def fake_export(module, out_dir, adapter):
        calls.append((module, Path(out_dir), adapter))
        return None if getattr(module, "global_rank", 0) else Path(out_dir) / "pytorch_lora_weights.safetensors"

    monkeypatch.setattr(editr1.export, "export_module", fake_export)
    return calls


def _trainer(tmp_path, log_dir=True):
    return SimpleNamespace(
        log_dir=str(tmp_path / "run" / "version_0") if log_dir else None, default_root_dir=str(tmp_path)
    )


@pytest.mark.parametrize(
    ("adapter", "module", "chosen"),
    [
        ("auto", SimpleNamespace(use_ema=True), "ema"),
        ("auto", SimpleNamespace(use_ema=False), "default"),
        ("auto", SimpleNamespace(), "default"),  # a module without the attribute: no EMA
        ("default", SimpleNamespace(use_ema=True), "default"),
        ("ema", SimpleNamespace(use_ema=False), "ema"),
    ],
)
def test_which_adapter_is_exported(tmp_path, exports, adapter, module, chosen):
    cb = ExportLora(adapter=adapter)
    cb.on_train_end(_trainer(tmp_path), module)
    assert exports == [(module, tmp_path / "run" / "version_0" / "lora", chosen)]
    assert cb.path == str(tmp_path / "run" / "version_0" / "lora" / "pytorch_lora_weights.safetensors")
    assert cb.adapter == adapter  # the setting itself is not rewritten


def test_folder_name_and_the_root_folder_without_a_logger(tmp_path, exports):
    cb = ExportLora(dirname="adapters")
    cb.on_train_end(_trainer(tmp_path, log_dir=False), SimpleNamespace(use_ema=False))
    assert exports[0][1] == tmp_path / "adapters"


def test_ranks_that_write_nothing_keep_no_path(tmp_path, exports):
    cb = ExportLora()
    assert cb.path is None
    cb.on_train_end(_trainer(tmp_path), SimpleNamespace(use_ema=False, global_rank=1))
    assert len(exports) == 1 and cb.path is None
