"""VLMEvalKit-style TSV (MMStar, MMBench, ...): base64 images and lettered options.

Columns: ``index``, ``question``, option columns ``A``, ``B``, ``C``, ``D`` (more letters allowed;
empty or ``nan`` cells mean the row has fewer options), ``answer`` (a letter), ``category``,
``image`` (base64), and optionally ``hint`` (prepended to the question, as MMBench uses it). As in
MMBench files, an ``image`` cell holding another row's index instead of base64 reuses that row's
image. Present options are renumbered A, B, C... in order, and the answer letter with them.

Example:
    >>> reader = VLMEvalReader()
    >>> reader.options({"A": "cat", "B": "nan", "C": "dog"})
    (['A', 'C'], ['cat', 'dog'])
"""

from __future__ import annotations

import csv
import re
import string
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dpe.events import ID_PATTERN
from producers.evaluator.items import EvalItem
from producers.evaluator.loaders.fields import (
    RowContext,
    build_item,
    image_from_base64,
    is_missing,
    item_id,
    text_field,
)
from producers.evaluator.loaders.report import BenchmarkError, RowError

_REQUIRED = ("index", "question", "image")
_ID = re.compile(ID_PATTERN)
_MAX_REFERENCE_CHARS = 64


class VLMEvalReader:
    """Reads one TSV file; remembers each row's image so later rows can refer to it by index."""

    def __init__(self) -> None:
        self._images: dict[str, bytes] = {}

    def rows(self, path: Path) -> Iterator[dict[str, Any] | RowError]:
        """The data rows as dicts (cells of short rows are None)."""
        csv.field_size_limit(sys.maxsize)
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            missing = [name for name in _REQUIRED if name not in (reader.fieldnames or [])]
            if missing:
                raise BenchmarkError(f"{path} is not a VLMEvalKit TSV: no column(s) {missing}")
            for row in reader:
                if None in row:
                    yield RowError("malformed_row", f"{len(row[None])} more cells than columns")
                else:
                    yield row

    @staticmethod
    def options(row: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """The letters of the row's present options and their texts."""
        letters = [letter for letter in string.ascii_uppercase if not is_missing(row.get(letter))]
        return letters, [str(row[letter]).strip() for letter in letters]

    def _image(self, row: Mapping[str, Any], row_id: str, context: RowContext) -> bytes:
        cell = row.get("image")
        reference = str(cell).strip() if cell is not None else ""
        short = 0 < len(reference) <= _MAX_REFERENCE_CHARS and _ID.match(reference) is not None
        if short and reference in self._images:
            return self._images[reference]
        try:
            data = image_from_base64(cell, context.limits)
        except RowError as error:
            if short and error.reason == "bad_base64":
                raise RowError("missing_image", f"image refers to row {reference!r}, which has no image") from None
            raise
        self._images[row_id] = data
        return data

    def parse(self, row: Mapping[str, Any], context: RowContext) -> EvalItem:
        """One row as an item."""
        row_id = item_id(row.get("index"))
        image = self._image(row, row_id, context)
        question = text_field(row, "question", "missing_question")
        answer = text_field(row, "answer", "missing_answer")
        letters, texts = self.options(row)
        if len(letters) < 2:
            raise RowError("malformed_row", f"{len(letters)} option(s); a choice needs at least 2")
        letter = answer.strip("() .").upper()
        if letter not in letters:
            raise RowError("unknown_answer_letter", f"answer {answer[:20]!r} is not one of the options {letters}")
        hint = row.get("hint")
        return build_item(
            context,
            row_id=row_id,
            category=row.get("category"),
            image=image,
            question=question if is_missing(hint) else f"Hint: {str(hint).strip()}\n{question}",
            answer=string.ascii_uppercase[letters.index(letter)],
            kind="choice",
            options=texts,
        )
