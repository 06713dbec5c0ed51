"""Programmatic agents for the synthetic world: they read the scene in an item's metadata, no model needed.

- `ProgrammaticPlanner`: the capabilities a scene supports, and with probability `edit_rate` one
  edit that provably keeps the answer (`SAFE_EDITS`: right-angle rotations and mirrors for shape
  questions that do not ask about positions, zoom-out, grayscale for text, composition with a
  related image), drawn from a seed of (item, capability, attempt) so that a redo is identical.
- `ProgrammaticWriter`: `dpe.world.write_question` on the scene, with a prefix that points at the
  original image's half after a composition.
- `ProgrammaticValidator`: rule checks of answerability: every object and text stays inside the
  image and large enough to see after the edits, and no edit changes what the question asks
  about (colours after recolouring, positions after mirroring or rotating, hidden content).
- `ProgrammaticAnswerer`: an independent reader of the world's question templates that computes
  the answer from the scene on its own (no use of the writer's answer or code).

Example:
    >>> from PIL import Image
    >>> from dpe.world import generate_scene
    >>> scene = generate_scene("formula", 1, seed=3)
    >>> answerer = ProgrammaticAnswerer()
    >>> answerer.solve(scene, "What is the result of the expression in the image?", None) == str(scene.formula.value())
    True
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable, Sequence

from PIL import Image

from consumers.roles import AgentFailure, AnswererQuestion, Draft, ItemContext, TaskPlan, Verdict
from dpe.imaging import Compose, Crop, EditOp, Flip, Occlude, OverlayText, Recolor, Rotate, Zoom, placement
from dpe.world import QuestionNotPossible, Scene, scene_capabilities, write_question
from dpe.world.palette import COLORS, SHAPES

SAFE_EDITS: dict[str, tuple[str, ...]] = {
    "counting": ("rotate", "flip", "zoom_out", "compose"),
    "color": ("rotate", "flip", "zoom_out", "compose"),
    "existence": ("rotate", "flip", "zoom_out", "compose"),
    "spatial": ("zoom_out", "compose"),
    "text_reading": ("zoom_out", "compose", "grayscale"),
    "chart": ("zoom_out", "compose"),
    "arithmetic": ("zoom_out", "compose", "grayscale"),
}
"""Edits that keep each capability's answer true, by capability."""

REGION_PREFIX: dict[str, str] = {side: f"Look only at the {side} half of the image. "
                                 for side in ("left", "right", "top", "bottom")}
"""How a question points at the original image after it was composed with another one."""

MIN_FEATURE_PX = 4
"""The smallest object radius or font size, in pixels after edits, that still counts as visible."""

_RELATION_WORDS = ("left", "right", "above", "below")


def seed_of(*parts: object) -> int:
    """A stable 64-bit seed from the parts (same parts, same seed, in every process).

    Example:
        >>> seed_of("item", "counting", 0) == seed_of("item", "counting", 0)
        True
    """
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def _scene(ctx: ItemContext) -> Scene:
    if ctx.scene is None:
        raise AgentFailure("not_applicable", "the item has no synthetic-world scene in its metadata")
    return ctx.scene


def _safe_edit(kind: str, rng: random.Random) -> EditOp:
    if kind == "rotate":
        return Rotate(degrees=rng.choice((90, 180, 270)), expand=True)
    if kind == "flip":
        return Flip(axis=rng.choice(("horizontal", "vertical")))
    if kind == "zoom_out":
        return Zoom(factor=round(rng.uniform(0.6, 0.9), 2), center_x=round(rng.uniform(0.2, 0.8), 2),
                    center_y=round(rng.uniform(0.2, 0.8), 2))
    if kind == "grayscale":
        return Recolor(mode="grayscale")
    return Compose(other=0, place=rng.choice(tuple(REGION_PREFIX)))


class ProgrammaticPlanner:
    """Plans from scene metadata; edits a share `edit_rate` of the images with a `SAFE_EDITS` edit."""

    backend = "programmatic"

    def __init__(self, edit_rate: float = 0.25):
        self.edit_rate = edit_rate

    def capabilities(self, ctx: ItemContext) -> frozenset[str]:
        return frozenset(scene_capabilities(ctx.scene)) if ctx.scene is not None else frozenset()

    async def plan(self, ctx: ItemContext, capability: str, attempt: int) -> TaskPlan:
        _scene(ctx)
        rng = random.Random(seed_of(ctx.item.item_id, capability, attempt, "plan"))
        edits: list[EditOp] = []
        if rng.random() < self.edit_rate and SAFE_EDITS.get(capability):
            edits.append(_safe_edit(rng.choice(SAFE_EDITS[capability]), rng))
        return TaskPlan(focus=capability, edits=edits)


class ProgrammaticWriter:
    """Writes the world's question for the capability, pointing at the original half after a composition."""

    backend = "programmatic"

    async def write(self, ctx: ItemContext, capability: str, plan: TaskPlan, image: Image.Image, attempt: int) -> Draft:
        scene = _scene(ctx)
        try:
            question = write_question(scene, capability, seed=seed_of(ctx.item.item_id, capability, attempt, "write"))
        except QuestionNotPossible as exc:
            raise AgentFailure("not_applicable", str(exc)) from None
        side = placement(plan.edits)
        if side == "mixed":
            raise AgentFailure("not_applicable", "more than one composition")
        return Draft(
            question=REGION_PREFIX.get(side or "", "") + question.question,
            answer=question.answer,
            answer_type=question.answer_type,
            options=list(question.options) if question.options else None,
            tolerance=question.tolerance,
        )


class ProgrammaticValidator:
    """Rule checks of answerability from the scene and the edits (see the module docstring)."""

    backend = "programmatic"

    async def validate(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, draft: Draft) -> Verdict:
        if ctx.scene is None:
            return Verdict(answerable=False, reason="no scene metadata to check against")
        words = set(re.findall(r"[a-z]+", " ".join([draft.question, *(draft.options or [])]).lower()))
        for op in plan.edits:
            problem = _edit_problem(op, words)
            if problem:
                return Verdict(answerable=False, reason=problem)
        scale = 1.0
        for op in plan.edits:
            if isinstance(op, Zoom):
                scale *= op.factor
        return _visibility(ctx.scene, scale)


def _edit_problem(op: EditOp, words: set[str]) -> str | None:
    if isinstance(op, (Crop, Occlude)) or (isinstance(op, Zoom) and op.factor > 1):
        return f"the {op.op} edit may hide content"
    if isinstance(op, OverlayText):
        return "overlaid text adds content the question may be about"
    if isinstance(op, Rotate) and op.degrees % 90 and not op.expand:
        return "a rotation that is not a right angle cuts the corners off"
    moves = isinstance(op, Flip) or (isinstance(op, Rotate) and op.degrees % 360 != 0)
    if moves and words & set(_RELATION_WORDS):
        return f"the {op.op} edit changes the positions the question asks about"
    if isinstance(op, Recolor) and op.mode != "grayscale" and words & set(COLORS):
        return "recolouring changes the colours the question asks about"
    if isinstance(op, Recolor) and op.mode == "grayscale" and words & set(COLORS):
        return "grayscale removes the colours the question asks about"
    return None


def _visibility(scene: Scene, scale: float) -> Verdict:
    for obj in scene.objects:
        if not (0 <= obj.x - obj.size and obj.x + obj.size <= scene.width and 0 <= obj.y - obj.size
                and obj.y + obj.size <= scene.height):
            return Verdict(answerable=False, reason=f"the {obj.name} is partly outside the image")
        if obj.size * scale < MIN_FEATURE_PX:
            return Verdict(answerable=False, reason=f"the {obj.name} is too small to see ({obj.size * scale:.1f}px)")
    if scene.text is not None:
        if scene.text.x < 0 or scene.text.y < 0 or scene.text.x >= scene.width or scene.text.y >= scene.height:
            return Verdict(answerable=False, reason="the text starts outside the image")
        if scene.text.font_size * scale < MIN_FEATURE_PX * 2:
            size = scene.text.font_size * scale
            return Verdict(answerable=False, reason=f"the text is too small to read ({size:.1f}px)")
    return Verdict(answerable=True, reason=f"all content inside the image at scale {scale:.2f}")


class ProgrammaticAnswerer:
    """Answers the world's question templates from the scene, with its own parsing and arithmetic."""

    backend = "programmatic"

    async def answer(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, question: AnswererQuestion) -> str:
        return self.solve(_scene(ctx), question.question, question.options)

    def solve(self, scene: Scene, question: str, options: Sequence[str] | None) -> str:
        """The answer to `question` about `scene` (an option letter for multiple choice)."""
        text = question
        for prefix in REGION_PREFIX.values():
            text = text.removeprefix(prefix)
        for pattern, solver in _TEMPLATES:
            match = pattern.fullmatch(text)
            if match:
                value = solver(scene, *match.groups())
                return _as_option(value, options)
        raise AgentFailure("not_applicable", "the question is not one of the templates this answerer reads")


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
        raise AgentFailure("not_applicable", f"unknown colour or shape in {color!r} {shape!r}")


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
        raise AgentFailure("not_applicable", f"no single {color} {shape} in the scene")
    return found[0]


def _count(scene: Scene, word: str) -> str:
    if word in _PLURALS:
        return str(sum(obj.shape == _PLURALS[word] for obj in scene.objects))
    raise AgentFailure("not_applicable", f"unknown shape {word!r}")


def _colour_of(scene: Scene, shape: str) -> str:
    _known(shape=shape)
    found = [obj for obj in scene.objects if obj.shape == shape]
    if len(found) != 1:
        raise AgentFailure("not_applicable", f"not exactly one {shape}")
    return found[0].color


def _where(scene: Scene, color_a: str, shape_a: str, color_b: str, shape_b: str) -> str:
    a, b = _find(scene, color_a, shape_a), _find(scene, color_b, shape_b)
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy):
        return "to the left" if dx < 0 else "to the right"
    return "above" if dy < 0 else "below"


def _bar(scene: Scene, color: str) -> int:
    if scene.chart is None:
        raise AgentFailure("not_applicable", "no chart")
    for bar in scene.chart.bars:
        if bar.color == color:
            return bar.value
    raise AgentFailure("not_applicable", f"no {color} bar")


def _extreme(scene: Scene, which: str) -> str:
    if scene.chart is None:
        raise AgentFailure("not_applicable", "no chart")
    values = [bar.value for bar in scene.chart.bars]
    target = max(values) if which == "tallest" else min(values)
    return next(bar.color for bar in scene.chart.bars if bar.value == target)


def _evaluate(scene: Scene) -> str:
    if scene.formula is None:
        raise AgentFailure("not_applicable", "no formula")
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
        raise AgentFailure("not_applicable", "no text")
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
