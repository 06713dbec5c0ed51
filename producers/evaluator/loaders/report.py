"""What loading a benchmark file gave: the items, and every skipped row with its reason.

A bad row never stops a load; it is counted under a stable reason code (`SkipReason`) and the
first few are kept with their row number and detail, so a person can find and fix them.

Example:
    >>> report = LoadReport(path="mmstar.tsv")
    >>> report.skip(3, RowError("bad_base64", "column image is not base64"))
    >>> dict(report.skipped), report.examples[0].row
    ({'bad_base64': 1}, 3)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from producers.evaluator.items import EvalItem

SkipReason = Literal[
    "malformed_row",
    "bad_id",
    "duplicate_id",
    "missing_question",
    "missing_answer",
    "unknown_answer_type",
    "unknown_answer_letter",
    "bad_answer",
    "unknown_capability",
    "missing_image",
    "image_outside_folder",
    "bad_base64",
    "undecodable_image",
    "image_too_large",
]
"""Stable reason codes for skipped rows (metric labels, report keys)."""

MAX_EXAMPLES = 20


class RowError(ValueError):
    """A row that cannot become an item; `reason` is a `SkipReason`, `detail` says what was wrong."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason: SkipReason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class BenchmarkError(ValueError):
    """The file as a whole cannot be read (missing, wrong format, no header...)."""


@dataclass(frozen=True)
class SkippedRow:
    """One skipped row: its number in the file (1-based, header excluded), reason and detail."""

    row: int
    reason: SkipReason
    detail: str


@dataclass
class LoadReport:
    """Counts of a load: rows read, items loaded per capability, skips per reason."""

    path: str
    rows: int = 0
    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=Counter)
    unknown_categories: dict[str, int] = field(default_factory=Counter)
    capabilities: dict[str, int] = field(default_factory=Counter)
    examples: list[SkippedRow] = field(default_factory=list)

    def skip(self, row: int, error: RowError) -> None:
        """Count a skipped row (and keep it as an example while there are few)."""
        self.skipped[error.reason] += 1
        if error.reason == "unknown_capability":
            self.unknown_categories[error.detail] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(SkippedRow(row, error.reason, error.detail))

    def keep(self, item: EvalItem) -> None:
        """Count a loaded item."""
        self.loaded += 1
        self.capabilities[item.capability] += 1

    def summary(self) -> str:
        """One line for logs.

        Example:
            >>> LoadReport(path="b.jsonl", rows=3, loaded=2, skipped={"missing_answer": 1}).summary()
            'b.jsonl: 2 of 3 rows loaded; skipped: missing_answer=1'
        """
        skipped = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items())) or "none"
        unknown = ", ".join(sorted(self.unknown_categories))
        return f"{self.path}: {self.loaded} of {self.rows} rows loaded; skipped: {skipped}" + (
            f"; unknown categories: {unknown}" if unknown else ""
        )


@dataclass(frozen=True)
class LoadedBenchmark:
    """The items of a benchmark file and the report of how it was read."""

    items: list[EvalItem]
    report: LoadReport
