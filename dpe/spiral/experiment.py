"""`dpe experiment`: the same spiral under several quota strategies (arms) and seeds, on one held-out suite.

Every run starts from the same base model, trains the same number of samples per round for the
same number of rounds, and is measured on the same held-out suite (the evaluator's seed is not
varied); only the arm's quota strategy changes, and across seeds the synthetic unlabeled stream
and the trainer's sampling. Arms run interleaved within each seed, so a machine that slows down
during the experiment slows every arm alike.

Outputs under ``<runs_dir>/<experiment_id>/``: each run's own folder (``<arm>/seed<k>/`` with its
``summary.json`` and ``report.html``), ``<arm>/summary.json`` (final held-out accuracy per capability
over seeds: mean, standard deviation, min, max), ``experiment.json`` and ``experiment.png``.

Example:
    >>> options = ExperimentOptions(arms=("dpe_step", "uniform"), seeds=(0, 1))
    >>> result = run_experiment(Settings.load(), options)                        # doctest: +SKIP
    >>> arm_statistics(result.arms["uniform"])["mean"]["accuracy"]                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import statistics as stats
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402

from dpe.config import with_overrides
from dpe.settings import Settings  # noqa: E402
from dpe.spiral.run import SpiralOptions, run_spiral  # noqa: E402

MEAN = "mean"
"""The row of the average over capabilities."""


@dataclass(frozen=True)
class ExperimentOptions:
    """Arms, seeds and the shared shape of every run."""

    arms: tuple[str, ...] = ("dpe_step", "proportional", "uniform")
    seeds: tuple[int, ...] = (0, 1)
    rounds: int = 3
    round_samples: int = SpiralOptions.round_samples
    runs_dir: Path = Path("runs")
    experiment_id: str = field(default_factory=lambda: time.strftime("experiment-%Y%m%d-%H%M%S"))
    live: bool = False
    timeout_s: float = 1800.0

    @property
    def folder(self) -> Path:
        return self.runs_dir / self.experiment_id


@dataclass(frozen=True)
class RunOutcome:
    """One (arm, seed) run: held-out accuracy per capability before round 1 and after the last round."""

    arm: str
    seed: int
    run_dir: Path
    completed: bool
    seconds: float
    base: dict[str, float]
    final: dict[str, float]


@dataclass
class ExperimentResult:
    folder: Path
    arms: dict[str, list[RunOutcome]]


def with_mean(accuracy: dict[str, float]) -> dict[str, float]:
    """Per-capability accuracy plus its unweighted mean over capabilities.

    >>> with_mean({"a": 0.2, "b": 0.4})[MEAN]
    0.30000000000000004
    """
    return accuracy | ({MEAN: stats.fmean(accuracy.values())} if accuracy else {})


def arm_statistics(runs: list[RunOutcome]) -> dict[str, dict[str, float]]:
    """Per capability (and the mean over capabilities): final accuracy over seeds and its gain over the base.

    >>> run = RunOutcome("uniform", 0, Path("r"), True, 1.0, base={"a": 0.2}, final={"a": 0.5})
    >>> arm_statistics([run, run])["a"]["gain"]
    0.3
    """
    finals = [with_mean(run.final) for run in runs if run.final]
    bases = [with_mean(run.base) for run in runs if run.base]
    out: dict[str, dict[str, float]] = {}
    for capability in sorted({cap for final in finals for cap in final}):
        values = [final[capability] for final in finals if capability in final]
        base = stats.fmean(b[capability] for b in bases if capability in b) if bases else float("nan")
        out[capability] = {
            "mean": stats.fmean(values),
            "std": stats.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "base": base,
            "gain": round(stats.fmean(values) - base, 12),
        }
    return out


def _seeded(settings: Settings, seed: int) -> Settings:
    return with_overrides(settings, {"ingest": {"synthetic_seed": seed}, "trainer": {"grpo": {"seed": seed}}})


def run_arm(settings: Settings, options: ExperimentOptions, arm: str, seed: int, console: Console) -> RunOutcome:
    """One spiral run of `arm` with `seed`."""
    spiral = SpiralOptions(rounds=options.rounds, round_samples=options.round_samples, strategy=arm,
                           runs_dir=options.folder / arm, run_id=f"seed{seed}", live=options.live,
                           timeout_s=options.timeout_s)
    result = run_spiral(_seeded(settings, seed), spiral, console)
    first, last = (result.rounds[0], result.rounds[-1]) if result.rounds else (None, None)
    return RunOutcome(arm=arm, seed=seed, run_dir=result.run_dir, completed=result.completed, seconds=result.seconds,
                      base=first.heldout_accuracy if first else {},
                      final=last.heldout_accuracy if last and last.policy_version == options.rounds else {})


def run_experiment(settings: Settings, options: ExperimentOptions, console: Console | None = None) -> ExperimentResult:
    """Every arm for every seed; then the per-arm summaries, ``experiment.json`` and the plot."""
    console = console or Console()
    arms: dict[str, list[RunOutcome]] = {arm: [] for arm in options.arms}
    for seed in options.seeds:
        for arm in options.arms:
            console.rule(f"arm {arm} · seed {seed}")
            outcome = run_arm(settings, options, arm, seed, console)
            console.print(f"{arm} seed {seed}: {'completed' if outcome.completed else 'NOT completed'} "
                          f"in {outcome.seconds:.0f}s")
            arms[arm].append(outcome)
    result = ExperimentResult(options.folder, arms)
    write_results(result, options)
    return result


def write_results(result: ExperimentResult, options: ExperimentOptions) -> None:
    """``<arm>/summary.json`` per arm, ``experiment.json`` and ``experiment.png``."""
    shape = {"rounds": options.rounds, "round_samples": options.round_samples, "seeds": list(options.seeds)}
    overview: dict[str, Any] = {"experiment_id": options.experiment_id, **shape, "arms": {}}
    for arm, runs in result.arms.items():
        summary = {"arm": arm, **shape, "heldout_after_last_round": arm_statistics(runs),
                   "runs": [{"seed": run.seed, "run_dir": str(run.run_dir), "completed": run.completed,
                             "seconds": round(run.seconds, 1), "base": run.base, "final": run.final} for run in runs]}
        folder = result.folder / arm
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        overview["arms"][arm] = summary["heldout_after_last_round"]
    (result.folder / "experiment.json").write_text(json.dumps(overview, indent=2, sort_keys=True))
    plot(overview["arms"], result.folder / "experiment.png", title=f"held-out accuracy after round {options.rounds}")


def plot(arms: dict[str, dict[str, dict[str, float]]], path: Path, title: str) -> None:
    """Grouped bars: final held-out accuracy per capability per arm (min–max over seeds as error bars),
    and the base model's accuracy as a black tick."""
    capabilities = sorted({cap for table in arms.values() for cap in table} - {MEAN}) + [MEAN]
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(capabilities)), 4.0), dpi=100)
    for index, (arm, table) in enumerate(arms.items()):
        xs = [position + (index - (len(arms) - 1) / 2) * width for position in range(len(capabilities))]
        rows = [table.get(cap) for cap in capabilities]
        means = [row["mean"] if row else 0.0 for row in rows]
        errors = [[max(row["mean"] - row["min"], 0.0) if row else 0.0 for row in rows],
                  [max(row["max"] - row["mean"], 0.0) if row else 0.0 for row in rows]]
        ax.bar(xs, means, width=width, yerr=errors, capsize=3, label=arm)
    base = next(iter(arms.values()), {})
    ax.scatter(range(len(capabilities)), [base.get(cap, {}).get("base", 0.0) for cap in capabilities],
               marker="_", s=400, color="black", label="base model", zorder=3)
    ax.set_xticks(range(len(capabilities)), capabilities, rotation=20)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
