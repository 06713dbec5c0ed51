"""The experiment's figure: weak-capability accuracy against samples trained, and final accuracy per capability.

Example:
    >>> rows = [RunRow(arm, 0, r, {"a": 5 * r}, {"a": 0.2 + g * r}, {"a": 50})
    ...         for arm, g in (("uniform", 0.05), ("dpe_step", 0.1)) for r in (0, 1, 2)]
    >>> plot_experiment(rows, Path("/tmp/experiment.png"), arms=("dpe_step", "uniform"))
    >>> Path("/tmp/experiment.png").read_bytes()[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

import statistics as stats
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from dpe.spiral.experiment.statistics import MEAN, RunRow, final_accuracy, weakest_capabilities  # noqa: E402


def plot_experiment(rows: Sequence[RunRow], path: Path, arms: Sequence[str]) -> None:
    """Left: mean accuracy on the base's three weakest capabilities against samples trained, one line per
    arm (mean over seeds, shaded min–max). Right: last-round accuracy per capability per arm, base ticked."""
    weak = weakest_capabilities(rows, 3)
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(14.0, 4.5), dpi=100, gridspec_kw={"width_ratios": [1, 1.4]})
    _weak_curves(curves, rows, arms, weak)
    _final_bars(bars, rows, arms)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _weak_curves(ax: Axes, rows: Sequence[RunRow], arms: Sequence[str], weak: list[str]) -> None:
    for arm in arms:
        by_round: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for row in rows:
            if row.arm == arm:
                accuracy = stats.fmean(row.heldout_accuracy[cap] for cap in weak)
                by_round[row.round].append((sum(row.samples_trained.values()), accuracy))
        points = [by_round[r] for r in sorted(by_round)]
        xs = [stats.fmean(s for s, _ in p) for p in points]
        ax.plot(xs, [stats.fmean(a for _, a in p) for p in points], marker="o", label=arm)
        ax.fill_between(xs, [min(a for _, a in p) for p in points], [max(a for _, a in p) for p in points], alpha=0.15)
    ax.set_xlabel("samples trained")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"base's weakest: {', '.join(weak)}")
    ax.legend(fontsize="small")


def _final_bars(ax: Axes, rows: Sequence[RunRow], arms: Sequence[str]) -> None:
    tables = {arm: final_accuracy(rows, arm) for arm in arms}
    capabilities = sorted({cap for table in tables.values() for cap in table} - {MEAN}) + [MEAN]
    width = 0.8 / max(len(arms), 1)
    for index, (arm, table) in enumerate(tables.items()):
        xs = [position + (index - (len(arms) - 1) / 2) * width for position in range(len(capabilities))]
        cells = [table.get(cap) for cap in capabilities]
        means = [cell["mean"] if cell else 0.0 for cell in cells]
        errors = [[max(cell["mean"] - cell["min"], 0.0) if cell else 0.0 for cell in cells],
                  [max(cell["max"] - cell["mean"], 0.0) if cell else 0.0 for cell in cells]]
        ax.bar(xs, means, width=width, yerr=errors, capsize=2, label=arm)
    base = next(iter(tables.values()), {})
    ax.scatter(range(len(capabilities)), [base.get(cap, {}).get("base", 0.0) for cap in capabilities],
               marker="_", s=300, color="black", label="base model", zorder=3)
    ax.set_xticks(range(len(capabilities)), capabilities, rotation=20)
    ax.set_ylabel("held-out accuracy after the last round")
    ax.set_title("per capability (min–max over seeds)")
    ax.legend(fontsize="small")
