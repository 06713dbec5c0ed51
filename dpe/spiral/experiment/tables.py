"""The experiment's tables, made from its tidy rows: the arms against uniform, and final accuracy per capability.

"samples to weakest" is the share of the samples trained that went to the base's `WEAKEST` weakest
capabilities, "weakest gain" the gain on them, "mean gain" on the mean over all capabilities (see
`dpe.spiral.experiment.statistics`).

`markdown_table` and `accuracy_markdown` are what the README shows; `dpe experiment --from FILE` prints all of them for any
``experiment.json``.

Example:
    >>> curves = {"uniform": [0.2, 0.3, 0.4], "dpe_step": [0.2, 0.4, 0.5]}
    >>> rows = [RunRow(arm, seed, r, {"a": 10 * r, "b": 10 * r}, {"a": curve[r], "b": 0.8}, {"a": 100, "b": 100})
    ...         for arm, curve in curves.items() for seed in (0, 1) for r in (0, 1, 2)]
    >>> print(markdown_table(rows, ("dpe_step", "uniform")))
    | arm | seeds | samples to weakest | weakest gain | vs uniform (95 % CI) | mean gain | vs uniform (95 % CI) | sample efficiency |
    | --- | --- | --- | --- | --- | --- | --- | --- |
    | dpe_step | 2 | 100% | +0.150 | +0.050 (+0.050 – +0.050) | +0.150 | +0.050 (+0.050 – +0.050) | 2.00× |
    | uniform | 2 | 100% | +0.100 | – | +0.100 | – | 1.00× |
"""

from __future__ import annotations

import math
from typing import Sequence

from rich.table import Table

from dpe.spiral.experiment.statistics import (
    MEAN,
    REFERENCE_ARM,
    ArmSummary,
    Interval,
    RunRow,
    final_accuracy,
    summarise_arm,
    weakest_capabilities,
)

WEAKEST = 3
"""How many of the base's weakest capabilities the headline gain is measured on."""


def summaries(rows: Sequence[RunRow], arms: Sequence[str]) -> list[ArmSummary]:
    """Every arm against uniform, on the base's `WEAKEST` weakest capabilities."""
    weak = weakest_capabilities(rows, WEAKEST)
    return [summarise_arm(rows, arm, weak) for arm in arms]


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _interval(interval: Interval, arm: str) -> str:
    if arm == REFERENCE_ARM or math.isnan(interval.mean):
        return "–"
    return f"{_signed(interval.mean)} ({_signed(interval.low)} – {_signed(interval.high)})"


def _share(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0%}"


def _efficiency(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _cells(summary: ArmSummary) -> list[str]:
    return [summary.arm, str(summary.seeds), _share(summary.weak_share), _signed(summary.weak_gain),
            _interval(summary.weak_difference, summary.arm), _signed(summary.mean_gain),
            _interval(summary.mean_difference, summary.arm), _efficiency(summary.sample_efficiency)]


VERSUS = f"vs {REFERENCE_ARM} (95 % CI)"
HEADERS = ("arm", "seeds", "samples to weakest", "weakest gain", VERSUS, "mean gain", VERSUS, "sample efficiency")


def comparison_table(rows: Sequence[RunRow], arms: Sequence[str]) -> Table:
    """The arms against uniform (see `dpe.spiral.experiment.statistics`)."""
    weak = ", ".join(weakest_capabilities(rows, WEAKEST))
    table = Table(title=f"gain over the base after the last round (weakest: {weak})")
    for header in HEADERS:
        table.add_column(header, justify="left" if header == "arm" else "right")
    for summary in summaries(rows, arms):
        table.add_row(*_cells(summary))
    return table


def markdown_table(rows: Sequence[RunRow], arms: Sequence[str]) -> str:
    """`comparison_table` as Markdown."""
    return _markdown([list(HEADERS), ["---"] * len(HEADERS), *(_cells(summary) for summary in summaries(rows, arms))])


def accuracy_cells(rows: Sequence[RunRow], arms: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the last-round held-out accuracy per capability per arm (mean ± std over seeds
    (min–max)), the mean over capabilities last."""
    per_arm = {arm: final_accuracy(rows, arm) for arm in arms}
    lines = []
    for capability in sorted({cap for cells in per_arm.values() for cap in cells}, key=lambda cap: (cap == MEAN, cap)):
        cells = [per_arm[arm].get(capability) for arm in arms]
        base = next((cell["base"] for cell in cells if cell), float("nan"))
        lines.append([capability, f"{base:.3f}", *(
            f"{cell['mean']:.3f} ± {cell['std']:.3f} ({cell['min']:.2f}–{cell['max']:.2f})" if cell else "–"
            for cell in cells)])
    return ["capability", "base", *arms], lines


ACCURACY_TITLE = "held-out accuracy after the last round: mean ± std over seeds (min–max)"


def accuracy_table(rows: Sequence[RunRow], arms: Sequence[str]) -> Table:
    """`accuracy_cells` as a table for the terminal."""
    headers, lines = accuracy_cells(rows, arms)
    table = Table(title=ACCURACY_TITLE)
    for header in headers:
        table.add_column(header, justify="left" if header == "capability" else "right")
    for line in lines:
        table.add_row(*line)
    return table


def accuracy_markdown(rows: Sequence[RunRow], arms: Sequence[str]) -> str:
    """`accuracy_cells` as Markdown.

    >>> rows = [RunRow(arm, 0, r, {"a": r}, {"a": 0.5 + r / 10}, {"a": 100}) for arm in ("uniform",) for r in (0, 1)]
    >>> print(accuracy_markdown(rows, ("uniform",)))
    | capability | base | uniform |
    | --- | --- | --- |
    | a | 0.500 | 0.600 ± 0.000 (0.60–0.60) |
    | mean | 0.500 | 0.600 ± 0.000 (0.60–0.60) |
    """
    headers, lines = accuracy_cells(rows, arms)
    return _markdown([headers, ["---"] * len(headers), *lines])


def _markdown(lines: Sequence[Sequence[str]]) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
