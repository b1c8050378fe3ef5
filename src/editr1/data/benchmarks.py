"""Evaluation sets as they lie on disk, and folders of images for ``editr1 predict``.

* **ImgEdit Basic**: ``basic_edit.json`` — ``{key: {"id": "<image path under the image root>",
  "prompt": …, "edit_type": …}}`` — and the original images under an image root.
* **GEdit-Bench**: its parquet files (columns ``key``, ``task_type``, ``instruction``,
  ``instruction_language``, ``input_image`` — an image struct with ``bytes`` — and
  ``Intersection_exist``), one file or a folder searched recursively.
* **A folder of images** with one instruction for all of them.

Items look like the training data's (``image``, ``prompt``, ``requirement``, ``task``, ``key``) plus a
``meta`` dict (``language``, ``intersection``). A row whose image cannot be read gives
``{"skipped": reason, "key": …, "task": …, "meta": …}``: the evaluation counts it as *missing* in its
category, never silently drops it.
"""

from __future__ import annotations

import json
import logging
import stat
from collections import Counter
from pathlib import Path

from torch.utils.data import Dataset

from editr1.data.jsonl import check_file, check_prompt, load_image, locate

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _load(path: Path | str, outside: str = "image_outside_root"):
    """The image at ``path`` (a :func:`~editr1.data.jsonl.locate` result), or why not: ``outside`` when the
    path leads out of its root, ``missing_image_file``, or a path the OS refuses (NUL byte, over-long name,
    symlink loop) named like ``image_symlink_loop``."""
    if isinstance(path, Path):
        path = check_file(path)
    if isinstance(path, str):
        return {"outside_folder": outside, "missing_file": "missing_image_file"}.get(path, "image_" + path)
    return load_image(path)


def _item(image, prompt: str, task: str, key: str, meta: dict) -> dict:
    if isinstance(image, str):
        return {"skipped": image, "key": key, "task": task, "meta": meta}
    return {"image": image, "prompt": prompt, "requirement": "", "target": None, "task": task, "key": key, "meta": meta}


class ImgEditDataset(Dataset):
    """ImgEdit Basic: ``path`` is ``basic_edit.json`` or the folder holding it; ``image_root`` (default:
    that folder) holds the original images at each row's ``id``."""

    def __init__(
        self, path: str | Path, image_root: str | Path | None = None, metadata_file: str = "basic_edit.json"
    ) -> None:
        path = Path(path)
        meta = path / metadata_file if path.is_dir() else path
        if not meta.is_file():
            raise FileNotFoundError(f"ImgEdit metadata {meta} not found (expected basic_edit.json keyed by sample id)")
        self.root = Path(image_root) if image_root is not None else meta.parent
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImgEdit image root {self.root} does not exist")
        try:
            data = json.loads(meta.read_text(encoding="utf-8-sig"))  # a BOM is not JSON
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{meta}: expected a JSON object keyed by sample id")
        self.rows: list[tuple[str, str, str, str]] = []
        self.skipped_rows: Counter = Counter()
        for key, row in data.items():
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("id"), str)
                or not isinstance(row.get("edit_type"), str)
            ):
                self.skipped_rows["bad_row"] += 1
                continue
            prompt, reason = check_prompt(row.get("prompt"))
            if reason is not None:
                self.skipped_rows[reason] += 1
                continue
            self.rows.append((str(key), prompt, row["edit_type"], row["id"]))  # the path is checked when read
        if self.skipped_rows:
            log.warning("%s: skipped %d rows: %s", meta, sum(self.skipped_rows.values()), dict(self.skipped_rows))
        if not self.rows:
            raise ValueError(f"{meta} has no usable row (skipped: {dict(self.skipped_rows) or 'empty'})")

    def __len__(self) -> int:
        return len(self.rows)

    def tasks(self) -> list[str]:
        return [r[2] for r in self.rows]

    def __getitem__(self, index: int) -> dict:
        key, prompt, task, image_id = self.rows[index]
        image = _load(locate(self.root, image_id))
        return _item(image, prompt, task, key, {"language": "en", "intersection": False})


def parquet_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
        if files:
            return files
    raise FileNotFoundError(f"no GEdit-Bench parquet files at {p}")


class GEditDataset(Dataset):
    """GEdit-Bench from its parquet files; ``languages`` keeps rows whose ``instruction_language`` is
    listed (``["en"]`` = GEdit-Bench-EN, 606 samples)."""

    COLUMNS = ("key", "task_type", "instruction", "instruction_language", "input_image", "Intersection_exist")

    def __init__(self, path: str | Path, languages: list[str] | tuple[str, ...] = ("en",)) -> None:
        import pyarrow.parquet as pq

        self.files = parquet_files(path)
        self.languages = list(languages)
        self.rows: list[dict] = []
        self.skipped_rows: Counter = Counter()
        for f in self.files:
            table = pq.read_table(f)
            missing = [c for c in self.COLUMNS if c not in table.column_names]
            if missing:
                raise ValueError(f"{f} lacks GEdit-Bench columns {missing} (has {table.column_names})")
            cols = {c: table.column(c).to_pylist() for c in self.COLUMNS if c != "input_image"}
            for i in range(table.num_rows):
                lang = str(cols["instruction_language"][i])
                if lang not in self.languages:
                    continue
                prompt, reason = check_prompt(cols["instruction"][i])
                if reason is not None:
                    self.skipped_rows[reason] += 1
                    continue
                self.rows.append(
                    {
                        "file": f,
                        "row": i,
                        "key": str(cols["key"][i]),
                        "task": str(cols["task_type"][i]),
                        "prompt": prompt,
                        "language": lang,
                        "intersection": bool(cols["Intersection_exist"][i]),
                    }
                )
        if self.skipped_rows:
            log.warning("%s: skipped %d rows: %s", path, sum(self.skipped_rows.values()), dict(self.skipped_rows))
        if not self.rows:
            raise ValueError(f"no usable GEdit-Bench rows in {path} for languages {self.languages}")
        self._tables: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def tasks(self) -> list[str]:
        return [r["task"] for r in self.rows]

    def _image_bytes(self, f: Path, i: int):
        import pyarrow.parquet as pq

        if f not in self._tables:  # per worker process; only the image column
            self._tables[f] = pq.read_table(f, columns=["input_image"]).column("input_image")
        value = self._tables[f][i].as_py()
        if isinstance(value, dict):
            value = value.get("bytes")
        return value if isinstance(value, (bytes, bytearray)) else None

    def __getitem__(self, index: int) -> dict:
        r = self.rows[index]
        data = self._image_bytes(r["file"], r["row"])
        image = load_image(bytes(data)) if data else "missing_image_bytes"
        return _item(
            image, r["prompt"], r["task"], r["key"], {"language": r["language"], "intersection": r["intersection"]}
        )

    def __getstate__(self) -> dict:  # pyarrow tables are reopened in each worker
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state


class ImageFolderDataset(Dataset):
    """Every image in ``folder`` (sorted by name, not recursive) edited with one ``instruction``; the key
    is the file's stem."""

    def __init__(self, folder: str | Path, instruction: str) -> None:
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        prompt, reason = check_prompt(instruction)
        if reason is not None:
            raise ValueError(f"the instruction is not usable ({reason}): {instruction!r}")
        self.prompt = prompt
        self.files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and _listed(p))
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
        stems = Counter(p.stem for p in self.files)
        self.keys = [p.stem if stems[p.stem] == 1 else p.name for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return _item(_load(self.files[index]), self.prompt, "", self.keys[index], {})


def _listed(path: Path) -> bool:
    """A regular file, or a link that cannot be followed (a loop, a dangling link: read, it is counted as
    skipped rather than silently left out); never a folder or a FIFO (reading one would block)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True
