"""Test fixture, not a part of dpe-stream: the synthetic world's oracle, which reads the answer key.

Tests of the auditor's mechanics need a reference that is right by construction and probes written from the true
scene; no configured reference can be this (the auditor's references read pixels or ask models). `AnswerKeyAuditor`
writes its probes from the scene in an item's metadata (what ingest keeps only with ``ingest.answer_key``), and
`OracleAnswerer` answers them from that scene with the world's question writer.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from pydantic import ValidationError

from dpe.events import UnlabeledItem
from dpe.world import QuestionNotPossible, Scene, write_question
from producers.auditor.backends import View
from producers.auditor.probes import InvalidMetadata, Probe
from producers.auditor.service import Auditor


class OracleAnswerer:
    """Answers from the view's true scene with the world's question writer; abstains where it would not have written
    the question, or the view has no scene (an image without metadata)."""

    def __init__(self, name: str = "oracle") -> None:
        self.name = name

    @staticmethod
    def _answer(view: View, probe: Probe) -> str | None:
        if view.scene is None or probe.seed is None:
            return None
        try:
            question = write_question(view.scene, probe.capability, probe.seed)
        except QuestionNotPossible:
            return None
        same = question.question == probe.question and question.options == probe.options
        return question.answer if same else None

    def answer(self, asked: Sequence[tuple[View, Probe]]) -> list[str | None]:
        return [self._answer(view, probe) for view, probe in asked]


class AnswerKeyAuditor(Auditor):
    """An auditor whose probes are written from the answer key in the items' metadata (so the oracle can answer them);
    metadata with a ``kind`` that is no valid scene raises `InvalidMetadata`."""

    def scene(self, item: UnlabeledItem, image: Image.Image) -> Scene | None:
        if "kind" not in item.metadata:
            return None
        try:
            return Scene.model_validate(item.metadata)
        except ValidationError as error:
            raise InvalidMetadata(f"metadata has a 'kind' but is not a valid scene: {error.error_count()} error(s)"
                                  ) from None
