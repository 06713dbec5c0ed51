"""How right the pixel stand-ins are: accepted samples graded against the synthetic world's hidden truth.

The agents see pixels only (ingest publishes no answer key); this grader, and only it, reads the
truth: each accepted sample's source item is a synthetic scene (`scene_of_source`, from the item's
``synthetic:<seed>/<index>`` source), the sample's edits are applied to that scene
(`edited_truth`: right-angle turns and mirrors move the objects, zoom-out and grayscale move no
answer), and the world's template reader answers the sample's question about the edited truth.

`python -m benchmarks.agents --teacher` runs it; `teacher_report` is what it prints and returns.

Example:
    >>> from dpe.world import generate_scene
    >>> scene = generate_scene("shapes", 2, seed=3)
    >>> turned = edited_truth(scene, [Rotate(degrees=90, expand=True)])
    >>> [(o.x, o.y) for o in turned.objects][0] == (scene.objects[0].y, scene.width - scene.objects[0].x)
    True
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dpe.events import AcceptedSample, AnswerKey, RejectedSample, UnlabeledItem
from dpe.grading import grade
from dpe.imaging import EditOp, Flip, Rotate, parse_edits
from dpe.world import Scene, scene_of_source
from dpe.world.answers import NotAnswerable, answer_question


def edited_truth(scene: Scene, edits: Sequence[EditOp]) -> Scene:
    """The true scene after `edits`: objects moved by right-angle turns (counter-clockwise, as Pillow turns) and
    mirrors; other edits (zoom-out, grayscale) change no answer the world asks about, so they leave it."""
    for op in edits:
        if isinstance(op, Rotate):
            for _ in range(int(op.degrees // 90) % 4):
                scene = _moved(scene, lambda x, y, w, h: (y, w - x), swap=True)
        elif isinstance(op, Flip):
            horizontal = op.axis == "horizontal"
            scene = _moved(scene, lambda x, y, w, h: (w - x, y) if horizontal else (x, h - y), swap=False)
    return scene


def _moved(scene: Scene, move, swap: bool) -> Scene:
    objects = [obj.model_copy(update=dict(zip(("x", "y"), move(obj.x, obj.y, scene.width, scene.height))))
               for obj in scene.objects]
    size = {"width": scene.height, "height": scene.width} if swap else {}
    return scene.model_copy(update={"objects": objects, **size})


def sample_edits(sample: AcceptedSample) -> list[EditOp]:
    """The edits the crew's editor made for this sample (from its `AgentStep`), in order."""
    for step in sample.agents:
        if step.role == "editor" and step.detail:
            return parse_edits(json.loads(step.detail))
    return []


@dataclass(frozen=True)
class Graded:
    """One accepted sample against the truth: its capability, the source scene's level, and whether it is right."""

    capability: str
    level: int
    right: bool


def grade_samples(samples: Iterable[AcceptedSample], items: Iterable[UnlabeledItem]) -> list[Graded]:
    """Every accepted sample from a synthetic item, graded against the edited true scene."""
    sources = {item.item_id: item.source for item in items}
    graded = []
    for sample in samples:
        truth = scene_of_source(sources.get(sample.source_item_id, ""))
        if truth is None:
            continue
        body = sample.body
        try:
            expected = answer_question(edited_truth(truth, sample_edits(sample)), body.question, body.options)
        except NotAnswerable:
            graded.append(Graded(sample.capability, truth.difficulty, False))
            continue
        key = AnswerKey(answer=expected, answer_type=body.answer_type, options=body.options, tolerance=body.tolerance)
        graded.append(Graded(sample.capability, truth.difficulty, grade(body.answer, key).correct))
    return graded


def teacher_report(graded: Sequence[Graded], rejected: Sequence[RejectedSample]) -> dict:
    """Accuracy overall, by capability and by capability and level; rejection reasons by share."""
    by_capability: dict[str, list[bool]] = collections.defaultdict(list)
    by_level: dict[str, list[bool]] = collections.defaultdict(list)
    for sample in graded:
        by_capability[sample.capability].append(sample.right)
        by_level[f"{sample.capability}/{sample.level}"].append(sample.right)
    reasons = collections.Counter(sample.reason_code for sample in rejected)
    total = sum(reasons.values()) or 1
    return {
        "teacher_answer_accuracy": _share([sample.right for sample in graded]),
        "teacher_accuracy_by_capability": {name: _share(rights) for name, rights in sorted(by_capability.items())},
        "teacher_accepted_by_capability": {name: len(rights) for name, rights in sorted(by_capability.items())},
        "teacher_accuracy_by_level": {name: _share(rights) for name, rights in sorted(by_level.items())},
        "teacher_rejections": {reason: round(n / total, 4) for reason, n in reasons.most_common()},
    }


def _share(values: Sequence[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
