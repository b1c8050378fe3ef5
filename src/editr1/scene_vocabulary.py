"""The words of the synthetic-scene grammar: palette colours, shapes, 3 x 3 positions and template words.

Shared by :mod:`editr1.data.scenes` (which draws and names scenes with them) and the tiny policies
(whose word-level tokenizers are built from :func:`vocabulary`), so it sits in neither package.
"""

from __future__ import annotations

# The eight corners of the RGB cube: any two differ by 255 in at least one channel, so their mean
# absolute channel difference is at least 1/3 (>= 0.3) on the [0, 1] scale.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
POSITIONS_3X3: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
TEMPLATE_WORDS = [
    "make",
    "the",
    "change",
    "color",
    "of",
    "to",
    "remove",
    "add",
    "a",
    "at",
    "move",
    "background",
    "row",
    "column",
]


def vocabulary() -> list[str]:
    """Every word the scene grammar can produce (for word-level tokenizers of tiny models)."""
    words = list(TEMPLATE_WORDS) + list(PALETTE) + list(SHAPES)
    for row in POSITIONS_3X3:
        for phrase in row:
            words.extend(phrase.split())
    return list(dict.fromkeys(words))
