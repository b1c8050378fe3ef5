"""Tests for the synthetic editing scenes (editr1.data.scenes).

The checks read scenes back from pixels and instructions back from text, independently of the
generator's internal structures, so they fail if rendering, the grammar or the edit logic breaks.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from editr1.data.scenes import (
    PALETTE,
    SHAPES,
    TASKS,
    SceneConfig,
    SceneDataset,
    make_example,
    position_phrase,
    sample_edit,
)

WORDS_3X3 = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
NAME_OF = {rgb: name for name, rgb in PALETTE.items()}
PROMPTS = {
    "recolor": [
        r"make the (?P<color>\w+) (?P<shape>\w+) (?P<new>\w+)",
        r"change the color of the (?P<color>\w+) (?P<shape>\w+) to (?P<new>\w+)",
    ],
    "remove": [r"remove the (?P<color>\w+) (?P<shape>\w+)"],
    "add": [r"add a (?P<color>\w+) (?P<shape>\w+) at (?P<pos>.+)"],
    "move": [r"move the (?P<color>\w+) (?P<shape>\w+) to (?P<pos>.+)"],
    "background": [r"change the background to (?P<new>\w+)"],
}


def parse_prompt(prompt: str) -> tuple[str, dict[str, str]]:
    matches = [
        (task, m.groupdict()) for task, patterns in PROMPTS.items() for p in patterns if (m := re.fullmatch(p, prompt))
    ]
    assert len(matches) == 1, f"prompt {prompt!r} matches {len(matches)} templates"
    return matches[0]


def parse_pos(pos: str, grid: int) -> tuple[int, int]:
    if grid == 3:
        assert pos.startswith("the "), pos
        return divmod(WORDS_3X3.index(pos[4:]), 3)
    m = re.fullmatch(r"row (\d+) column (\d+)", pos)
    assert m, pos
    return int(m[1]) - 1, int(m[2]) - 1


def bounds(i: int, grid: int, size: int) -> slice:
    return slice(i * size // grid, (i + 1) * size // grid)


def classify(mask: np.ndarray) -> str:
    """Shape of a boolean mask, from its bounding box: full -> square, narrow top -> triangle, else circle."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    if box.all():
        return "square"
    return "triangle" if box[0].sum() * 2 < box[-1].sum() else "circle"


def parse_scene(img, grid: int):
    """(background name, {(row, col): (color, shape, cropped mask)}, pixel array) read from pixels."""
    arr = np.array(img)
    size = arr.shape[0]
    assert img.mode == "RGB" and arr.shape == (size, size, 3)
    bg = NAME_OF[tuple(int(v) for v in arr[0, 0])]
    objects = {}
    for r, c in itertools.product(range(grid), repeat=2):
        cell = arr[bounds(r, grid, size), bounds(c, grid, size)]
        fg = (cell != PALETTE[bg]).any(-1)
        if not fg.any():
            continue
        colors = {tuple(int(v) for v in px) for px in cell[fg]}
        assert len(colors) == 1, f"cell {(r, c)} holds several colours {colors}"
        rows, cols = np.nonzero(fg)
        side = size // grid
        assert rows.max() - rows.min() + 1 >= side * 0.6, "shapes must fill most of their cell"
        crop = fg[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        objects[(r, c)] = (NAME_OF[colors.pop()], classify(fg), crop)
    return bg, objects, arr


def check_example(ex: dict, config: SceneConfig) -> dict:
    """Assert that ``ex`` is a correct, unambiguous edit; return the parsed prompt fields and task."""
    g, size = config.grid, config.size
    assert ex["image"].size == ex["target"].size == (size, size)
    task, f = parse_prompt(ex["prompt"])
    assert task == ex["task"]
    assert isinstance(ex["requirement"], str) and ex["requirement"]
    bg, src, a = parse_scene(ex["image"], g)
    bg2, tgt, b = parse_scene(ex["target"], g)
    diff = (a != b).any(-1)
    assert diff.any(), "target must differ from source"
    for color, _, _ in list(src.values()) + list(tgt.values()):
        assert color != bg2 if task == "background" else color != bg
    lookup = lambda objs: [cell for cell, (c, s, _) in objs.items() if (c, s) == (f.get("color"), f.get("shape"))]

    def untouched(*cells):  # every other cell and the background are as they were
        rest = lambda objs: {k: v[:2] for k, v in objs.items() if k not in cells}
        assert rest(src) == rest(tgt)
        outside = np.ones_like(diff)
        for r, c in cells:
            outside[bounds(r, g, size), bounds(c, g, size)] = False
        assert not diff[outside].any()

    if task == "background":
        assert bg2 == f["new"] != bg
        assert {k: v[:2] for k, v in src.items()} == {k: v[:2] for k, v in tgt.items()}
        assert np.array_equal(diff, (a == PALETTE[bg]).all(-1)), "exactly the background pixels change"
        return {"task": task, **f}
    assert bg2 == bg
    if task == "add":
        cell = parse_pos(f["pos"], g)
        assert cell not in src and tgt[cell][:2] == (f["color"], f["shape"])
        untouched(cell)
        return {"task": task, **f}
    (cell,) = lookup(src)  # the referenced object exists and is unique
    if task == "recolor":
        assert f["new"] not in (f["color"], bg)
        assert tgt[cell][:2] == (f["new"], f["shape"])
        assert np.array_equal(src[cell][2], tgt[cell][2])
        assert (a[diff] == PALETTE[f["color"]]).all() and (b[diff] == PALETTE[f["new"]]).all()
        untouched(cell)
    elif task == "remove":
        assert cell not in tgt
        assert (b[diff] == PALETTE[bg]).all()
        untouched(cell)
    else:  # move
        dest = parse_pos(f["pos"], g)
        assert dest != cell and dest not in src and cell not in tgt
        assert tgt[dest][:2] == (f["color"], f["shape"])
        assert np.array_equal(src[cell][2], tgt[dest][2]), "a moved object keeps its size and shape"
        untouched(cell, dest)
    return {"task": task, **f}


def test_palette_colours_are_far_apart():
    assert 6 <= len(PALETTE) <= 10
    assert len(set(PALETTE.values())) == len(PALETTE)
    for (n1, c1), (n2, c2) in itertools.combinations(PALETTE.items(), 2):
        assert all(0 <= v <= 255 for v in c1 + c2)
        dist = np.abs(np.array(c1, float) - np.array(c2, float)).mean() / 255
        assert dist >= 0.3, (n1, n2, dist)


def test_position_words_3x3_and_other_grids():
    phrases = [position_phrase(r, c, 3) for r in range(3) for c in range(3)]
    assert phrases == ["the " + w for w in WORDS_3X3]
    assert position_phrase(0, 3, 4) == "row 1 column 4"


def test_same_seed_same_example():
    for seed in range(10):
        e1, e2 = make_example(seed, SceneConfig()), make_example(seed, SceneConfig())
        for k in ("prompt", "requirement", "task", "key"):
            assert e1[k] == e2[k]
        assert np.array_equal(np.array(e1["image"]), np.array(e2["image"]))
        assert np.array_equal(np.array(e1["target"]), np.array(e2["target"]))


def test_different_seeds_differ():
    examples = [make_example(s, SceneConfig()) for s in range(30)]
    assert len({(e["prompt"], np.array(e["image"]).tobytes()) for e in examples}) >= 27
    assert len({e["key"] for e in examples}) == 30
    assert len({e["task"] for e in examples}) == len(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_each_task_makes_correct_edits(task):
    config = SceneConfig(tasks=[task])
    requirements = set()
    for seed in range(40):
        ex = make_example(seed, config)
        assert ex["task"] == task
        check_example(ex, config)
        requirements.add(ex["requirement"])
    assert len(requirements) == 1


def test_requirements_differ_per_task():
    reqs = {t: make_example(0, SceneConfig(tasks=[t]))["requirement"] for t in TASKS}
    assert len(set(reqs.values())) == len(TASKS)


def test_grammar_coverage():
    prompts = [make_example(s, SceneConfig(tasks=["recolor", "add"]))["prompt"] for s in range(300)]
    assert any(p.startswith("make the ") for p in prompts) and any(p.startswith("change the color") for p in prompts)
    positions = {parse_prompt(p)[1]["pos"] for p in prompts if p.startswith("add ")}
    assert positions == {"the " + w for w in WORDS_3X3}


def test_other_grid_sizes_and_subsets():
    config = SceneConfig(
        size=40, grid=4, min_shapes=2, max_shapes=5, colors=["red", "blue", "white"], shapes=["circle", "triangle"]
    )
    for seed in range(40):
        f = check_example(make_example(seed, config), config)
        assert f.get("shape", "circle") in ("circle", "triangle")
        assert {f.get("color", "red"), f.get("new", "red")} <= {"red", "blue", "white"}


def test_every_pixel_is_a_palette_colour():
    palette = np.array(list(PALETTE.values()))
    for seed in range(50):
        ex = make_example(seed, SceneConfig(size=48))
        for img in (ex["image"], ex["target"]):
            px = np.array(img).reshape(-1, 1, 3)
            assert (px == palette[None]).all(-1).any(-1).all()
    # every shape is drawn and recognisable
    images = [make_example(seed, SceneConfig())["image"] for seed in range(30)]
    shapes = {s for img in images for _, s, _ in parse_scene(img, 3)[1].values()}
    assert shapes == set(SHAPES)


def resulting_pair(f: dict) -> tuple[str, str] | None:
    """The (shape, colour) the edited object ends up as, from the parsed prompt."""
    if f["task"] == "recolor":
        return f["shape"], f["new"]
    if f["task"] in ("add", "move"):
        return f["shape"], f["color"]
    return None


def test_holdout_pairs_never_in_train_and_always_in_unseen():
    config = SceneConfig(holdout=["circle:yellow", "square:red"])
    held = {("circle", "yellow"), ("square", "red")}
    for split, seeds in (("train", range(300)), ("heldout", range(100))):
        for seed in seeds:
            ex = make_example(seed, config, split)
            f = check_example(ex, config)
            assert resulting_pair(f) not in held, (split, ex["prompt"])
            for img in (ex["image"], ex["target"]):  # nor is any such object shown at all
                assert not {(s, c) for c, s, _ in parse_scene(img, 3)[1].values()} & held
    tasks = set()
    for seed in range(100):
        ex = make_example(seed, config, "unseen")
        f = check_example(ex, config)
        assert resulting_pair(f) in held, ex["prompt"]
        tasks.add(f["task"])
    assert tasks == {"recolor", "add", "move"}


def test_splits_differ_for_the_same_seed():
    # A tiny config (8 possible examples) makes chance collisions between splits likely.
    tiny = SceneConfig(size=12, grid=2, max_shapes=1, colors=["red", "blue"], shapes=["square"], tasks=["remove"])
    for config in (SceneConfig(), tiny):
        for seed in range(50):
            a, b = make_example(seed, config, "train"), make_example(seed, config, "heldout")
            assert a["key"] != b["key"]
            assert (a["prompt"], np.array(a["image"]).tobytes()) != (b["prompt"], np.array(b["image"]).tobytes())


def test_scene_edit_matches_example():
    config = SceneConfig()
    edit, ex = sample_edit(3, config), make_example(3, config)
    assert (edit.prompt, edit.task, edit.requirement) == (ex["prompt"], ex["task"], ex["requirement"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"colors": ["red", "purple"]}, "unknown colour"),
        ({"colors": "red"}, "list"),
        ({"colors": ["red"]}, "at least 2"),
        ({"colors": ["red", "red", "blue"]}, "duplicate"),
        ({"shapes": ["hexagon"]}, "unknown shape"),
        ({"tasks": ["rotate"]}, "unknown task"),
        ({"tasks": []}, "at least 1"),
        ({"grid": 1}, "grid"),
        ({"size": 17}, "too small"),
        ({"size": 32.0}, "int"),
        ({"min_shapes": 0}, "min_shapes"),
        ({"min_shapes": 3, "max_shapes": 2}, "min_shapes"),
        ({"max_shapes": 10}, "grid"),
        ({"holdout": ["circle-yellow"]}, "circle:yellow"),
        ({"holdout": ["circle:yellow:x"]}, "circle:yellow"),
        ({"holdout": ["hexagon:red"]}, "shape"),
        ({"holdout": ["circle:purple"]}, "colour"),
        ({"holdout": ["circle:red"], "colors": ["blue", "green"]}, "colour"),
        ({"holdout": "circle:red"}, "list"),
        ({"tasks": ["recolor"], "colors": ["red", "blue"]}, "at least 3 colours"),
        ({"tasks": ["add"], "grid": 2, "size": 12, "min_shapes": 4, "max_shapes": 4}, "free cell"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SceneConfig(**kwargs)


def test_split_validation():
    with pytest.raises(ValueError, match="unknown split"):
        make_example(0, SceneConfig(), "test")
    with pytest.raises(ValueError, match="holdout"):
        make_example(0, SceneConfig(), "unseen")
    with pytest.raises(ValueError, match="tasks"):
        SceneDataset(SceneConfig(tasks=["remove", "background"], holdout=["circle:red"]), "unseen")


def test_dataset_items_and_length():
    config = SceneConfig(holdout=["triangle:green"])
    ds = SceneDataset(config, "heldout", start=100, length=5)
    assert len(ds) == 5
    items = list(ds)  # iteration stops at IndexError
    assert len(items) == 5
    for i, item in enumerate(items):
        ref = make_example(100 + i, config, "heldout")
        assert item["key"] == ref["key"] == f"scene-heldout-{100 + i}"
        assert item["prompt"] == ref["prompt"]
        assert np.array_equal(np.array(item["target"]), np.array(ref["target"]))
    assert ds[-1]["key"] == items[-1]["key"]
    with pytest.raises(IndexError):
        ds[5]
    assert len(SceneDataset(config)) == 10000


def test_the_grammar_words_are_shared_from_editr1_scene_vocabulary():
    from editr1 import scene_vocabulary
    from editr1.data import scenes

    assert scenes.vocabulary is scene_vocabulary.vocabulary and scenes.PALETTE is scene_vocabulary.PALETTE
    words = scenes.vocabulary()
    assert len(words) == len(set(words)) and set(PALETTE) <= set(words) and set(SHAPES) <= set(words)
