"""The fixed vocabulary of the world: colours, shapes, words and background tints.

Example:
    >>> COLORS["red"]
    (220, 40, 40)
    >>> SHAPES[:2]
    ('circle', 'square')
"""

from __future__ import annotations

from typing import Literal, get_args

ColorName = Literal["red", "green", "blue", "yellow", "orange", "purple", "cyan", "brown"]
ShapeName = Literal["circle", "square", "triangle", "diamond", "cross"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "orange": (245, 130, 20),
    "purple": (140, 60, 180),
    "cyan": (30, 190, 210),
    "brown": (130, 80, 40),
}
"""Object colours, easiest first: a knob's `colors` takes the first n."""

SHAPES: tuple[str, ...] = get_args(ShapeName)
"""Object shapes, easiest first: a knob's `shape_types` takes the first n."""

BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (245, 245, 235),
    (235, 242, 250),
    (248, 236, 236),
)

INK_COLORS: tuple[tuple[int, int, int], ...] = ((20, 20, 20), (30, 40, 120), (110, 20, 20))

WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "box", "cup", "map",
    "pen", "hat", "car", "bus", "key", "egg",
    "tree", "fish", "bird", "book", "door", "moon", "star", "ship",
    "lamp", "road", "rain", "frog", "milk", "coin", "bell", "kite",
    "apple", "chair", "table", "house",
    "water", "train", "plant", "clock", "bread", "glass", "river", "stone",
    "garden", "window", "yellow", "bottle", "pencil", "rocket", "orange", "basket",
)
"""Words for text reading, easiest first: a knob's `vocabulary` takes the first n."""
