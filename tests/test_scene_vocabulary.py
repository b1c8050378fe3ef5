"""The scene grammar's words: palette, shapes, 3 x 3 positions and the word list of the tiny tokenizers."""

from __future__ import annotations

import itertools

from editr1.scene_vocabulary import PALETTE, POSITIONS_3X3, SHAPES, TEMPLATE_WORDS, vocabulary


def test_palette_colours_are_the_rgb_cube_corners_and_far_apart():
    assert len(PALETTE) == 8 and set(PALETTE.values()) == set(itertools.product((0, 255), repeat=3))
    for a, b in itertools.combinations(PALETTE.values(), 2):
        assert max(abs(x - y) for x, y in zip(a, b)) == 255
        assert sum(abs(x - y) for x, y in zip(a, b)) / 3 / 255 >= 1 / 3  # the comment's bound


def test_positions_are_a_3x3_grid_with_a_centre():
    assert [len(row) for row in POSITIONS_3X3] == [3, 3, 3]
    assert POSITIONS_3X3[1][1] == "center" and POSITIONS_3X3[0][0] == "top left"
    assert len({p for row in POSITIONS_3X3 for p in row}) == 9


def test_vocabulary_is_every_single_word_once_in_order():
    words = vocabulary()
    position_words = ["top", "left", "right", "center", "bottom"]  # first appearance in the grid, row by row
    assert words == TEMPLATE_WORDS + list(PALETTE) + list(SHAPES) + position_words
    assert len(words) == 14 + 8 + 3 + 5 == len(set(words))
    assert all(w and " " not in w and w == w.lower() for w in words)


def test_vocabulary_returns_a_fresh_list():
    words = vocabulary()
    words.append("zebra")
    assert "zebra" not in vocabulary() and "zebra" not in TEMPLATE_WORDS
