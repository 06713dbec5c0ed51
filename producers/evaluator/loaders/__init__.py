"""Benchmark loaders: local files in the formats people already have, nothing downloaded.

`load_benchmark` reads one configured `BenchmarkSuite` (VLMEvalKit TSV, POPE JSONL, generic JSONL
or Parquet) into `EvalItem`s. A bad row is skipped and counted with its reason; the good rows
still load. The synthetic world's suites need no file: see `producers.evaluator.items`.

Example:
    >>> import tempfile, pathlib
    >>> from producers.evaluator.settings import BenchmarkSuite
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> row = '{"question": "q", "answer": "4", "answer_type": "number", "image": "../x.png"}'
    >>> _ = (folder / "b.jsonl").write_text(row)
    >>> loaded = load_benchmark(BenchmarkSuite(name="b", path=folder / "b.jsonl", format="jsonl"), ["counting"])
    >>> loaded.items, dict(loaded.report.skipped)
    ([], {'image_outside_folder': 1})
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from dpe.blobstore import ImageLimits
from producers.evaluator.items import EvalItem
from producers.evaluator.loaders.fields import CapabilityMapper, RowContext
from producers.evaluator.loaders.generic import GenericReader
from producers.evaluator.loaders.pope import PopeReader
from producers.evaluator.loaders.report import (
    BenchmarkError,
    LoadedBenchmark,
    LoadReport,
    RowError,
    SkippedRow,
    SkipReason,
)
from producers.evaluator.loaders.vlmeval import VLMEvalReader
from producers.evaluator.settings import BenchmarkFormat, BenchmarkSuite

__all__ = [
    "BenchmarkError",
    "LoadReport",
    "LoadedBenchmark",
    "RowError",
    "SkipReason",
    "SkippedRow",
    "load_benchmark",
]


class Reader(Protocol):
    """A file format: its rows, and how one row becomes an item (raising RowError when it cannot)."""

    def rows(self, path: Path) -> Iterator[dict[str, Any] | RowError]: ...

    def parse(self, row: Mapping[str, Any], context: RowContext) -> EvalItem: ...


def _reader(layout: BenchmarkFormat) -> Reader:
    if layout == "vlmeval_tsv":
        return VLMEvalReader()
    if layout == "pope_jsonl":
        return PopeReader()
    return GenericReader(layout)


def load_benchmark(
    suite: BenchmarkSuite, capabilities: Iterable[str], limits: ImageLimits = ImageLimits()
) -> LoadedBenchmark:
    """Every good row of `suite`'s file as an item; the report counts the rest by reason.

    Raises `BenchmarkError` only when the file as a whole cannot be read.
    """
    path = Path(suite.path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist")
    context = RowContext(
        suite=suite.name,
        folder=path.parent,
        capabilities=CapabilityMapper.build(capabilities, suite.categories, suite.default_capability),
        limits=limits,
    )
    reader = _reader(suite.format)
    report = LoadReport(path=str(path))
    items: list[EvalItem] = []
    seen: set[str] = set()
    for number, row in enumerate(reader.rows(path), start=1):
        report.rows += 1
        if isinstance(row, RowError):
            report.skip(number, row)
            continue
        try:
            item = reader.parse(row, context)
            if item.item_id in seen:
                raise RowError("duplicate_id", f"id {item.item_id!r} already used by an earlier row")
        except RowError as error:
            report.skip(number, error)
            continue
        except (TypeError, ValueError, AttributeError) as error:
            report.skip(number, RowError("malformed_row", f"{type(error).__name__}: {error}"[:300]))
            continue
        seen.add(item.item_id)
        items.append(item)
        report.keep(item)
    return LoadedBenchmark(items, report)
