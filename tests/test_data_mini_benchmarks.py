"""The mini benchmarks made from held-out scenes: unequal category counts, the deliberate absent image and
Chinese row, deterministic output, and the command line (test_benchmark.py reads them with the loaders)."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image

from editr1.data import mini_benchmarks
from editr1.data.mini_benchmarks import COUNTS, GEDIT_OF, IMGEDIT_OF, _examples, write_gedit_mini, write_imgedit_mini
from editr1.data.scenes import TASKS


def test_every_scene_task_has_a_category_in_both_benchmarks():
    assert set(IMGEDIT_OF) == set(GEDIT_OF) == set(TASKS)
    assert len(set(IMGEDIT_OF.values())) == len(set(GEDIT_OF.values())) == len(TASKS)  # no two tasks share one


def test_examples_have_the_requested_unequal_counts_from_the_heldout_split():
    examples = _examples(COUNTS)
    assert Counter(e["task"] for e in examples) == COUNTS and len(set(COUNTS.values())) > 1
    assert len({e["key"] for e in examples}) == len(examples)
    assert [e["key"] for e in _examples(COUNTS)] == [e["key"] for e in examples]  # deterministic
    assert {e["key"] for e in _examples(COUNTS, start=1000)}.isdisjoint(e["key"] for e in examples)


def test_imgedit_mini_layout(tmp_path):
    root = write_imgedit_mini(tmp_path / "imgedit")
    meta = json.loads((root / "basic_edit.json").read_text())
    assert list(meta) == [str(100 + i) for i in range(sum(COUNTS.values()))] + ["199"]
    for key, row in meta.items():
        assert set(row) == {"id", "prompt", "edit_type"} and row["prompt"]
        exists = (root / row["id"]).is_file()
        assert exists == (key != "199")  # the last row's image is deliberately absent
    assert Counter(r["edit_type"] for k, r in meta.items() if k != "199") == {
        IMGEDIT_OF[t]: n for t, n in COUNTS.items()
    }
    first = meta["100"]
    assert first["id"].startswith("images/") and Image.open(root / first["id"]).size == (32, 32)


def test_gedit_mini_layout(tmp_path):
    path = write_gedit_mini(tmp_path / "gedit")
    assert path.name == "train-00000-of-00001.parquet"
    table = pq.read_table(path).to_pylist()
    n = sum(COUNTS.values())
    assert len(table) == n + 1
    assert [r["key"] for r in table] == [f"{i:04x}" for i in range(n)] + [f"{n:04x}cn"]
    assert [r["Intersection_exist"] for r in table] == [i % 2 == 0 for i in range(n + 1)]
    assert [r["instruction_language"] for r in table] == ["en"] * n + ["cn"]
    assert table[-1]["task_type"] == table[0]["task_type"]  # the Chinese row repeats the first example
    assert all(isinstance(r["input_image"]["bytes"], bytes) and r["input_image"]["path"] is None for r in table)


def test_writing_twice_gives_the_same_files(tmp_path):
    a, b = write_imgedit_mini(tmp_path / "a"), write_imgedit_mini(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    ga, gb = write_gedit_mini(tmp_path / "ga"), write_gedit_mini(tmp_path / "gb")
    assert pq.read_table(ga).equals(pq.read_table(gb))


def test_command_writes_both_into_the_folder(tmp_path, capsys):
    mini_benchmarks.main([str(tmp_path / "bench")])
    out = capsys.readouterr().out.split()
    assert out == [
        str(tmp_path / "bench" / "imgedit_mini"),
        str(tmp_path / "bench" / "gedit_mini" / "train-00000-of-00001.parquet"),
    ]
    assert (tmp_path / "bench" / "imgedit_mini" / "basic_edit.json").is_file()


def test_command_reads_the_folder_from_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"folder: {tmp_path / 'from_config'}\n")
    mini_benchmarks.main(["--config", str(cfg)])
    assert (tmp_path / "from_config" / "gedit_mini" / "train-00000-of-00001.parquet").is_file()
    assert str(tmp_path / "from_config") in capsys.readouterr().out
