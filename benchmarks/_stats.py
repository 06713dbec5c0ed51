"""Small helpers shared by the benchmark scripts: summary statistics and the result table."""

from __future__ import annotations

import statistics
from typing import Sequence

from rich.console import Console
from rich.table import Table


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    """
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative spread ((max - min) / median) of repeated measurements."""
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / median if median else 0.0}


def print_table(title: str, rows: dict[str, Sequence[float]], units: dict[str, str], target: dict[str, str]) -> None:
    """One row per metric: median, min, max, relative spread over the repetitions, and the target."""
    table = Table(title=title)
    for column in ("metric", "median", "min", "max", "spread", "runs", "target"):
        table.add_column(column, justify="left" if column in ("metric", "target") else "right")
    for name, values in rows.items():
        s = spread(values)
        table.add_row(f"{name} ({units[name]})", f"{s['median']:,.2f}", f"{s['min']:,.2f}", f"{s['max']:,.2f}",
                      f"{s['spread']:.1%}", str(len(values)), target.get(name, ""))
    Console(stderr=True).print(table)
