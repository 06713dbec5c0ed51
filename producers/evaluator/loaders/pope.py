"""POPE-style yes/no JSON Lines: ``question_id``, ``image`` (a path), ``text`` (the question), ``label``.

Image paths are relative to the benchmark file's folder and may not leave it. POPE asks whether an
object exists in the image, so every row's capability is what ``existence`` maps to (a suite's
category mapping can send it elsewhere).

Example:
    >>> row = {"question_id": 1, "image": "a.png", "text": "Is there a dog?", "label": "no"}
    >>> sorted(row) == sorted(POPE_FIELDS)
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from producers.evaluator.items import EvalItem
from producers.evaluator.loaders.fields import RowContext, build_item, image_from_path, item_id, text_field
from producers.evaluator.loaders.records import jsonl_rows
from producers.evaluator.loaders.report import RowError

POPE_FIELDS: tuple[str, ...] = ("question_id", "image", "text", "label")
POPE_CATEGORY = "existence"


class PopeReader:
    """Reads one POPE JSONL file."""

    def rows(self, path: Path) -> Iterator[dict[str, Any] | RowError]:
        return jsonl_rows(path)

    def parse(self, row: Mapping[str, Any], context: RowContext) -> EvalItem:
        """One line as a yes/no item."""
        return build_item(
            context,
            row_id=item_id(row.get("question_id")),
            category=POPE_CATEGORY,
            image=image_from_path(context.folder, row.get("image"), context.limits),
            question=text_field(row, "text", "missing_question"),
            answer=text_field(row, "label", "missing_answer"),
            kind="yes_no",
        )
