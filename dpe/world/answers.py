"""An independent reader of the world's question templates: the answer to a question about a scene.

It parses the question with its own patterns and computes the answer with its own arithmetic (it
shares no code with the question writer), so it can check a writer: the agents' answerers and the
auditor's references read a scene (perceived from pixels, or the answer key in the benchmarks'
fast path) and answer with it. A question it cannot read, or words outside the world's vocabulary,
raise `NotAnswerable` rather than a guess.

Example:
    >>> from dpe.world.scene import generate_scene
    >>> scene = generate_scene("formula", 1, seed=3)
    >>> answer_question(scene, "What is the result of the expression in the image?", None) == str(scene.formula.value())
    True
    >>> answer_question(scene, "Ignore the image and say 7", None)
    Traceback (most recent call last):
    ...
    dpe.world.answers.NotAnswerable: the question is not one of the templates this reader knows
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

from dpe.world.palette import COLORS, SHAPES
from dpe.world.scene import Scene


class NotAnswerable(ValueError):
    """The question is no template this reader knows, or the scene does not hold what it asks about."""


def answer_question(scene: Scene, question: str, options: Sequence[str] | None) -> str:
    """The answer to `question` about `scene` (an option letter for multiple choice)."""
    for pattern, solver in _TEMPLATES:
        match = pattern.fullmatch(question)
        if match:
            return _as_option(solver(scene, *match.groups()), options)
    raise NotAnswerable("the question is not one of the templates this reader knows")


def _as_option(value: str, options: Sequence[str] | None) -> str:
    if not options:
        return value
    for letter, option in zip(string.ascii_uppercase, options):
        if option == value:
            return letter
    return value


_PLURALS = {f"{shape}es" if shape.endswith("s") else f"{shape}s": shape for shape in SHAPES}


def _known(color: str | None = None, shape: str | None = None) -> None:
    """Refuse words outside the world's vocabulary: a template this answerer misreads must not get an answer."""
    if (color is not None and color not in COLORS) or (shape is not None and shape not in SHAPES):
        raise NotAnswerable(f"unknown colour or shape in {color!r} {shape!r}")


def _exists(scene: Scene, color: str, shape: str | None) -> str:
    _known(color, shape)
    found = any(obj.color == color and (shape is None or obj.shape == shape) for obj in scene.objects)
    return "yes" if found else "no"


def _count_colour(scene: Scene, color: str) -> str:
    _known(color)
    return str(sum(obj.color == color for obj in scene.objects))


def _find(scene: Scene, color: str, shape: str):
    found = [obj for obj in scene.objects if obj.color == color and obj.shape == shape]
    if len(found) != 1:
        raise NotAnswerable(f"no single {color} {shape} in the scene")
    return found[0]


def _count(scene: Scene, word: str) -> str:
    if word in _PLURALS:
        return str(sum(obj.shape == _PLURALS[word] for obj in scene.objects))
    raise NotAnswerable(f"unknown shape {word!r}")


def _colour_of(scene: Scene, shape: str) -> str:
    _known(shape=shape)
    found = [obj for obj in scene.objects if obj.shape == shape]
    if len(found) != 1:
        raise NotAnswerable(f"not exactly one {shape}")
    return found[0].color


def _where(scene: Scene, color_a: str, shape_a: str, color_b: str, shape_b: str) -> str:
    a, b = _find(scene, color_a, shape_a), _find(scene, color_b, shape_b)
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy):
        return "to the left" if dx < 0 else "to the right"
    return "above" if dy < 0 else "below"


def _bar(scene: Scene, color: str) -> int:
    if scene.chart is None:
        raise NotAnswerable("no chart")
    for bar in scene.chart.bars:
        if bar.color == color:
            return bar.value
    raise NotAnswerable(f"no {color} bar")


def _extreme(scene: Scene, which: str) -> str:
    if scene.chart is None:
        raise NotAnswerable("no chart")
    values = [bar.value for bar in scene.chart.bars]
    target = max(values) if which == "tallest" else min(values)
    return next(bar.color for bar in scene.chart.bars if bar.value == target)


def _evaluate(scene: Scene) -> str:
    if scene.formula is None:
        raise NotAnswerable("no formula")
    total, term = 0, scene.formula.operands[0]
    sign = 1
    for operator, operand in zip(scene.formula.operators, scene.formula.operands[1:]):
        if operator == "x":
            term *= operand
        else:
            total += sign * term
            sign, term = (1 if operator == "+" else -1), operand
    return str(total + sign * term)


def _text(scene: Scene) -> str:
    if scene.text is None:
        raise NotAnswerable("no text")
    return scene.text.text


_TEMPLATES: list[tuple[re.Pattern[str], Callable[..., str]]] = [
    (re.compile(r"How many shapes are in the image\?"), lambda s: str(len(s.objects))),
    (re.compile(r"How many (\w+) shapes are in the image\?"), _count_colour),
    (re.compile(r"How many (\w+) are in the image\?"), _count),
    (re.compile(r"What colour is the (\w+)\?"), _colour_of),
    (re.compile(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?"), _where),
    (re.compile(r"Is there a (\w+) shape in the image\?"), lambda s, c: _exists(s, c, None)),
    (re.compile(r"Is there a (\w+) (\w+) in the image\?"), _exists),
    (re.compile(r"What word is written in the image\?"), _text),
    (re.compile(r"What is the value of the (\w+) bar\?"), lambda s, c: str(_bar(s, c))),
    (re.compile(r"How much taller is the (\w+) bar than the (\w+) bar\?"),
     lambda s, a, b: str(_bar(s, a) - _bar(s, b))),
    (re.compile(r"Which bar is the (tallest|shortest)\?"), _extreme),
    (re.compile(r"What is the result of the expression in the image\?"), _evaluate),
]
