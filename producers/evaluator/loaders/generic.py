"""Generic JSON Lines or Parquet benchmarks with image paths.

Fields: ``question``, ``answer``, ``answer_type`` (choice, number, yes_no or text), ``image`` (a
path relative to the file's folder; in Parquet also the image bytes, or a ``{"bytes": ...}``
struct as Hugging Face datasets write it), and optionally ``id`` (default: the row's position),
``options`` (a list, required for choice; the answer is a letter or an option's text),
``capability`` or ``category``, and ``tolerance`` for numbers.

Example:
    >>> GenericReader("jsonl").source.__name__, GenericReader("parquet").source.__name__
    ('jsonl_rows', 'parquet_rows')
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from producers.evaluator.items import EvalItem
from producers.evaluator.loaders.fields import (
    RowContext,
    answer_type,
    build_item,
    checked_image,
    image_from_path,
    is_missing,
    item_id,
    text_field,
)
from producers.evaluator.loaders.records import jsonl_rows, parquet_rows
from producers.evaluator.loaders.report import RowError


class GenericReader:
    """Reads one generic JSONL or Parquet file; rows without an id are numbered by position."""

    def __init__(self, layout: Literal["jsonl", "parquet"]) -> None:
        self.source = jsonl_rows if layout == "jsonl" else parquet_rows

    def rows(self, path: Path) -> Iterator[dict[str, Any] | RowError]:
        """The records, each with an ``id`` (its 1-based position when it has none)."""
        for position, row in enumerate(self.source(path), start=1):
            yield {**row, "id": position} if isinstance(row, dict) and is_missing(row.get("id")) else row

    @staticmethod
    def _image(value: Any, context: RowContext) -> bytes:
        if isinstance(value, Mapping):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return checked_image(bytes(value), context.limits)
        return image_from_path(context.folder, value, context.limits)

    @staticmethod
    def _options(value: Any) -> list[str] | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(option, (str, int, float)) for option in value):
            raise RowError("malformed_row", "options must be a list of texts")
        return [str(option).strip() for option in value]

    @staticmethod
    def _tolerance(value: Any) -> float:
        if is_missing(value):
            return 0.0
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RowError("malformed_row", f"tolerance {str(value)[:20]!r} is not a number") from None

    def parse(self, row: Mapping[str, Any], context: RowContext) -> EvalItem:
        """One record as an item."""
        category = row.get("capability") if not is_missing(row.get("capability")) else row.get("category")
        return build_item(
            context,
            row_id=item_id(row.get("id")),
            category=None if is_missing(category) else str(category),
            image=self._image(row.get("image"), context),
            question=text_field(row, "question", "missing_question"),
            answer=text_field(row, "answer", "missing_answer"),
            kind=answer_type(row.get("answer_type")),
            options=self._options(row.get("options")),
            tolerance=self._tolerance(row.get("tolerance")),
        )
