"""Runs the spiral under several quota strategies (arms) and seeds on one held-out suite, and writes the results.

Every run starts from the same base model, trains the same number of samples per round for the
same number of rounds, and is measured on the same held-out suite (`heldout_per_capability` items
of each capability from the world's diagnostic pool, which no generator's stream draws from; the
evaluator's seed is not varied). Only the arm's quota strategy changes, and across seeds the
synthetic unlabeled stream and the trainer's sampling. Arms run interleaved within each seed, so a
machine that slows down during the experiment slows every arm alike.

Outputs under ``<runs_dir>/<experiment_id>/``: each run's own folder (``<arm>/seed<k>/`` with its
``summary.json`` and ``report.html``), ``experiment.json`` (the tidy table ``runs``: one row per arm,
seed and round, from which `dpe.spiral.experiment.statistics` recomputes every figure) and
``experiment.png``.

Example:
    >>> options = ExperimentOptions(arms=("dpe_step", "uniform"), seeds=(0, 1))
    >>> result = run_experiment(Settings.load(), options)                        # doctest: +SKIP
    >>> sorted({row.arm for row in result.rows})                                 # doctest: +SKIP
    ['dpe_step', 'uniform']
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from dpe.config import with_overrides
from dpe.settings import Settings
from dpe.spiral.experiment.plot import plot_experiment
from dpe.spiral.experiment.statistics import RunRow
from dpe.spiral.run import SpiralOptions, run_spiral
from dpe.spiral.state import RoundRecord

DEFAULT_ARMS: tuple[str, ...] = ("dpe_step", "static", "proportional", "learning_progress", "uniform")
NO_RECTIFICATION = "/no-rectification"
"""An arm's suffix: its strategy with the auditor's leads off, so the agents' own samples fill every quota (AuditDM's
rectification source off, at the same samples); ``dpe_step`` against ``dpe_step/no-rectification`` measures it."""


def arm_strategy(arm: str) -> str:
    """The quota strategy of an arm.

    >>> arm_strategy("dpe_step"), arm_strategy("uniform/no-rectification")
    ('dpe_step', 'uniform')
    """
    return arm.removesuffix(NO_RECTIFICATION)


@dataclass(frozen=True)
class ExperimentOptions:
    """Arms, seeds and the shared shape of every run."""

    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    rounds: int = 2
    """Two rounds after the base: on 2 cores a run of two takes 100-205 s (median 133 s), 25 runs 59 minutes."""
    round_samples: int = SpiralOptions.round_samples
    heldout_per_capability: int = 100
    base_model: Path | None = None
    """Every arm's starting model (None: the warmed tiny model)."""
    runs_dir: Path = Path("runs")
    experiment_id: str = field(default_factory=lambda: time.strftime("experiment-%Y%m%d-%H%M%S"))
    live: bool = False
    timeout_s: float = 1800.0

    @property
    def folder(self) -> Path:
        return self.runs_dir / self.experiment_id


@dataclass(frozen=True)
class RunOutcome:
    """One (arm, seed) run: whether it finished its rounds, and its rows of the tidy table."""

    arm: str
    seed: int
    run_dir: Path
    completed: bool
    seconds: float
    rows: list[RunRow]
    samples_by_origin: dict[str, dict[str, int]] = field(default_factory=dict)
    """Accepted and rejected samples by origin (the agents, or the auditor's leads)."""


@dataclass
class ExperimentResult:
    folder: Path
    default_strategy: str
    outcomes: list[RunOutcome]
    seconds: float
    """Wall time of the whole experiment."""

    @property
    def rows(self) -> list[RunRow]:
        return [row for outcome in self.outcomes for row in outcome.rows]


def tidy_rows(arm: str, seed: int, rounds: list[RoundRecord], last_round: int) -> list[RunRow]:
    """The rows of one run: rounds 0..`last_round` that were graded, samples trained summed up to each.

    >>> record = lambda v, acc, trained: RoundRecord(v, {"a": acc}, 10, {"a": 10}, {}, {}, None, sum(trained.values()),
    ...                                              trained, {})
    >>> rows = tidy_rows("uniform", 0, [record(0, 0.2, {}), record(1, 0.3, {"a": 4}), record(2, 0.5, {"a": 6})], 2)
    >>> [(row.round, row.samples_trained["a"], row.heldout_accuracy["a"]) for row in rows]
    [(0, 0, 0.2), (1, 4, 0.3), (2, 10, 0.5)]
    """
    rows, trained = [], Counter()
    for record in rounds:
        if record.policy_version > last_round:
            break
        trained.update(record.samples_trained_by_capability)
        if record.heldout_accuracy:
            capabilities = sorted(record.heldout_accuracy)
            rows.append(RunRow(arm=arm, seed=seed, round=record.policy_version,
                               samples_trained={cap: trained.get(cap, 0) for cap in capabilities},
                               heldout_accuracy=record.heldout_accuracy,
                               heldout_items=record.heldout_items_by_capability))
    return rows


def arm_settings(settings: Settings, options: ExperimentOptions, seed: int, arm: str = "dpe_step") -> Settings:
    """`settings` with the seed's unlabeled stream and trainer sampling, the experiment's held-out suite, and the
    auditor's leads off for a `NO_RECTIFICATION` arm.

    A finished run does not wait for Prometheus's last scrape: the experiment's figures come from its
    topics, and the next run starts at once.

    >>> configured = arm_settings(Settings.load(), ExperimentOptions(heldout_per_capability=100), seed=3)
    >>> configured.evaluator.synthetic.heldout_items, configured.ingest.synthetic_seed, configured.trainer.grpo.seed
    (700, 3, 3)
    >>> configured.metrics.last_scrape_s, configured.auditor.leads.enabled
    (0.0, True)
    >>> arm_settings(Settings.load(), ExperimentOptions(), 3, "dpe_step/no-rectification").auditor.leads.enabled
    False
    """
    suites = settings.evaluator.synthetic
    return with_overrides(settings, {
        "ingest": {"synthetic_seed": seed}, "trainer": {"grpo": {"seed": seed}}, "metrics": {"last_scrape_s": 0.0},
        "evaluator": {"synthetic": {"heldout_items": options.heldout_per_capability * len(suites.capabilities)}},
        "auditor": {"leads": {"enabled": not arm.endswith(NO_RECTIFICATION)}},
    })


def run_arm(settings: Settings, options: ExperimentOptions, arm: str, seed: int, console: Console) -> RunOutcome:
    """One spiral run of `arm` with `seed`."""
    spiral = SpiralOptions(rounds=options.rounds, round_samples=options.round_samples, strategy=arm_strategy(arm),
                           base_model=options.base_model,
                           runs_dir=options.folder / arm, run_id=f"seed{seed}", live=options.live,
                           timeout_s=options.timeout_s, keep_bus=False)
    result = run_spiral(arm_settings(settings, options, seed, arm), spiral, console)
    return RunOutcome(arm=arm, seed=seed, run_dir=result.run_dir, completed=result.completed, seconds=result.seconds,
                      rows=tidy_rows(arm, seed, result.rounds, options.rounds),
                      samples_by_origin=result.samples_by_origin)


def run_experiment(settings: Settings, options: ExperimentOptions, console: Console | None = None) -> ExperimentResult:
    """Every arm for every seed; then ``experiment.json`` and the plot."""
    console = console or Console()
    started = time.monotonic()
    outcomes = []
    for seed in options.seeds:
        for arm in options.arms:
            console.rule(f"arm {arm} · seed {seed}")
            outcome = run_arm(settings, options, arm, seed, console)
            console.print(f"{arm} seed {seed}: {'completed' if outcome.completed else 'NOT completed'} "
                          f"in {outcome.seconds:.0f}s")
            outcomes.append(outcome)
    result = ExperimentResult(options.folder, settings.stream.quotas.strategy, outcomes, time.monotonic() - started)
    write_results(result, options)
    return result


def write_results(result: ExperimentResult, options: ExperimentOptions) -> Path:
    """``experiment.json`` (the shape, the runs and the tidy table) and ``experiment.png``; returns the JSON's path."""
    result.folder.mkdir(parents=True, exist_ok=True)
    overview = {
        "experiment_id": options.experiment_id, "rounds": options.rounds, "round_samples": options.round_samples,
        "seeds": list(options.seeds), "arms": list(options.arms), "default_strategy": result.default_strategy,
        "heldout_per_capability": options.heldout_per_capability,
        "base_model": str(options.base_model) if options.base_model else "warmed tiny model",
        "seconds": round(result.seconds, 1),
        "completed": [{"arm": run.arm, "seed": run.seed, "completed": run.completed, "seconds": round(run.seconds, 1),
                       "run_dir": str(run.run_dir), "samples_by_origin": run.samples_by_origin}
                      for run in result.outcomes],
        "runs": [row.as_dict() for row in result.rows],
    }
    path = result.folder / "experiment.json"
    path.write_text(json.dumps(overview, indent=1, sort_keys=True))
    plot_experiment(result.rows, result.folder / "experiment.png", arms=options.arms)
    return path
