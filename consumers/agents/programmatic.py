"""The benchmarks' fast path: agents that read the synthetic world's answer key, the scene in an item's metadata.

**Not the default, and not honest outside benchmarks**: the default crew sees pixels only
(`consumers.agents.pixels`), and ingest publishes the answer key only with `ingest.answer_key`.
These roles stay as a fast, exact reference for benchmarks and tests of the bus machinery.

- `ProgrammaticPlanner`: the capabilities a scene supports, and with probability `edit_rate` one
  edit that provably keeps the answer (`SAFE_EDITS`: right-angle rotations and mirrors for shape
  questions that do not ask about positions, zoom-out, grayscale for text, composition with a
  related image), drawn from a seed of (item, capability, attempt) so that a redo is identical.
- `ProgrammaticWriter`: `dpe.world.write_question` on the scene, with a prefix that points at the
  original image's half after a composition.
- `ProgrammaticValidator`: rule checks of answerability: every object and text stays inside the
  image and large enough to see after the edits, and no edit changes what the question asks
  about (colours after recolouring, positions after mirroring or rotating, hidden content).
- `ProgrammaticAnswerer`: the world's independent template reader (`dpe.world.answers`) on the scene
  (no use of the writer's answer or code).

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
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from PIL import Image

from consumers.agents.settings import WORLD_QUESTIONS
from consumers.roles import AgentFailure, AnswererQuestion, Draft, ItemContext, TaskPlan, Verdict
from dpe.events import CapabilityDiagnosis
from dpe.imaging import Compose, Crop, EditOp, Flip, Occlude, OverlayText, Recolor, Rotate, Zoom, placement
from dpe.world import (
    CAPABILITIES,
    QUESTION_KINDS,
    QuestionNotPossible,
    Scene,
    question_kind,
    scene_capabilities,
    write_question,
)
from dpe.world.answers import NotAnswerable, answer_question
from dpe.world.palette import COLORS

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

KIND_PRIOR = 0.5
"""Pseudo-count of every question kind when a diagnosis names failed kinds: the plan aims at the failures and
still asks every kind now and then."""

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


def safe_edit(kind: str, rng: random.Random) -> EditOp:
    """One edit of `kind` (a `SAFE_EDITS` name) with parameters drawn from `rng`."""
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


def aimed_kind(item_id: str, capability: str, attempt: int, diagnosis: CapabilityDiagnosis | None) -> str:
    """The kind of question to ask (`dpe.world.QUESTION_KINDS`), drawn in proportion to the diagnosis's failed
    items of each kind plus `KIND_PRIOR`; empty (the writer's own draw) when the diagnosis names no failed kind.

    Example:
        >>> from dpe.events import CapabilityDiagnosis, FailedItem
        >>> failed = FailedItem(item_id="d1", suite="synthetic", question="How many red shapes are in the image?",
        ...                     expected="2", given="3")
        >>> brief = CapabilityDiagnosis(graded=9, wrong=4, error_mix={"other": 1.0}, failures=[failed] * 4, analysis="")
        >>> kinds = Counter(aimed_kind(f"item{n}", "counting", 0, brief) for n in range(300))
        >>> kinds.most_common(1)[0][0], aimed_kind("item0", "counting", 0, None)
        ('color', '')
    """
    failures = diagnosis.failures if diagnosis is not None else []
    failed = Counter(kind for failure in failures
                     if (kind := question_kind(capability, failure.question, failure.expected)) is not None)
    if not failed:
        return ""
    kinds = QUESTION_KINDS[capability]
    rng = random.Random(seed_of(item_id, capability, attempt, "kind"))
    return rng.choices(kinds, weights=[failed[kind] + KIND_PRIOR for kind in kinds])[0]


def served(questions: Mapping[str, Sequence[str]], seen: Collection[str]) -> frozenset[str]:
    """The capabilities an image serves: those with a world question type (`AgentSettings.questions`) it supports.

    Example:
        >>> sorted(served({"geometric": ("counting", "color"), "chart_graph": ("chart",)}, ["color", "spatial"]))
        ['geometric']
    """
    return frozenset(capability for capability, types in questions.items() if set(types) & set(seen))


def world_capability(item_id: str, capability: str, attempt: int, questions: Mapping[str, Sequence[str]],
                     seen: Collection[str]) -> str:
    """The world's capability whose question is written for `capability`: one of ``questions[capability]`` that
    the image supports (`seen`), drawn from a seed of (item, capability, attempt); `not_applicable` when none is.

    Example:
        >>> world_capability("i", "geometric", 0, {"geometric": ("counting", "color")}, ["color"])
        'color'
    """
    types = [kind for kind in questions.get(capability, ()) if kind in seen]
    if not types:
        raise AgentFailure("not_applicable", f"the image shows nothing the world's questions for {capability} ask of")
    return types[0] if len(types) == 1 else random.Random(seed_of(item_id, capability, attempt, "type")).choice(types)


def written_capability(plan: TaskPlan, capability: str) -> str:
    """The world's capability a writer writes for: the plan's focus where a pixel or fast-path planner chose one,
    else `capability` itself; `not_applicable` when that is none of the world's."""
    asked = plan.focus if plan.focus in CAPABILITIES else capability
    if asked not in CAPABILITIES:
        raise AgentFailure("not_applicable", f"no question of the synthetic world is planned for {capability}")
    return asked


def edit_plan(item_id: str, capability: str, attempt: int, edit_rate: float, menu: dict[str, tuple[str, ...]],
              diagnosis: CapabilityDiagnosis | None = None) -> TaskPlan:
    """The plan for one attempt: the capability, the kind of question the diagnosis points at (`aimed_kind`),
    and with chance `edit_rate` one edit from `menu[capability]`, drawn from a seed of the item, capability and
    attempt (a retry after a crash plans the same)."""
    rng = random.Random(seed_of(item_id, capability, attempt, "plan"))
    edits: list[EditOp] = []
    if rng.random() < edit_rate and menu.get(capability):
        edits.append(safe_edit(rng.choice(menu[capability]), rng))
    return TaskPlan(focus=capability, kind=aimed_kind(item_id, capability, attempt, diagnosis), edits=edits)


class ProgrammaticPlanner:
    """Plans from scene metadata; edits a share `edit_rate` of the images with a `SAFE_EDITS` edit."""

    backend = "programmatic"

    def __init__(self, edit_rate: float = 0.25, questions: Mapping[str, Sequence[str]] = WORLD_QUESTIONS):
        self.edit_rate = edit_rate
        self.questions = questions

    def capabilities(self, ctx: ItemContext) -> frozenset[str]:
        return served(self.questions, scene_capabilities(ctx.scene)) if ctx.scene is not None else frozenset()

    async def plan(self, ctx: ItemContext, capability: str, attempt: int) -> TaskPlan:
        asked = world_capability(ctx.item.item_id, capability, attempt, self.questions, scene_capabilities(_scene(ctx)))
        return edit_plan(ctx.item.item_id, asked, attempt, self.edit_rate, SAFE_EDITS, ctx.diagnoses.get(capability))


class ProgrammaticWriter:
    """Writes the world's question for the capability, pointing at the original half after a composition."""

    backend = "programmatic"

    async def write(self, ctx: ItemContext, capability: str, plan: TaskPlan, image: Image.Image, attempt: int) -> Draft:
        scene = _scene(ctx)
        try:
            seed = seed_of(ctx.item.item_id, capability, attempt, "write")
            question = write_question(scene, written_capability(plan, capability), seed=seed, kind=plan.kind or None)
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
            problem = edit_problem(op, words)
            if problem:
                return Verdict(answerable=False, reason=problem)
        scale = 1.0
        for op in plan.edits:
            if isinstance(op, Zoom):
                scale *= op.factor
        return visibility(ctx.scene, scale)


def edit_problem(op: EditOp, words: set[str]) -> str | None:
    """Why `op` may change the answer to a question with these `words`, or None when it keeps it."""
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


def visibility(scene: Scene, scale: float) -> Verdict:
    """Whether every object and text of `scene` stays inside the image and large enough to see at `scale`."""
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
        try:
            return answer_question(scene, text, options)
        except NotAnswerable as exc:
            raise AgentFailure("not_applicable", str(exc)) from None
