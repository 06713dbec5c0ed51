"""The question writer: from a scene's metadata alone, a verifiable question for a capability.

This is what the programmatic question-writer agent calls. The scene may come from an untrusted
event, so it is validated first; a scene that cannot carry the capability (no objects to count, no
two objects in a clear relation...) raises `QuestionNotPossible`.

Example:
    >>> from dpe.world.scene import generate_scene
    >>> q = write_question(generate_scene("formula", 1, seed=3).to_metadata(), "arithmetic", seed=0)
    >>> q.answer_type, q.answer.isdigit()
    ('number', True)
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from dpe.events import AnswerType
from dpe.world.knobs import knobs_for
from dpe.world.palette import COLORS, SHAPES
from dpe.world.scene import Scene, SceneKind, SceneObject

Capability = Literal["counting", "color", "spatial", "existence", "text_reading", "chart", "arithmetic"]
CAPABILITIES: tuple[str, ...] = get_args(Capability)

SCENE_KIND_OF: dict[str, SceneKind] = {
    "counting": "shapes",
    "color": "shapes",
    "spatial": "shapes",
    "existence": "shapes",
    "text_reading": "text",
    "chart": "chart",
    "arithmetic": "formula",
}
"""The kind of scene each capability asks about."""

_RELATIONS = ("to the left", "to the right", "above", "below")

QUESTION_KINDS: dict[str, tuple[str, ...]] = {
    "counting": ("all", "shape", "color"),
    "existence": ("present", "absent"),
    "chart": ("value", "tallest", "shortest", "difference"),
}
"""The kinds of question a capability's writer can ask (a planner may ask for one); other capabilities have one kind."""


class QuestionNotPossible(ValueError):
    """The scene cannot carry a question of the wanted capability."""


@dataclass(frozen=True)
class Question:
    """A question with its verifiable answer. For `choice`, the answer is the option's letter."""

    question: str
    answer: str
    answer_type: AnswerType
    options: tuple[str, ...] | None = None
    tolerance: float = 0.0


def write_question(scene: Scene | Mapping[str, Any], capability: str, seed: int, kind: str | None = None) -> Question:
    """Write a question about `scene` that tests `capability`, deterministically from `seed`.

    `kind` (one of `QUESTION_KINDS[capability]`) asks for that kind of question where the scene allows it;
    without it (or where the scene does not allow it) the kind is drawn from `seed`, as the diagnostic suites do.
    Raises `QuestionNotPossible` when the scene cannot carry it, and `ValueError` (pydantic's
    `ValidationError`) when the metadata is not a valid scene.

    Example:
        >>> from dpe.world.scene import generate_scene
        >>> chart = generate_scene("chart", 3, seed=1)
        >>> write_question(chart, "chart", seed=0, kind="value").question.startswith("What is the value")
        True
    """
    if capability not in _WRITERS:
        raise ValueError(f"unknown capability {capability!r}; expected one of {CAPABILITIES}")
    scene = scene if isinstance(scene, Scene) else Scene.model_validate(scene)
    if scene.kind != SCENE_KIND_OF[capability]:
        raise QuestionNotPossible(f"{capability} needs a {SCENE_KIND_OF[capability]} scene, got {scene.kind}")
    return _WRITERS[capability](scene, random.Random(seed), kind)


def question_kind(capability: str, question: str, answer: str) -> str | None:
    """Which of `QUESTION_KINDS[capability]` a question written by this world is (None: another kind of
    question, or a capability with one kind), read from its text and answer.

    Example:
        >>> question_kind("counting", "How many red shapes are in the image?", "2")
        'color'
        >>> question_kind("existence", "Is there a blue circle in the image?", "no")
        'absent'
        >>> question_kind("chart", "Which bar is the tallest?", "B"), question_kind("color", "What colour?", "A")
        ('tallest', None)
    """
    text = question.strip().lower()
    if capability == "counting" and text.startswith("how many"):
        if text == "how many shapes are in the image?":
            return "all"
        return "color" if text.endswith(" shapes are in the image?") else "shape"
    if capability == "existence" and answer.strip().lower() in ("yes", "no"):
        return "present" if answer.strip().lower() == "yes" else "absent"
    if capability == "chart":
        for start, kind in (("what is the value", "value"), ("how much taller", "difference"),
                            ("which bar is the tallest", "tallest"), ("which bar is the shortest", "shortest")):
            if text.startswith(start):
                return kind
    return None


def scene_capabilities(scene: Scene | Mapping[str, Any]) -> tuple[str, ...]:
    """The capabilities a question can be written for about this scene.

    Example:
        >>> from dpe.world.scene import generate_scene
        >>> scene_capabilities(generate_scene("text", 1, seed=0))
        ('text_reading',)
    """
    scene = scene if isinstance(scene, Scene) else Scene.model_validate(scene)
    possible = []
    for capability in CAPABILITIES:
        try:
            write_question(scene, capability, seed=0)
        except QuestionNotPossible:
            continue
        possible.append(capability)
    return tuple(possible)


def _choice(rng: random.Random, correct: str, distractors: list[str], question: str) -> Question:
    options = [correct, *distractors]
    rng.shuffle(options)
    letter = string.ascii_uppercase[options.index(correct)]
    return Question(question, letter, "choice", tuple(options))


def _plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith("s") else f"{shape}s"


def _counting(scene: Scene, rng: random.Random, kind: str | None) -> Question:
    if not scene.objects:
        raise QuestionNotPossible("no objects to count")
    if kind in QUESTION_KINDS["counting"]:
        target = kind
    else:
        target = "all" if scene.difficulty == 1 else rng.choice(QUESTION_KINDS["counting"])
    if target == "shape":
        shape = rng.choice(sorted({obj.shape for obj in scene.objects}))
        count = sum(obj.shape == shape for obj in scene.objects)
        text = f"How many {_plural(shape)} are in the image?"
    elif target == "color":
        color = rng.choice(sorted({obj.color for obj in scene.objects}))
        count = sum(obj.color == color for obj in scene.objects)
        text = f"How many {color} shapes are in the image?"
    else:
        count = len(scene.objects)
        text = "How many shapes are in the image?"
    return Question(text, str(count), "number")


def _color(scene: Scene, rng: random.Random, kind: str | None) -> Question:
    shape_counts = Counter(obj.shape for obj in scene.objects)
    unique = [obj for obj in scene.objects if shape_counts[obj.shape] == 1]
    if not unique:
        raise QuestionNotPossible("no object is the only one of its shape")
    obj = rng.choice(unique)
    others = [color for color in COLORS if color != obj.color]
    distractors = rng.sample(others, knobs_for(scene.difficulty).choice_options - 1)
    return _choice(rng, obj.color, distractors, f"What colour is the {obj.shape}?")


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    dx, dy = a.x - b.x, a.y - b.y
    major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if major < a.size + b.size or minor > major / 2:
        return None
    if abs(dx) > abs(dy):
        return _RELATIONS[0] if dx < 0 else _RELATIONS[1]
    return _RELATIONS[2] if dy < 0 else _RELATIONS[3]


def _spatial(scene: Scene, rng: random.Random, kind: str | None) -> Question:
    pairs = [
        (a, b, relation)
        for a in scene.objects
        for b in scene.objects
        if a is not b and (relation := _relation(a, b)) is not None
    ]
    if not pairs:
        raise QuestionNotPossible("no two objects stand in a clear left/right/above/below relation")
    a, b, relation = rng.choice(pairs)
    distractors = [other for other in _RELATIONS if other != relation]
    return _choice(rng, relation, distractors, f"Where is the {a.name} relative to the {b.name}?")


def _ask_absent(absent: list, rng: random.Random, kind: str | None) -> bool:
    """Whether to ask about something absent: as `kind` says, else a coin flip (only when something is absent)."""
    return bool(absent) and (rng.random() < 0.5 if kind not in QUESTION_KINDS["existence"] else kind == "absent")


def _existence(scene: Scene, rng: random.Random, kind: str | None) -> Question:
    if not scene.objects:
        raise QuestionNotPossible("no objects in the scene")
    if scene.difficulty == 1:
        return _color_existence(scene, rng, kind)
    knobs = knobs_for(scene.difficulty)
    present = {(obj.shape, obj.color) for obj in scene.objects}
    absent = [
        (shape, color)
        for shape in SHAPES[: knobs.shape_types]
        for color in list(COLORS)[: knobs.colors]
        if (shape, color) not in present
    ]
    if scene.difficulty >= 3:
        near_misses = [(s, c) for s, c in absent if any(s == ps or c == pc for ps, pc in present)]
        absent = near_misses or absent
    if _ask_absent(absent, rng, kind):
        shape, color = rng.choice(absent)
        answer = "no"
    else:
        obj = rng.choice(scene.objects)
        shape, color, answer = obj.shape, obj.color, "yes"
    return Question(f"Is there a {color} {shape} in the image?", answer, "yes_no")


def _color_existence(scene: Scene, rng: random.Random, kind: str | None) -> Question:
    present = {obj.color for obj in scene.objects}
    absent = [color for color in list(COLORS)[: knobs_for(scene.difficulty).colors] if color not in present]
    if _ask_absent(absent, rng, kind):
        color, answer = rng.choice(absent), "no"
    else:
        color, answer = rng.choice(sorted(present)), "yes"
    return Question(f"Is there a {color} shape in the image?", answer, "yes_no")


def _text_reading(scene: Scene, rng: random.Random, kind: str | None) -> Question:
    assert scene.text is not None
    return Question("What word is written in the image?", scene.text.text, "text")


def _chart(scene: Scene, rng: random.Random, kind: str | None) -> Question:
    assert scene.chart is not None
    bars = scene.chart.bars
    kinds = ["value", "tallest", "shortest"] + (["difference"] if scene.difficulty >= 3 and len(bars) > 1 else [])
    kind = kind if kind in kinds else rng.choice(kinds)
    if kind == "value":
        bar = rng.choice(bars)
        return Question(f"What is the value of the {bar.color} bar?", str(bar.value), "number")
    if kind == "difference":
        first, second = sorted(rng.sample(bars, 2), key=lambda bar: -bar.value)
        return Question(
            f"How much taller is the {first.color} bar than the {second.color} bar?",
            str(first.value - second.value),
            "number",
        )
    pick = max if kind == "tallest" else min
    target = pick(bars, key=lambda bar: bar.value)
    if sum(bar.value == target.value for bar in bars) > 1:
        raise QuestionNotPossible(f"the {kind} bar is not unique")
    wanted = knobs_for(scene.difficulty).choice_options - 1
    distractors = [bar.color for bar in bars if bar is not target][:wanted]
    spare = [color for color in COLORS if color not in {bar.color for bar in bars}]
    distractors += rng.sample(spare, max(0, 2 - len(distractors)))
    return _choice(rng, target.color, distractors, f"Which bar is the {kind}?")


def _arithmetic(scene: Scene, rng: random.Random, kind: str | None) -> Question:
    assert scene.formula is not None
    return Question("What is the result of the expression in the image?", str(scene.formula.value()), "number")


_WRITERS: dict[str, Callable[[Scene, random.Random, str | None], Question]] = {
    "counting": _counting,
    "color": _color,
    "spatial": _spatial,
    "existence": _existence,
    "text_reading": _text_reading,
    "chart": _chart,
    "arithmetic": _arithmetic,
}
