"""Benchmark loaders beyond test_benchmark.py's published layouts: what makes a metadata file, parquet folder or
image folder unusable (a clear error), and which rows are skipped and counted instead."""

from __future__ import annotations

import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from editr1.data.benchmarks import IMAGE_SUFFIXES, GEditDataset, ImageFolderDataset, ImgEditDataset, parquet_files


def _png(value: int = 100, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- ImgEdit
def _imgedit(tmp_path, meta) -> None:
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "a.png").write_bytes(_png())
    (tmp_path / "basic_edit.json").write_text(json.dumps(meta) if not isinstance(meta, str) else meta)


def test_imgedit_metadata_found_from_the_folder_or_the_file(tmp_path):
    _imgedit(tmp_path, {"7": {"id": "img/a.png", "prompt": "  make it red ", "edit_type": "alter"}})
    for path in (tmp_path, tmp_path / "basic_edit.json"):
        ds = ImgEditDataset(path)
        assert len(ds) == 1 and ds.tasks() == ["alter"] and ds.root == tmp_path
        item = ds[0]
        assert (item["key"], item["prompt"], item["task"]) == ("7", "make it red", "alter")
        assert item["requirement"] == "" and item["target"] is None and item["image"].size == (8, 8)
        assert item["meta"] == {"language": "en", "intersection": False}


def test_imgedit_with_another_image_root(tmp_path):
    _imgedit(tmp_path, {"1": {"id": "a.png", "prompt": "p", "edit_type": "add"}})
    assert ImgEditDataset(tmp_path, image_root=tmp_path / "img")[0]["image"].size == (8, 8)
    with pytest.raises(FileNotFoundError, match="image root .* does not exist"):
        ImgEditDataset(tmp_path, image_root=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("meta", "error", "words"),
    [
        ("{not json", ValueError, "is not valid JSON"),
        ("[1, 2]", ValueError, "expected a JSON object keyed by sample id"),
        ({}, ValueError, "has no usable row .*empty"),
        ({"1": {"id": "a.png", "prompt": " ", "edit_type": "add"}}, ValueError, "empty_prompt"),
    ],
)
def test_unusable_imgedit_metadata_is_a_clear_error(tmp_path, meta, error, words):
    _imgedit(tmp_path, meta)
    with pytest.raises(error, match=words):
        ImgEditDataset(tmp_path)


def test_missing_imgedit_metadata_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="basic_edit.json keyed by sample id"):
        ImgEditDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="other.json"):
        ImgEditDataset(tmp_path, metadata_file="other.json")


def test_bad_imgedit_rows_are_counted_by_reason(tmp_path):
    good = {"id": "img/a.png", "prompt": "p", "edit_type": "add"}
    _imgedit(
        tmp_path,
        {
            "1": good,
            "2": "not a row",
            "3": {"id": 5, "prompt": "p", "edit_type": "add"},
            "4": {"id": "img/a.png", "prompt": "p"},
            "5": {"id": "img/a.png", "prompt": None, "edit_type": "add"},
            "6": {"id": "img/a.png", "prompt": "x" * 100_000, "edit_type": "add"},
            "7": {**good, "id": "img/absent.png"},
        },
    )
    ds = ImgEditDataset(tmp_path)
    assert ds.skipped_rows == {"bad_row": 3, "missing_prompt": 1, "overlong_prompt": 1}
    assert [r[0] for r in ds.rows] == ["1", "7"]
    assert ds[1] == {"skipped": "missing_image_file", "key": "7", "task": "add", "meta": ds[1]["meta"]}


# ---------------------------------------------------------------------------------------------- GEdit
def _gedit_table(rows: list[dict]) -> pa.Table:
    cols = {c: [r[c] for r in rows] for c in GEditDataset.COLUMNS}
    return pa.table(cols)


def _row(i: int, **change) -> dict:
    row = {
        "key": f"k{i}",
        "task_type": "color_alter",
        "instruction": f"make it {i}",
        "instruction_language": "en",
        "input_image": _png(10 * i),  # plain bytes, not an image struct
        "Intersection_exist": i % 2 == 1,
    }
    row.update(change)
    return row


def test_parquet_files_one_file_or_a_folder_searched_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("z.parquet", "a/b/y.parquet", "a/x.parquet"):
        pq.write_table(_gedit_table([_row(0)]), tmp_path / rel)
    assert parquet_files(tmp_path) == sorted(
        [tmp_path / "z.parquet", tmp_path / "a/b/y.parquet", tmp_path / "a/x.parquet"]
    )
    assert parquet_files(tmp_path / "z.parquet") == [tmp_path / "z.parquet"]
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(FileNotFoundError, match="no GEdit-Bench parquet files"):
            parquet_files(missing)


def test_gedit_reads_bytes_columns_and_counts_bad_instructions(tmp_path):
    rows = [_row(1), _row(2, instruction=""), _row(3, instruction=None), _row(4, instruction_language="cn"), _row(5)]
    pq.write_table(_gedit_table(rows), tmp_path / "t.parquet")
    ds = GEditDataset(tmp_path / "t.parquet")
    assert len(ds) == 2 and ds.tasks() == ["color_alter"] * 2
    assert ds.skipped_rows == {"empty_prompt": 1, "missing_prompt": 1}  # other languages are left out, not counted
    item = ds[1]
    assert (item["key"], item["prompt"], item["meta"]) == ("k5", "make it 5", {"language": "en", "intersection": True})
    assert item["image"].getpixel((0, 0)) == (50, 50, 50)


def test_gedit_rows_without_image_bytes_are_missing_not_dropped(tmp_path):
    pq.write_table(_gedit_table([_row(1, input_image=None), _row(2)]), tmp_path / "t.parquet")
    ds = GEditDataset(tmp_path)
    assert ds[0] == {"skipped": "missing_image_bytes", "key": "k1", "task": "color_alter", "meta": ds[0]["meta"]}
    assert ds[1]["image"].size == (8, 8)


def test_gedit_with_no_row_in_the_languages_is_an_error(tmp_path):
    pq.write_table(_gedit_table([_row(1, instruction_language="cn")]), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"no usable GEdit-Bench rows .* for languages \['en'\]"):
        GEditDataset(tmp_path)
    assert len(GEditDataset(tmp_path, languages=("cn",))) == 1


def test_gedit_pickles_without_its_open_tables(tmp_path):
    pq.write_table(_gedit_table([_row(1), _row(2)]), tmp_path / "t.parquet")
    ds = GEditDataset(tmp_path)
    ds[0]
    assert ds._tables  # the image column is cached after the first read
    copy = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    assert copy._tables == {} and copy[1]["key"] == "k2" and copy[1]["image"].size == (8, 8)


# ---------------------------------------------------------------------------------------------- image folder
def test_image_folder_keys_suffixes_and_unreadable_files(tmp_path):
    for name in ("b.PNG", "a.png", "a.jpg", "c.webp", "notes.txt", "d.gif"):
        (tmp_path / name).write_bytes(_png() if name != "notes.txt" else b"hi")
    (tmp_path / "sub.png").mkdir()  # a folder with an image's name is not an image
    (tmp_path / "e.bmp").write_bytes(b"not really a bmp")
    ds = ImageFolderDataset(tmp_path, "  make it blue ")
    assert [p.name for p in ds.files] == ["a.jpg", "a.png", "b.PNG", "c.webp", "e.bmp"]
    assert ds.keys == ["a.jpg", "a.png", "b", "c", "e"]  # a stem shared by two files keeps the suffix
    assert ds[2]["prompt"] == "make it blue" and ds[2]["task"] == "" and ds[2]["meta"] == {}
    assert ds[4] == {"skipped": "unreadable_image", "key": "e", "task": "", "meta": {}}
    assert {".png", ".jpg", ".webp", ".bmp"} <= set(IMAGE_SUFFIXES) and ".gif" not in IMAGE_SUFFIXES


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "absent", "x")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images \(\.png"):
        ImageFolderDataset(tmp_path, "x")
    with pytest.raises(ValueError, match="overlong_prompt"):
        ImageFolderDataset(tmp_path, "x" * 100_000)
