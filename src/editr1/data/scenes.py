"""Synthetic scenes for instruction-based image editing, with exactly known results.

A scene is a solid background plus a few flat-coloured shapes (square, circle, triangle), each in its
own cell of a G x G grid. An example is (source scene, instruction, target scene); the target is
computed, not generated, so an edit can be scored against it pixel by pixel
(see ``editr1.rewards.scenes``). Shapes have hard edges: every pixel is exactly a palette colour.

Grammar (``{pos}`` is ``position_phrase(row, col, grid)``, e.g. "the top left" on a 3 x 3 grid):

* recolor:    "make the {color} {shape} {new}" | "change the color of the {color} {shape} to {new}"
* remove:     "remove the {color} {shape}"
* add:        "add a {color} {shape} at {pos}"
* move:       "move the {color} {shape} to {pos}"
* background: "change the background to {new}"

Every referenced object (colour + shape) is unique in its scene, shapes never share the background
colour, and every edit changes at least one pixel.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
from PIL import Image

# The grammar's words (colours, shapes, positions) live in editr1.scene_vocabulary, shared with the tiny
# policies' tokenizers; re-exported here.
from editr1.scene_vocabulary import PALETTE, POSITIONS_3X3, SHAPES, TEMPLATE_WORDS, vocabulary  # noqa: F401

TASKS: tuple[str, ...] = ("recolor", "remove", "add", "move", "background")
SPLITS: tuple[str, ...] = ("train", "heldout", "unseen")
# Tasks whose edited object still exists afterwards (the only ones a holdout pair can apply to).
OBJECT_TASKS: tuple[str, ...] = ("recolor", "add", "move")

REQUIREMENTS: dict[str, str] = {
    "recolor": "Only the named object changes colour; its shape, size and position, the other objects "
    "and the background stay exactly as they were.",
    "remove": "Only the named object disappears, leaving plain background where it was; everything else "
    "stays exactly as it was.",
    "add": "Exactly one new object of the named colour and shape appears at the named position; everything "
    "else stays exactly as it was.",
    "move": "Only the named object moves to the named position, keeping its shape, colour and size, and "
    "its old place becomes plain background; everything else stays exactly as it was.",
    "background": "Only the background colour changes; every object keeps its shape, colour, size and position.",
}
MIN_CELL = 6  # px per grid cell, so a 4 px shape keeps a 1 px margin and shapes stay distinguishable
MAX_ATTEMPTS = 200


@dataclass(frozen=True)
class SceneObject:
    """One shape of one palette colour in grid cell (row, col), row 0 at the top."""

    shape: str
    color: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    """A background colour and objects (sorted by cell, at most one per cell) on a grid x grid grid."""

    grid: int
    background: str
    objects: tuple[SceneObject, ...] = ()


@dataclass(frozen=True)
class SceneEdit:
    """A source scene, the instruction, and the exact target scene.

    ``edited`` is the edited object as it is in the target (None for remove and background).
    """

    source: Scene
    target: Scene
    task: str
    prompt: str
    requirement: str
    edited: SceneObject | None


def _names(values: list[str] | None, allowed: tuple[str, ...], kind: str, minimum: int) -> list[str]:
    if values is None:
        return list(allowed)
    if isinstance(values, str):
        raise ValueError(f"{kind}s must be a list of names, not the string {values!r}")
    values = list(values)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; known: {list(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate {kind}s in {values}")
    if len(values) < minimum:
        raise ValueError(f"need at least {minimum} {kind}(s), got {values}")
    return values


@dataclass
class SceneConfig:
    """What scenes look like and which edits are asked for.

    ``colors``/``shapes``/``tasks`` of None mean all of ``PALETTE``/``SHAPES``/``TASKS`` (they are
    resolved to lists on construction). ``holdout`` lists "shape:color" pairs: the "train" and
    "heldout" splits never contain such an object anywhere (so no instruction recolours, adds or moves
    an object into that pair), and every "unseen" example's edited object ends up as one of them
    (recolor to it, add it, or move it).
    """

    size: int = 32
    grid: int = 3
    min_shapes: int = 1
    max_shapes: int = 3
    colors: list[str] | None = None
    shapes: list[str] | None = None
    tasks: list[str] | None = None
    holdout: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("size", "grid", "min_shapes", "max_shapes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"SceneConfig.{name} must be an int, got {value!r}")
        g = self.grid
        if g < 2:
            raise ValueError(f"grid must be >= 2 (moves and adds need a free cell), got {g}")
        if self.size < MIN_CELL * g:
            raise ValueError(
                f"size={self.size} is too small to draw a {g}x{g} grid: each cell needs >= {MIN_CELL} px, "
                f"so size must be >= {MIN_CELL * g}"
            )
        if not 1 <= self.min_shapes <= self.max_shapes <= g * g:
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= grid*grid={g * g}, got {self.min_shapes}..{self.max_shapes}"
            )
        self.colors = _names(self.colors, tuple(PALETTE), "colour", 2)
        self.shapes = _names(self.shapes, SHAPES, "shape", 1)
        self.tasks = _names(self.tasks, TASKS, "task", 1)
        if isinstance(self.holdout, str):
            raise ValueError(f"holdout must be a list of 'shape:color' strings, not the string {self.holdout!r}")
        self.holdout = list(self.holdout)
        for item in self.holdout:
            parts = item.split(":") if isinstance(item, str) else []
            if len(parts) != 2:
                raise ValueError(f"holdout entries look like 'circle:yellow', got {item!r}")
            shape, color = parts
            if shape not in self.shapes:
                raise ValueError(f"holdout {item!r}: shape {shape!r} is not one of the scene shapes {self.shapes}")
            if color not in self.colors:
                raise ValueError(f"holdout {item!r}: colour {color!r} is not one of the scene colours {self.colors}")
        if len(set(self.holdout)) != len(self.holdout):
            raise ValueError(f"duplicate holdout entries in {self.holdout}")
        if set(self.tasks) <= {"add", "move"} and self.min_shapes >= g * g:
            raise ValueError(f"tasks {self.tasks} need a free cell but min_shapes={self.min_shapes} fills the grid")
        if set(self.tasks) <= {"recolor", "background"} and len(self.colors) < 3:
            raise ValueError(f"tasks {self.tasks} need at least 3 colours, got {self.colors}")

    @property
    def holdout_pairs(self) -> frozenset[tuple[str, str]]:
        """The held-out (shape, colour) pairs."""
        return frozenset(tuple(item.split(":")) for item in self.holdout)  # type: ignore[misc]


def position_phrase(row: int, col: int, grid: int) -> str:
    """Words for a grid cell: "the top left" ... "the bottom right" on 3x3, else "row R column C" (1-based)."""
    if grid == 3:
        return "the " + POSITIONS_3X3[row][col]
    return f"row {row + 1} column {col + 1}"


@cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """A (side, side) bool mask of ``shape`` (hard edges; pixel centres tested against the outline)."""
    c = (np.arange(side) + 0.5) - side / 2  # pixel-centre offsets from the box centre
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = c[:, None] ** 2 + c[None, :] ** 2 <= (side / 2) ** 2
    elif shape == "triangle":  # apex at the top centre, base along the bottom row
        half_width = (np.arange(side) + 1) / 2
        mask = np.abs(c)[None, :] <= half_width[:, None]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    mask.setflags(write=False)
    return mask


def cell_bounds(index: int, grid: int, size: int) -> tuple[int, int]:
    """[start, stop) pixel range of grid row/column ``index`` in a ``size`` px image."""
    return index * size // grid, (index + 1) * size // grid


def object_mask(obj: SceneObject, grid: int, size: int) -> np.ndarray:
    """(size, size) bool mask of the pixels ``obj`` covers. Every cell draws shapes the same size."""
    cell = size // grid
    side = cell - 2 * max(1, cell // 8)
    y0, y1 = cell_bounds(obj.row, grid, size)
    x0, x1 = cell_bounds(obj.col, grid, size)
    top, left = y0 + (y1 - y0 - side) // 2, x0 + (x1 - x0 - side) // 2
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = shape_mask(obj.shape, side)
    return mask


def render(scene: Scene, size: int) -> Image.Image:
    """Draw ``scene`` as a size x size RGB image; every pixel is exactly a palette colour."""
    if size < MIN_CELL * scene.grid:
        g = scene.grid
        raise ValueError(f"size={size} is too small for a {g}x{g} grid (need >= {MIN_CELL * g})")
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = PALETTE[scene.background]
    for obj in scene.objects:
        pixels[object_mask(obj, scene.grid, size)] = PALETTE[obj.color]
    return Image.fromarray(pixels)


def _scene(grid: int, background: str, objects: list[SceneObject]) -> Scene:
    return Scene(grid, background, tuple(sorted(objects, key=lambda o: (o.row, o.col))))


def _draw(rng: random.Random, config: SceneConfig, split: str) -> SceneEdit | None:
    """One attempt at a valid example; None when this draw cannot make one (the caller retries)."""
    unseen = split == "unseen"
    held = config.holdout_pairs
    tasks = [t for t in config.tasks if t in OBJECT_TASKS] if unseen else list(config.tasks)
    task = rng.choice(tasks)
    g = config.grid
    cells = [(r, c) for r in range(g) for c in range(g)]
    rng.shuffle(cells)
    bg = rng.choice(config.colors)
    fg = [c for c in config.colors if c != bg]
    n_max = min(config.max_shapes, g * g - 1) if task in ("add", "move") else config.max_shapes
    if n_max < config.min_shapes:
        return None
    n = rng.randint(config.min_shapes, n_max)

    def allowed(shape: str, color: str) -> bool:  # may appear in a scene of this split
        return unseen or (shape, color) not in held

    def result_ok(shape: str, color: str) -> bool:  # may be what the edited object ends up as
        return ((shape, color) in held) == unseen

    def others(k: int, exclude: tuple[str, str] | None) -> list[SceneObject] | None:
        pool = [(s, c) for s in config.shapes for c in fg if allowed(s, c) and (s, c) != exclude]
        if k and not pool:
            return None
        return [SceneObject(*rng.choice(pool), *cells[i]) for i in range(len(cells) - k, len(cells))]

    # cells[0] is the edited object's cell and cells[1] its destination (move/add); the others take
    # cells from the end of the shuffled list, so they never collide with either.
    if task == "background":
        objs = others(n, None)
        if objs is None:
            return None
        new = [c for c in config.colors if c != bg and all(c != o.color for o in objs)]
        if not new:
            return None
        new_bg = rng.choice(new)
        source, target = _scene(g, bg, objs), _scene(g, new_bg, objs)
        return SceneEdit(source, target, task, f"change the background to {new_bg}", REQUIREMENTS[task], None)

    if task == "add":
        pool = [(s, c) for s in config.shapes for c in fg if result_ok(s, c)]
        rest = others(n, None)
        if not pool or rest is None:
            return None
        shape, color = rng.choice(pool)
        new_obj = SceneObject(shape, color, *cells[0])
        prompt = f"add a {color} {shape} at {position_phrase(new_obj.row, new_obj.col, g)}"
        source, target = _scene(g, bg, rest), _scene(g, bg, rest + [new_obj])
        return SceneEdit(source, target, task, prompt, REQUIREMENTS[task], new_obj)

    if task == "recolor":
        pool = [
            (s, a, b) for s in config.shapes for a in fg for b in fg if a != b and allowed(s, a) and result_ok(s, b)
        ]
        if not pool:
            return None
        shape, color, new = rng.choice(pool)
    else:  # remove / move
        pool = [(s, c) for s in config.shapes for c in fg if (result_ok(s, c) if task == "move" else allowed(s, c))]
        if not pool:
            return None
        shape, color = rng.choice(pool)
    rest = others(n - 1, (shape, color))  # keeps the referenced object unique
    if rest is None:
        return None
    obj = SceneObject(shape, color, *cells[0])
    source = _scene(g, bg, rest + [obj])
    if task == "recolor":
        edited: SceneObject | None = SceneObject(shape, new, obj.row, obj.col)
        template = rng.choice(("make the {c} {s} {n}", "change the color of the {c} {s} to {n}"))
        prompt = template.format(c=color, s=shape, n=new)
    elif task == "remove":
        edited, prompt = None, f"remove the {color} {shape}"
    else:
        edited = SceneObject(shape, color, *cells[1])
        prompt = f"move the {color} {shape} to {position_phrase(edited.row, edited.col, g)}"
    target = _scene(g, bg, rest + ([edited] if edited else []))
    return SceneEdit(source, target, task, prompt, REQUIREMENTS[task], edited)


def check_split(config: SceneConfig, split: str) -> None:
    """Raise ValueError if ``split`` is unknown or cannot produce examples under ``config``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    if split == "unseen":
        if not config.holdout:
            raise ValueError("the 'unseen' split needs SceneConfig.holdout pairs such as ['circle:yellow']")
        if not set(config.tasks) & set(OBJECT_TASKS):
            raise ValueError(f"the 'unseen' split needs one of the tasks {list(OBJECT_TASKS)}, got {config.tasks}")


def sample_edit(seed: int, config: SceneConfig, split: str = "train") -> SceneEdit:
    """The scene-level example for (seed, config, split); deterministic, retries with derived sub-seeds."""
    check_split(config, split)
    twin = sample_edit(seed, config, "train") if split == "heldout" else None
    for attempt in range(MAX_ATTEMPTS):
        rng = random.Random(f"editr1.scenes/{split}/{seed}/{attempt}")
        edit = _draw(rng, config, split)
        if edit is None:
            continue
        if twin is not None and (twin.source, twin.prompt) == (edit.source, edit.prompt):
            continue  # a "heldout" example never repeats the "train" example of the same seed
        return edit
    raise RuntimeError(
        f"no valid {split!r} example for seed {seed} in {MAX_ATTEMPTS} draws; config too restrictive: {config}"
    )


def make_example(seed: int, config: SceneConfig, split: str = "train") -> dict:
    """One example: ``image``/``target`` (PIL RGB, size x size), ``prompt``, ``requirement``, ``task``, ``key``."""
    edit = sample_edit(seed, config, split)
    return {
        "image": render(edit.source, config.size),
        "target": render(edit.target, config.size),
        "prompt": edit.prompt,
        "requirement": edit.requirement,
        "task": edit.task,
        "key": f"scene-{split}-{seed}",
    }


class SceneDataset(torch.utils.data.Dataset):
    """Item i is ``make_example(start + i, config, split)``; generated on the fly, nothing stored."""

    def __init__(self, config: SceneConfig, split: str = "train", start: int = 0, length: int = 10000) -> None:
        check_split(config, split)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.config, self.split, self.start, self.length = config, split, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index out of range for a SceneDataset of length {self.length}")
        return make_example(self.start + index, self.config, self.split)

    def image_sizes(self) -> list[tuple[int, int]]:
        """Every scene's ``(height, width)``: all square, ``config.size``."""
        return [(self.config.size, self.config.size)] * self.length


def export_folder(
    out_dir: str, count: int, config: SceneConfig | None = None, split: str = "train", start: int = 0
) -> None:
    """Write ``count`` scene examples as a UniWorld-format folder (``images/`` + ``train_metadata.jsonl``
    with ``prompt``, ``image``, ``requirement``, ``target`` and ``task``)."""
    import json
    from pathlib import Path

    config = config or SceneConfig()
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for seed in range(start, start + count):
        ex = make_example(seed, config, split)
        src, tgt = f"images/{split}-{seed:06d}.png", f"images/{split}-{seed:06d}-target.png"
        ex["image"].save(root / src)
        ex["target"].save(root / tgt)
        lines.append(
            {"prompt": ex["prompt"], "image": src, "requirement": ex["requirement"], "target": tgt, "task": ex["task"]}
        )
    with (root / "train_metadata.jsonl").open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
