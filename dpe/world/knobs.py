"""Difficulty knobs: what a difficulty level (1 = easiest, 5 = hardest) means for a scene.

Every capability reads the knobs that concern it: shape scenes read the object counts and palette,
text scenes the vocabulary and font size, charts the bar count and value range, formulas the
operands and operators. Noise and clutter apply to every scene. Sizes are given for a 64-pixel
image and scale with the image size.

Example:
    >>> knobs_for(1).max_objects < knobs_for(5).max_objects
    True
    >>> knobs_for(3).operators
    '+-'
"""

from __future__ import annotations

from dataclasses import dataclass

DIFFICULTY_LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Knobs:
    """The settings that make a scene easy or hard."""

    min_objects: int
    max_objects: int
    shape_types: int
    colors: int
    noise: float
    clutter: int
    font_size: int
    vocabulary: int
    bars: int
    max_value: int
    operand_max: int
    operators: str
    operands: int
    choice_options: int


_LEVELS: dict[int, Knobs] = {
    1: Knobs(1, 3, 2, 3, 0.02, 0, 20, 6, 2, 4, 4, "+", 2, 3),
    2: Knobs(2, 4, 3, 4, 0.04, 1, 18, 12, 3, 5, 9, "+", 2, 3),
    3: Knobs(3, 5, 4, 5, 0.07, 2, 16, 20, 4, 6, 9, "+-", 2, 4),
    4: Knobs(4, 7, 4, 6, 0.10, 3, 14, 32, 5, 8, 20, "+-x", 2, 4),
    5: Knobs(5, 9, 5, 8, 0.15, 5, 12, 48, 6, 10, 30, "+-x", 3, 4),
}


def knobs_for(level: int) -> Knobs:
    """The knobs of a difficulty level in `DIFFICULTY_LEVELS`."""
    if level not in _LEVELS:
        raise ValueError(f"difficulty must be one of {DIFFICULTY_LEVELS}, got {level!r}")
    return _LEVELS[level]
