"""Small evaluation sets in the ImgEdit Basic and GEdit-Bench on-disk formats, made from held-out
synthetic scenes, so ``editr1 test`` runs end to end without the real benchmarks (tests, the demo).

    python -m editr1.data.mini_benchmarks data/benchmarks      # writes imgedit_mini/ and gedit_mini/

Scene tasks map to benchmark categories (recolor → adjust / color_alter, …). Categories get unequal
numbers of samples (so macro and micro means differ); ImgEdit has one row whose image file is absent
(counted as missing); GEdit has rows in the Intersection subset and one Chinese-language row.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from editr1.data.scenes import SceneConfig, make_example, sample_edit

IMGEDIT_OF = {"recolor": "alter", "remove": "remove", "add": "add", "move": "action", "background": "background"}
GEDIT_OF = {
    "recolor": "color_alter",
    "remove": "subject-remove",
    "add": "subject-add",
    "move": "motion_change",
    "background": "background_change",
}
# samples per scene task: unequal on purpose
COUNTS = {"recolor": 3, "remove": 2, "add": 1}


def _examples(counts: dict[str, int], start: int = 0) -> list[dict]:
    cfg = SceneConfig()
    need = dict(counts)
    out, seed = [], start
    while any(v > 0 for v in need.values()):
        task = sample_edit(seed, cfg, "heldout").task
        if need.get(task, 0) > 0:
            out.append(make_example(seed, cfg, "heldout"))
            need[task] -= 1
        seed += 1
    return out


def write_imgedit_mini(folder: str | Path) -> Path:
    """``basic_edit.json`` + ``images/<task>/<seed>.png``; the last row's image is deliberately absent."""
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    meta = {}
    for i, ex in enumerate(_examples(COUNTS)):
        rel = f"images/{ex['task']}/{ex['key']}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        ex["image"].save(root / rel)
        meta[str(100 + i)] = {"id": rel, "prompt": ex["prompt"], "edit_type": IMGEDIT_OF[ex["task"]]}
    meta["199"] = {"id": "images/remove/absent.png", "prompt": "remove the red square", "edit_type": "remove"}
    (root / "basic_edit.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return root


def write_gedit_mini(folder: str | Path) -> Path:
    """One parquet file with GEdit-Bench's columns; rows alternate in/out of the Intersection subset;
    one extra row in Chinese (``cn``), which ``languages: [en]`` leaves out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rows = {
        c: [] for c in ("key", "task_type", "instruction", "instruction_language", "input_image", "Intersection_exist")
    }
    examples = _examples(COUNTS, start=1000)
    for i, ex in enumerate(examples + examples[:1]):
        buf = io.BytesIO()
        ex["image"].save(buf, format="PNG")
        cn = i == len(examples)
        rows["key"].append(f"{i:04x}{'cn' if cn else ''}")
        rows["task_type"].append(GEDIT_OF[ex["task"]])
        rows["instruction"].append("把图片改一下" if cn else ex["prompt"])
        rows["instruction_language"].append("cn" if cn else "en")
        rows["input_image"].append({"bytes": buf.getvalue(), "path": None})
        rows["Intersection_exist"].append(i % 2 == 0)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {k: (pa.array(v, type=image_type) if k == "input_image" else pa.array(v)) for k, v in rows.items()}
    )
    path = root / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m editr1.data.mini_benchmarks [FOLDER]`` (default ``data/benchmarks``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from editr1.cli import HelpFormatter

    parser = ArgumentParser(
        prog="python -m editr1.data.mini_benchmarks", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a file with the options (folder: ...)")
    folder = parser.add_argument(
        "folder", type=str, help="where imgedit_mini/ and gedit_mini/ are written (default: data/benchmarks)"
    )
    # A positional that may be left out and still be read from --config (nargs="?" would put its default
    # over the file's value): a set default, and not required.
    parser.set_defaults(folder="data/benchmarks")
    folder.required = False
    out = Path(parser.parse_args(sys.argv[1:] if argv is None else argv).folder)
    print(write_imgedit_mini(out / "imgedit_mini"))
    print(write_gedit_mini(out / "gedit_mini"))


if __name__ == "__main__":
    main()
