"""Probe questions for an unlabeled item: from the scene the probe writer sees in its pixels, or generic ones.

The scene a toolchain reads from the image lets the world's question writer ask verifiable questions
about the capabilities the scene can carry; a probe keeps the capability and the writer's seed so
the same probe can be re-asked about a counterfactual edit of the scene. Images the toolchain sees
nothing in get the configured generic probes. Metadata is untrusted and read only for capability
hints (``metadata["capabilities"]``): one that is not a list of names, or names an unknown
capability, is refused.

Example:
    >>> from dpe.world import generate_scene
    >>> scene = generate_scene("chart", 2, seed=1)
    >>> [probe.capability for probe in scene_probes(scene, "item1", count=3, seed=0)]
    ['chart']
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dpe.events import AnswerKey, AnswerType
from dpe.taxonomy import UnknownCapability
from dpe.world import QuestionNotPossible, Scene, scene_capabilities, write_question
from producers.auditor.settings import GenericProbe


class InvalidMetadata(ValueError):
    """Metadata whose capability hints are not a list of names."""


@dataclass(frozen=True)
class Probe:
    """One question asked of every model about one image. `seed` is set for world-written questions."""

    probe_id: str
    capability: str
    question: str
    answer_type: AnswerType
    options: tuple[str, ...] | None = None
    tolerance: float = 0.0
    seed: int | None = None

    def key_for(self, answer: str) -> AnswerKey:
        """The key that grades answers to this probe against `answer` (a probe carries no answer of its own).

        Example:
            >>> Probe("p", "counting", "How many?", "number", tolerance=0.5).key_for("3")
            AnswerKey(answer='3', answer_type='number', options=None, tolerance=0.5)
        """
        return AnswerKey(answer=answer, answer_type=self.answer_type, options=self.options, tolerance=self.tolerance)


def capability_hints(metadata: Mapping[str, Any], known: Sequence[str]) -> tuple[str, ...] | None:
    """The capabilities the item asks to be probed on (``metadata["capabilities"]``), checked against `known`."""
    hints = metadata.get("capabilities")
    if hints is None:
        return None
    if not isinstance(hints, list) or not all(isinstance(hint, str) for hint in hints):
        raise InvalidMetadata("metadata 'capabilities' must be a list of names")
    unknown = sorted(set(hints) - set(known))
    if unknown:
        raise UnknownCapability(f"unknown capabilities {[name[:50] for name in unknown[:10]]}; known: {list(known)}")
    return tuple(hints)


def probe_seed(item_id: str, capability: str, seed: int) -> int:
    """The question writer's seed for one item and capability (stable across restarts)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{item_id}/{capability}".encode()).digest()[:7], "big")


def world_probe(scene: Scene, capability: str, seed: int, kind: str | None = None) -> Probe | None:
    """The world's question for `capability` about `scene` with `seed` (of `kind` where the scene allows it), or None
    if the scene cannot carry it."""
    try:
        question = write_question(scene, capability, seed, kind)
    except QuestionNotPossible:
        return None
    return Probe(f"{capability}/{seed:x}", capability, question.question, question.answer_type,
                 question.options, question.tolerance, seed)


def scene_probes(
    scene: Scene, item_id: str, *, count: int, seed: int, only: Sequence[str] | None = None
) -> list[Probe]:
    """Up to `count` world probes, one per capability the scene can carry (restricted to `only`)."""
    probes = []
    for capability in scene_capabilities(scene):
        if only is not None and capability not in only:
            continue
        probe = world_probe(scene, capability, probe_seed(item_id, capability, seed))
        if probe is not None:
            probes.append(probe)
    return probes[:count]


def generic_probes(probes: Sequence[GenericProbe], *, count: int, only: Sequence[str] | None = None) -> list[Probe]:
    """Up to `count` configured generic probes (restricted to the capabilities in `only`)."""
    chosen = [
        Probe(f"generic/{position}", probe.capability, probe.question, probe.answer_type, probe.options)
        for position, probe in enumerate(probes)
        if only is None or probe.capability in only
    ]
    return chosen[:count]
