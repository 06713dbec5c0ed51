"""The experiment's statistics, recomputed from its tidy table of runs and nothing else.

A row is one (arm, seed, round); round 0 is the base model. From the rows:

- the base's weakest capabilities (lowest round-0 held-out accuracy, averaged over every run);
- a run's gain: its accuracy after the last round minus its round-0 accuracy, averaged over a set
  of capabilities (the weakest three, or all of them);
- an arm's difference to the reference arm (uniform) with a 95 % bootstrap interval: differences
  are paired by seed (both arms saw the same unlabeled stream), and seeds are resampled;
- the sample-efficiency ratio: at the largest gain both arms reach (the smaller of their final
  gains), the samples the reference arm needs over the samples the arm needs, each read off the
  arm's mean gain curve by linear interpolation between rounds. Above 1 the arm is the more
  sample-efficient; ``None`` when that gain is not positive.

Example:
    >>> curves = {"uniform": [0.2, 0.3, 0.4], "dpe_step": [0.2, 0.4, 0.5]}
    >>> rows = [RunRow(arm, seed, r, {"a": 10 * r, "b": 10 * r}, {"a": curve[r], "b": 0.8}, {"a": 100, "b": 100})
    ...         for arm, curve in curves.items() for seed in (0, 1) for r in (0, 1, 2)]
    >>> weakest_capabilities(rows, 1)
    ['a']
    >>> summary = summarise_arm(rows, "dpe_step", ["a"])
    >>> round(summary.weak_gain, 3), round(summary.weak_difference.mean, 3), summary.sample_efficiency
    (0.3, 0.1, 2.0)
"""

from __future__ import annotations

import math
import random
import statistics as stats
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

REFERENCE_ARM = "uniform"
BOOTSTRAP_RESAMPLES = 10_000
MEAN = "mean"
"""The row of the average over capabilities."""


@dataclass(frozen=True)
class RunRow:
    """One arm, seed and round: cumulative samples trained, held-out accuracy and items, per capability."""

    arm: str
    seed: int
    round: int
    samples_trained: dict[str, int]
    heldout_accuracy: dict[str, float]
    heldout_items: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRow:
        return cls(**data)


@dataclass(frozen=True)
class Interval:
    """A mean and its 95 % bootstrap interval."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class ArmSummary:
    """One arm against the reference arm: gains, paired differences and the sample-efficiency ratio."""

    arm: str
    seeds: int
    weak_share: float
    """Share of the samples trained that went to the weak capabilities (how much the arm targets them)."""
    weak_gain: float
    mean_gain: float
    weak_difference: Interval
    mean_difference: Interval
    sample_efficiency: float | None


def _mean_accuracy(row: RunRow, capabilities: Sequence[str]) -> float:
    return stats.fmean(row.heldout_accuracy[capability] for capability in capabilities)


def weakest_capabilities(rows: Iterable[RunRow], k: int = 3) -> list[str]:
    """The `k` capabilities with the lowest round-0 accuracy over all runs (ties broken by name)."""
    base: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.round == 0:
            for capability, accuracy in row.heldout_accuracy.items():
                base[capability].append(accuracy)
    return sorted(base, key=lambda capability: (stats.fmean(base[capability]), capability))[:k]


def _runs(rows: Iterable[RunRow], arm: str, capabilities: Sequence[str] = ()) -> dict[int, list[RunRow]]:
    """Seed -> the arm's rows of that seed that grade all of `capabilities`, by round (a run stopped while its
    last round was being graded leaves that round out)."""
    runs: dict[int, list[RunRow]] = defaultdict(list)
    for row in rows:
        if row.arm == arm and set(capabilities) <= set(row.heldout_accuracy):
            runs[row.seed].append(row)
    return {seed: sorted(run, key=lambda row: row.round) for seed, run in sorted(runs.items())}


def run_gains(rows: Iterable[RunRow], arm: str, capabilities: Sequence[str]) -> dict[int, float]:
    """Seed -> the run's last-round accuracy minus its round-0 accuracy, mean over `capabilities`."""
    return {seed: _mean_accuracy(run[-1], capabilities) - _mean_accuracy(run[0], capabilities)
            for seed, run in _runs(rows, arm, capabilities).items() if run[0].round == 0}


def weak_share(rows: Iterable[RunRow], arm: str, capabilities: Sequence[str]) -> float:
    """Share of the arm's samples trained by its last round that went to `capabilities`, mean over seeds.

    >>> rows = [RunRow("uniform", 0, 1, {"a": 30, "b": 10}, {"a": 0.5, "b": 0.5}, {"a": 9, "b": 9})]
    >>> weak_share(rows, "uniform", ["a"])
    0.75
    """
    shares = []
    for run in _runs(rows, arm, capabilities).values():
        total = sum(run[-1].samples_trained.values())
        if total:
            shares.append(sum(run[-1].samples_trained.get(capability, 0) for capability in capabilities) / total)
    return stats.fmean(shares) if shares else math.nan


def final_accuracy(rows: Iterable[RunRow], arm: str) -> dict[str, dict[str, float]]:
    """Per capability and their `MEAN`: the arm's last-round accuracy over seeds (mean, std, min, max),
    the round-0 accuracy (`base`) and the gain of the mean over it.

    >>> rows = [RunRow("uniform", seed, r, {}, {"a": 0.2 + r * (0.1 + seed / 10)}, {"a": 9})
    ...         for seed in (0, 1) for r in (0, 1)]
    >>> {key: round(value, 3) for key, value in final_accuracy(rows, "uniform")["a"].items()}
    {'mean': 0.35, 'std': 0.071, 'min': 0.3, 'max': 0.4, 'base': 0.2, 'gain': 0.15}
    """
    runs = [run for run in _runs(rows, arm).values() if run[0].round == 0]
    finals = [_with_mean(run[-1].heldout_accuracy) for run in runs]
    bases = [_with_mean(run[0].heldout_accuracy) for run in runs]
    out: dict[str, dict[str, float]] = {}
    for capability in sorted({cap for final in finals for cap in final}, key=lambda cap: (cap == MEAN, cap)):
        values = [final[capability] for final in finals if capability in final]
        base = stats.fmean(b[capability] for b in bases if capability in b)
        out[capability] = {"mean": stats.fmean(values), "std": stats.stdev(values) if len(values) > 1 else 0.0,
                           "min": min(values), "max": max(values), "base": base, "gain": stats.fmean(values) - base}
    return out


def _with_mean(accuracy: dict[str, float]) -> dict[str, float]:
    return accuracy | ({MEAN: stats.fmean(accuracy.values())} if accuracy else {})


def gain_curve(rows: Iterable[RunRow], arm: str, capabilities: Sequence[str]) -> list[tuple[float, float]]:
    """(total samples trained, gain over round 0) per round, each the mean over the arm's seeds."""
    by_round: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for run in _runs(rows, arm, capabilities).values():
        base = _mean_accuracy(run[0], capabilities)
        for row in run:
            by_round[row.round].append((sum(row.samples_trained.values()), _mean_accuracy(row, capabilities) - base))
    return [(stats.fmean(s for s, _ in points), stats.fmean(g for _, g in points))
            for _, points in sorted(by_round.items())]


def paired_bootstrap(differences: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> Interval:
    """Mean of per-seed `differences` and the 2.5–97.5 percentile interval of resampled means.

    >>> interval = paired_bootstrap([0.1, 0.2, 0.3])
    >>> round(interval.mean, 3), 0.1 <= interval.low < interval.mean < interval.high <= 0.3
    (0.2, True)
    """
    if not differences:
        return Interval(math.nan, math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(stats.fmean(rng.choices(differences, k=len(differences))) for _ in range(resamples))
    return Interval(stats.fmean(differences), means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))])


def samples_to_reach(curve: Sequence[tuple[float, float]], gain: float) -> float:
    """Samples at which a gain curve first reaches `gain`, interpolated linearly; ``inf`` if it never does.

    >>> samples_to_reach([(0, 0.0), (100, 0.1), (200, 0.3)], 0.2)
    150.0
    """
    for (s0, g0), (s1, g1) in zip(curve, curve[1:]):
        if g0 >= gain:
            return s0
        if g1 >= gain:
            return s0 + (s1 - s0) * (gain - g0) / (g1 - g0)
    return curve[0][0] if curve and curve[0][1] >= gain else math.inf


def sample_efficiency(rows: Sequence[RunRow], arm: str, capabilities: Sequence[str],
                      reference: str = REFERENCE_ARM) -> float | None:
    """Samples the reference needs over samples the arm needs, at the largest gain both reach."""
    mine, theirs = gain_curve(rows, arm, capabilities), gain_curve(rows, reference, capabilities)
    if not mine or not theirs:
        return None
    gain = min(mine[-1][1], theirs[-1][1])
    if gain <= 0:
        return None
    return samples_to_reach(theirs, gain) / samples_to_reach(mine, gain)


def _difference(rows: Sequence[RunRow], arm: str, reference: str, capabilities: Sequence[str]) -> Interval:
    mine, theirs = run_gains(rows, arm, capabilities), run_gains(rows, reference, capabilities)
    return paired_bootstrap([mine[seed] - theirs[seed] for seed in sorted(set(mine) & set(theirs))])


def summarise_arm(rows: Sequence[RunRow], arm: str, weak: Sequence[str], reference: str = REFERENCE_ARM) -> ArmSummary:
    """`arm` against `reference`: on the `weak` capabilities and on the mean over all capabilities."""
    everything = sorted({capability for row in rows for capability in row.heldout_accuracy})
    weak_gains, mean_gains = run_gains(rows, arm, weak), run_gains(rows, arm, everything)
    return ArmSummary(
        arm=arm,
        seeds=len(weak_gains),
        weak_share=weak_share(rows, arm, weak),
        weak_gain=stats.fmean(weak_gains.values()) if weak_gains else math.nan,
        mean_gain=stats.fmean(mean_gains.values()) if mean_gains else math.nan,
        weak_difference=_difference(rows, arm, reference, weak),
        mean_difference=_difference(rows, arm, reference, everything),
        sample_efficiency=sample_efficiency(rows, arm, weak, reference),
    )
