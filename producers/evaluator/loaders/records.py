"""Row sources: JSON Lines and Parquet files as dicts, a bad line becoming a `RowError`, not a stop.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = path.write_text('{"a": 1}\\n\\nnot json\\n[1]\\n')
    >>> [row if isinstance(row, dict) else row.reason for row in jsonl_rows(path)]
    [{'a': 1}, 'malformed_row', 'malformed_row']
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from producers.evaluator.loaders.report import BenchmarkError, RowError

_PARQUET_BATCH_ROWS = 256


def jsonl_rows(path: Path) -> Iterator[dict[str, Any] | RowError]:
    """Each non-blank line as a JSON object, or a RowError for a line that is not one."""
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BenchmarkError(f"cannot read {path}: {exc}") from None
    with handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RowError("malformed_row", f"not JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(row, dict):
                row = RowError("malformed_row", f"a JSON {type(row).__name__}, not an object")
            yield row


def parquet_rows(path: Path) -> Iterator[dict[str, Any] | RowError]:
    """Each row of a Parquet file as a dict, read in small batches."""
    try:
        table = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise BenchmarkError(f"{path} is not a readable Parquet file: {exc}") from None
    for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        yield from batch.to_pylist()
