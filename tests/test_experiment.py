"""`dpe experiment`'s results: the tidy table it writes, and the statistics recomputed from it alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from dpe.cli import main
from dpe.spiral.experiment.runner import ExperimentOptions, ExperimentResult, RunOutcome, tidy_rows, write_results
from dpe.spiral.experiment.statistics import (
    MEAN,
    RunRow,
    final_accuracy,
    paired_bootstrap,
    run_gains,
    sample_efficiency,
    summarise_arm,
    weakest_capabilities,
)
from dpe.spiral.state import RoundRecord

BASE = {"arithmetic": 0.1, "chart": 0.2, "color": 0.9, "counting": 0.3, "existence": 0.95}


def run(arm: str, seed: int, weak_step: float, rounds: int = 3, per_round: int = 30) -> list[RunRow]:
    """Rows of a synthetic run: the three weakest capabilities gain `weak_step` a round, the rest nothing."""
    rows = []
    for r in range(rounds + 1):
        accuracy = {cap: acc + (weak_step * r + seed / 100 if acc < 0.5 else 0.0) for cap, acc in BASE.items()}
        trained = {cap: per_round * r // len(BASE) for cap in BASE}
        rows.append(RunRow(arm, seed, r, trained, accuracy, {cap: 100 for cap in BASE}))
    return rows


def rows_of(steps: dict[str, list[float]]) -> list[RunRow]:
    return [row for arm, per_seed in steps.items() for seed, step in enumerate(per_seed)
            for row in run(arm, seed, step)]


def test_the_weakest_capabilities_are_the_base_rounds_lowest():
    rows = rows_of({"uniform": [0.01, 0.02]})
    assert weakest_capabilities(rows, 3) == ["arithmetic", "chart", "counting"]


def test_gains_are_last_round_minus_round_zero_per_seed():
    gains = run_gains(rows_of({"uniform": [0.01, 0.03]}), "uniform", ["arithmetic", "chart"])
    assert gains == pytest.approx({0: 0.03, 1: 0.09})


def test_the_bootstrap_interval_excludes_zero_only_when_the_seeds_agree():
    assert paired_bootstrap([0.05, 0.06, 0.04, 0.05, 0.07]).excludes_zero
    mixed = paired_bootstrap([0.05, -0.06, 0.04, -0.05, 0.01])
    assert not mixed.excludes_zero and mixed.low < mixed.mean < mixed.high
    assert paired_bootstrap([0.1, 0.2, 0.3], seed=1) == paired_bootstrap([0.1, 0.2, 0.3], seed=1), "reproducible"


def test_an_arm_that_gains_twice_as_fast_is_twice_as_sample_efficient():
    rows = rows_of({"dpe_step": [0.04] * 5, "uniform": [0.02] * 5, "proportional": [0.01] * 5, "static": [0.0] * 5})
    weak = weakest_capabilities(rows, 3)
    assert sample_efficiency(rows, "dpe_step", weak) == pytest.approx(2.0)
    assert sample_efficiency(rows, "proportional", weak) == pytest.approx(0.5)
    assert sample_efficiency(rows, "static", weak) is None, "no gain, no ratio"
    summary = summarise_arm(rows, "dpe_step", weak)
    assert summary.seeds == 5 and summary.weak_gain == pytest.approx(0.12)
    assert summary.weak_difference.mean == pytest.approx(0.06) and summary.weak_difference.excludes_zero
    assert summary.mean_difference.mean == pytest.approx(0.06 * 3 / 5)


def test_final_accuracy_is_over_seeds_with_the_mean_over_capabilities():
    table = final_accuracy(rows_of({"uniform": [0.0, 0.1]}), "uniform")
    assert table["chart"] == pytest.approx({"mean": 0.355, "std": 0.2192031, "min": 0.2, "max": 0.51,
                                            "base": 0.205, "gain": 0.15})
    assert table[MEAN]["base"] == pytest.approx(sum(BASE.values()) / 5 + 3 * 0.01 / 5 / 2), "seed 1 starts 0.01 up"


def test_tidy_rows_sum_the_samples_each_round_trained_and_stop_at_the_last_round():
    def record(version: int, accuracy: float, trained: dict[str, int]) -> RoundRecord:
        return RoundRecord(version, {"color": accuracy}, 40, {"color": 40}, {}, {}, "uniform", sum(trained.values()),
                           trained, {})

    records = [record(0, 0.2, {}), record(1, 0.3, {"color": 5, "chart": 1}), record(2, 0.4, {"color": 7}),
               record(3, 0.9, {"color": 1})]
    rows = tidy_rows("uniform", 4, records, last_round=2)
    assert [(row.round, row.samples_trained, row.heldout_accuracy, row.heldout_items) for row in rows] == [
        (0, {"color": 0}, {"color": 0.2}, {"color": 40}),
        (1, {"color": 5}, {"color": 0.3}, {"color": 40}),
        (2, {"color": 12}, {"color": 0.4}, {"color": 40}),
    ]


def test_experiment_json_is_a_tidy_table_that_the_cli_recomputes_the_tables_from(tmp_path):
    rows = rows_of({"dpe_step": [0.04] * 5, "uniform": [0.02] * 5})
    options = ExperimentOptions(arms=("dpe_step", "uniform"), seeds=tuple(range(5)), rounds=3, runs_dir=tmp_path,
                                experiment_id="e")
    outcomes = [RunOutcome(arm, seed, Path(f"r/{arm}/seed{seed}"), True, 60.0,
                           [row for row in rows if (row.arm, row.seed) == (arm, seed)],
                           {"accepted": {"agents": 7, "audit": seed}, "rejected": {"agents": 9}})
                for arm in options.arms for seed in options.seeds]
    path = write_results(ExperimentResult(options.folder, "dpe_step", outcomes, 612.3), options)
    data = json.loads(path.read_text())
    assert data["default_strategy"] == "dpe_step" and data["arms"] == ["dpe_step", "uniform"]
    assert data["seconds"] == 612.3 and data["base_model"] == "warmed tiny model"
    assert len(data["runs"]) == 2 * 5 * 4
    assert set(data["runs"][0]) == {"arm", "seed", "round", "samples_trained", "heldout_accuracy", "heldout_items"}
    assert [RunRow.from_dict(row) for row in data["runs"]] == rows
    assert (tmp_path / "e" / "experiment.png").read_bytes()[:4] == b"\x89PNG"
    assert [run["samples_by_origin"]["accepted"]["audit"] for run in data["completed"]] == [0, 1, 2, 3, 4] * 2

    printed = CliRunner().invoke(main, ["experiment", "--from", str(path)], catch_exceptions=False).output
    assert "| dpe_step | 5 | 60% | +0.120 | +0.060 (+0.060 – +0.060) |" in printed, printed
    assert "| uniform | 5 | 60% | +0.060 | – |" in printed and "2.00×" in printed


def test_a_run_cut_short_counts_no_gain_it_did_not_measure():
    rows = [row for row in rows_of({"uniform": [0.02, 0.02]}) if row.round == 0 or row.seed == 0]
    assert run_gains(rows, "uniform", ["chart"]) == pytest.approx({0: 0.06, 1: 0.0})
    last = next(index for index, row in enumerate(rows) if (row.seed, row.round) == (0, 3))
    half_graded = {cap: accuracy for cap, accuracy in rows[last].heldout_accuracy.items() if cap != "chart"}
    rows[last] = RunRow("uniform", 0, 3, rows[last].samples_trained, half_graded, rows[last].heldout_items)
    assert run_gains(rows, "uniform", ["chart"]) == pytest.approx({0: 0.04, 1: 0.0}), "round 2 is its last graded"
    assert math.isnan(paired_bootstrap([]).mean)


def test_the_readme_tables_are_the_committed_experiments_own():
    """The README's experiment tables are `dpe experiment --from docs/experiment.json`, word for word."""
    repo = Path(__file__).resolve().parent.parent
    printed = CliRunner().invoke(main, ["experiment", "--from", str(repo / "docs" / "experiment.json")],
                                 catch_exceptions=False).output
    table_lines = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table_lines) >= 2 * 7, printed
    readme = (repo / "README.md").read_text()
    assert [line for line in table_lines if line not in readme] == []
