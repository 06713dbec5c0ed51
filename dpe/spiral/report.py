"""The run's ``summary.json`` and ``report.html`` (plots inline, no external assets).

Example:
    >>> write_report(Path("runs/abc"), rounds, meta={"strategy": "dpe"})   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpe.spiral.state import RoundRecord  # noqa: E402


def _series(rounds: Sequence[RoundRecord], attribute: str) -> dict[str, list[float | None]]:
    capabilities = sorted({cap for r in rounds for cap in getattr(r, attribute)})
    return {cap: [getattr(r, attribute).get(cap) for r in rounds] for cap in capabilities}


def _figure_png(title: str, rounds: Sequence[RoundRecord], attribute: str, ylabel: str, bars: bool = False) -> str:
    series = _series(rounds, attribute)
    versions = [r.policy_version for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    if bars:
        bottom = [0.0] * len(versions)
        for cap, values in series.items():
            heights = [v or 0 for v in values]
            ax.bar([str(v) for v in versions], heights, bottom=bottom, label=cap)
            bottom = [b + h for b, h in zip(bottom, heights)]
    else:
        for cap, values in series.items():
            ax.plot(versions, [float("nan") if v is None else v for v in values], marker="o", label=cap)
        ax.set_xticks(versions)
    ax.set_title(title)
    ax.set_xlabel("policy version")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


TOP_FAILURE_TYPES = 8
"""Failure types drawn by name in the report (the rest as ``other``)."""


def top_failure_types(rounds: Sequence[RoundRecord], top: int = TOP_FAILURE_TYPES) -> list[RoundRecord]:
    """The rounds with only the `top` failure types over the run by name, the others summed as ``other``.

    >>> record = RoundRecord(1, {}, 0, {}, {}, {}, None, 0, {}, {}, failure_types={"a": 3, "b": 1, "c": 2})
    >>> top_failure_types([record], top=2)[0].failure_types
    {'a': 3, 'c': 2, 'other': 1}
    """
    totals: dict[str, int] = {}
    for record in rounds:
        for name, count in record.failure_types.items():
            totals[name] = totals.get(name, 0) + count
    named = set(sorted(totals, key=lambda name: (-totals[name], name))[:top])
    folded = []
    for record in rounds:
        kept = {name: count for name, count in record.failure_types.items() if name in named}
        other = sum(count for name, count in record.failure_types.items() if name not in named)
        folded.append(dataclasses.replace(record, failure_types=kept | ({"other": other} if other else {})))
    return folded


def _table(rounds: Sequence[RoundRecord]) -> str:
    capabilities = sorted({cap for r in rounds for cap in r.heldout_accuracy})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in capabilities)
    rows = []
    for r in rounds:
        cells = "".join(
            f"<td>{r.heldout_accuracy[c]:.2f}</td>" if c in r.heldout_accuracy else "<td>–</td>" for c in capabilities
        )
        rows.append(f"<tr><td>{r.policy_version}</td>{cells}<td>{r.samples_trained}</td></tr>")
    return (f"<table><tr><th>policy version</th>{head}<th>samples trained</th></tr>{''.join(rows)}</table>")


def write_report(folder: Path, rounds: Sequence[RoundRecord], meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``report.html`` into `folder`; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {**meta, "rounds": [r.as_dict() for r in rounds]}
    summary_path = folder / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    figures = [
        _figure_png("Weakness (decayed error rate) per capability", rounds, "weakness", "error rate"),
        _figure_png("Quota plan made from each version's diagnosis", rounds, "quota_plan", "samples", bars=True),
        _figure_png("Held-out accuracy per capability", rounds, "heldout_accuracy", "accuracy"),
        _figure_png("Failure types the auditor found (divergences)", top_failure_types(rounds), "failure_types",
                    "divergences", bars=True),
    ]
    images = "".join(f'<img alt="plot" src="data:image/png;base64,{png}">' for png in figures)
    meta_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                        for k, v in meta.items() if k != "stalls")
    stalls = "".join(f"<li>{html.escape(stall)}</li>" for stall in meta.get("stalls", []))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dpe-stream run {html.escape(str(meta.get('run_id', '')))}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{display:block;margin:1em 0}}</style></head>
<body><h1>dpe-stream run</h1><table>{meta_rows}</table>
{f'<h2>Stalls</h2><ul class="stalls">{stalls}</ul>' if stalls else ''}
<h2>Held-out accuracy per policy version</h2>{_table(rounds)}{images}</body></html>
"""
    report_path = folder / "report.html"
    report_path.write_text(page)
    return summary_path, report_path
