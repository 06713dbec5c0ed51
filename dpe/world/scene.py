"""Scenes: what an image shows, as metadata, before any question is asked about it.

A `Scene` plays the role a captioner or detector would for a real image: its objects with shape,
colour, position and size, its rendered text, its chart values, its formula. Scenes are pure data
(JSON via `to_metadata`), validated on the way in (`Scene.model_validate`) because metadata that
travels through events is untrusted, and drawn by `dpe.world.render.render_scene`.

Example:
    >>> scene = generate_scene("chart", difficulty=2, seed=7)
    >>> scene.kind, len(scene.chart.bars)
    ('chart', 3)
    >>> Scene.model_validate(scene.to_metadata()) == scene
    True
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dpe.world.knobs import Knobs, knobs_for
from dpe.world.palette import BACKGROUNDS, COLORS, INK_COLORS, SHAPES, WORDS, ColorName, ShapeName
from dpe.world.fonts import measure_text

SceneKind = Literal["shapes", "text", "chart", "formula"]
SCENE_KINDS: tuple[str, ...] = get_args(SceneKind)
Operator = Literal["+", "-", "x"]

Channel = Annotated[int, Field(ge=0, le=255)]
RGB = tuple[Channel, Channel, Channel]
Coordinate = Annotated[int, Field(ge=-1024, le=2048)]

_MAX_SIDE = 1024
_PLACEMENT_TRIES = 200


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SceneObject(_Frozen):
    """One shape: what it is, its colour, its centre and its radius in pixels."""

    shape: ShapeName
    color: ColorName
    x: Coordinate
    y: Coordinate
    size: int = Field(ge=2, le=512)

    @property
    def name(self) -> str:
        """How questions refer to it, e.g. 'red circle'."""
        return f"{self.color} {self.shape}"


class Stroke(_Frozen):
    """A clutter line that is not an object."""

    x0: Coordinate
    y0: Coordinate
    x1: Coordinate
    y1: Coordinate
    color: RGB
    width: int = Field(ge=1, le=8)


class TextBlock(_Frozen):
    """Rendered text with its top-left corner, font size and ink colour."""

    text: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9+\-x=? ]+$")
    x: Coordinate
    y: Coordinate
    font_size: int = Field(ge=4, le=256)
    color: RGB


class Bar(_Frozen):
    """One bar of a bar chart."""

    color: ColorName
    value: int = Field(ge=0, le=1000)


class Chart(_Frozen):
    """A bar chart whose value axis runs from 0 to `max_value` with a gridline per unit."""

    bars: list[Bar] = Field(min_length=1, max_length=8)
    max_value: int = Field(ge=1, le=1000)

    @model_validator(mode="after")
    def _consistent(self) -> "Chart":
        if any(bar.value > self.max_value for bar in self.bars):
            raise ValueError("a bar is taller than the chart's max_value")
        if len({bar.color for bar in self.bars}) != len(self.bars):
            raise ValueError("bar colours must be distinct")
        return self


class Formula(_Frozen):
    """An arithmetic expression such as 3+4x2, evaluated with the usual precedence."""

    operands: list[int] = Field(min_length=2, max_length=4)
    operators: list[Operator] = Field(min_length=1, max_length=3)

    @model_validator(mode="after")
    def _consistent(self) -> "Formula":
        if len(self.operators) != len(self.operands) - 1:
            raise ValueError("a formula needs exactly one operator between each pair of operands")
        if any(not 0 <= value <= 999 for value in self.operands):
            raise ValueError("operands must lie in [0, 999]")
        return self

    @property
    def expression(self) -> str:
        """The formula as drawn, e.g. '3+4x2'."""
        parts = [str(self.operands[0])]
        for operator, operand in zip(self.operators, self.operands[1:]):
            parts += [operator, str(operand)]
        return "".join(parts)

    def value(self) -> int:
        """The result, multiplication before addition and subtraction.

        Example:
            >>> Formula(operands=[2, 3, 4], operators=["+", "x"]).value()
            14
        """
        terms = [self.operands[0]]
        signs = [1]
        for operator, operand in zip(self.operators, self.operands[1:]):
            if operator == "x":
                terms[-1] *= operand
            else:
                terms.append(operand)
                signs.append(1 if operator == "+" else -1)
        return sum(sign * term for sign, term in zip(signs, terms))


class Scene(_Frozen):
    """Everything an image shows. Exactly the content of its `kind` is present."""

    seed: int = Field(ge=0, description="Seeds the pixel noise, so rendering is a pure function.")
    kind: SceneKind
    difficulty: int = Field(ge=1, le=5)
    width: int = Field(ge=16, le=_MAX_SIDE)
    height: int = Field(ge=16, le=_MAX_SIDE)
    background: RGB
    noise: float = Field(ge=0.0, le=0.5, description="Std of Gaussian pixel noise, as a share of 255.")
    objects: list[SceneObject] = Field(default_factory=list, max_length=16)
    text: TextBlock | None = None
    chart: Chart | None = None
    formula: Formula | None = None
    clutter: list[Stroke] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _content_matches_kind(self) -> "Scene":
        present = {
            "shapes": bool(self.objects),
            "text": self.text is not None and self.formula is None,
            "chart": self.chart is not None,
            "formula": self.formula is not None and self.text is not None,
        }
        if not present[self.kind] or sum(present.values()) != 1:
            raise ValueError(f"a {self.kind!r} scene must hold that content and nothing else")
        if len({(obj.shape, obj.color) for obj in self.objects}) != len(self.objects):
            raise ValueError("objects must differ in shape or colour")
        return self

    def to_metadata(self) -> dict[str, Any]:
        """JSON-ready metadata (what `UnlabeledItem.metadata` carries)."""
        return self.model_dump(mode="json")


def generate_scene(
    kind: SceneKind,
    difficulty: int,
    seed: int,
    *,
    image_size: int = 64,
    knobs: Knobs | None = None,
    variant: int = 0,
) -> Scene:
    """Draw a scene of `kind` at a difficulty level, deterministically from `seed` and `variant`.

    `knobs` overrides the level's knobs; `variant` draws a different layout with the same seed
    (used to retry when a scene cannot carry the wanted question).

    Example:
        >>> generate_scene("formula", 1, seed=3).formula.operators
        ['+']
    """
    if kind not in SCENE_KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {SCENE_KINDS}")
    if not 16 <= image_size <= _MAX_SIDE:
        raise ValueError(f"image_size must lie in [16, {_MAX_SIDE}], got {image_size}")
    knobs = knobs or knobs_for(difficulty)
    rng = random.Random(f"{seed}/{variant}")
    scale = image_size / 64
    content = _CONTENT_MAKERS[kind](rng, knobs, image_size, scale)
    return Scene(
        seed=seed,
        kind=kind,
        difficulty=difficulty,
        width=image_size,
        height=image_size,
        background=rng.choice(BACKGROUNDS[: 1 + min(difficulty, len(BACKGROUNDS) - 1)]),
        noise=knobs.noise,
        clutter=_clutter(rng, knobs.clutter, image_size, scale),
        **content,
    )


def _shapes(rng: random.Random, knobs: Knobs, side: int, scale: float) -> dict[str, Any]:
    combos = list(itertools.product(SHAPES[: knobs.shape_types], list(COLORS)[: knobs.colors]))
    count = min(rng.randint(knobs.min_objects, knobs.max_objects), len(combos))
    objects: list[SceneObject] = []
    for shape, color in rng.sample(combos, count):
        radius = max(2, round(rng.uniform(5.5, 8.5) * scale))
        spot = _free_spot(rng, radius, side, objects)
        if spot is not None:
            objects.append(SceneObject(shape=shape, color=color, x=spot[0], y=spot[1], size=radius))
    return {"objects": objects}


def _free_spot(
    rng: random.Random, radius: int, side: int, placed: list[SceneObject]
) -> tuple[int, int] | None:
    for _ in range(_PLACEMENT_TRIES):
        x = rng.randint(radius + 1, side - radius - 2)
        y = rng.randint(radius + 1, side - radius - 2)
        if all(math.hypot(x - o.x, y - o.y) >= radius + o.size + 2 for o in placed):
            return x, y
    return None


def _text(rng: random.Random, knobs: Knobs, side: int, scale: float) -> dict[str, Any]:
    word = rng.choice(WORDS[: knobs.vocabulary])
    return {"text": _placed_text(rng, word, knobs.font_size, side, scale)}


def _placed_text(rng: random.Random, text: str, font_size: int, side: int, scale: float) -> TextBlock:
    size = max(4, round((font_size + rng.randint(-1, 1)) * scale))
    width, height = measure_text(text, size)
    while width > side - 2 and size > 4:
        size -= 1
        width, height = measure_text(text, size)
    x = rng.randint(0, max(0, side - width - 1))
    y = rng.randint(0, max(0, side - height - 1))
    return TextBlock(text=text, x=x, y=y, font_size=size, color=rng.choice(INK_COLORS))


def _chart(rng: random.Random, knobs: Knobs, side: int, scale: float) -> dict[str, Any]:
    colors = rng.sample(list(COLORS)[: max(knobs.colors, knobs.bars)], knobs.bars)
    values = rng.sample(range(1, knobs.max_value + 1), knobs.bars)
    bars = [Bar(color=color, value=value) for color, value in zip(colors, values)]
    return {"chart": Chart(bars=bars, max_value=knobs.max_value)}


def _formula(rng: random.Random, knobs: Knobs, side: int, scale: float) -> dict[str, Any]:
    while True:
        operators = [rng.choice(knobs.operators) for _ in range(knobs.operands - 1)]
        operands = [rng.randint(1, knobs.operand_max)]
        for operator in operators:
            operands.append(rng.randint(2, 9) if operator == "x" else rng.randint(1, knobs.operand_max))
        formula = Formula(operands=operands, operators=operators)
        if formula.value() >= 0 or "x" in knobs.operators:
            break
    text = _placed_text(rng, f"{formula.expression}=?", knobs.font_size, side, scale)
    return {"formula": formula, "text": text}


def _clutter(rng: random.Random, count: int, side: int, scale: float) -> list[Stroke]:
    strokes = []
    for _ in range(count):
        x0, y0 = rng.randrange(side), rng.randrange(side)
        length = rng.uniform(6, 14) * scale
        angle = rng.uniform(0, math.pi)
        gray = rng.randint(110, 200)
        strokes.append(
            Stroke(
                x0=x0,
                y0=y0,
                x1=round(x0 + length * math.cos(angle)),
                y1=round(y0 + length * math.sin(angle)),
                color=(gray, gray, gray),
                width=max(1, round(scale)),
            )
        )
    return strokes


_CONTENT_MAKERS = {"shapes": _shapes, "text": _text, "chart": _chart, "formula": _formula}
