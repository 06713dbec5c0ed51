"""Quota strategies: pure functions from a weakness snapshot to per-capability sample quotas.

A strategy turns a `WeaknessSnapshot` into non-negative weights; `allocate` turns weights into
integer quotas that every strategy shares: per-capability floors and caps, a total budget, no
capability starved (floor at least 1 whenever the budget covers every capability), and the rounding
remainder handed out deterministically (largest fractional part, then larger weight, then name), so
quotas sum exactly to the budget unless the caps forbid it.

Strategies (`STRATEGIES`):

- ``dpe_step``: the DPE paper's step weights on accuracy (< 0.70 → 2.0, < 0.75 → 1.5, < 0.85 → 1.0,
  < 0.90 → 0.8, else 0.5);
- ``proportional``: weight = error rate;
- ``uniform``: the control arm, equal weights;
- ``learning_progress``: weak *and* still improving. Weakness is the lower credible bound of the
  error rate, so a capability seen 3 times cannot drive the mix like one seen 3000 times; progress is
  the error-rate decrease per policy version (one training round each), discounted by how much
  evidence backs it, relative to the best-progressing capability;
- ``static``: the step weights of the first plan, kept for every later round (`PLANNED_ONCE`): the
  arm that diagnoses the base once and never re-plans. The planner keeps those weights; a
  capability they do not name gets no samples.

Example:
    >>> from dpe.events import CapabilityWeakness, WeaknessSnapshot
    >>> w = lambda e: CapabilityWeakness(error_rate=e, effective_n=100, ci_low=e, ci_high=e, events=100)
    >>> snapshot = WeaknessSnapshot(seq=0, policy_version=1, events_total=200,
    ...                             capabilities={"chart": w(0.4), "color": w(0.05)})
    >>> plan = plan_quotas(snapshot, QuotaSettings(budget=100), round=0)
    >>> plan.weights, plan.quotas
    ({'chart': 2.0, 'color': 0.5}, {'chart': 80, 'color': 20})
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

from dpe.events import QuotaPlan, WeaknessSnapshot
from streams.settings import QuotaSettings, StrategyName

Weights = dict[str, float]
Strategy = Callable[[WeaknessSnapshot, QuotaSettings], Weights]

STEP_WEIGHTS: tuple[tuple[float, float], ...] = ((0.70, 2.0), (0.75, 1.5), (0.85, 1.0), (0.90, 0.8))
"""(accuracy below this, weight) in order; any higher accuracy weighs `TOP_WEIGHT`."""
TOP_WEIGHT = 0.5


def step_weight(accuracy: float) -> float:
    """The DPE paper's weight for a capability's accuracy.

    >>> [step_weight(a) for a in (0.5, 0.7, 0.8, 0.89, 0.95)]
    [2.0, 1.5, 1.0, 0.8, 0.5]
    """
    return next((weight for bound, weight in STEP_WEIGHTS if accuracy < bound), TOP_WEIGHT)


def dpe_step(snapshot: WeaknessSnapshot, params: QuotaSettings) -> Weights:
    """Step weights on accuracy = 1 - decayed error rate."""
    return {name: step_weight(1.0 - cap.error_rate) for name, cap in snapshot.capabilities.items()}


def proportional(snapshot: WeaknessSnapshot, params: QuotaSettings) -> Weights:
    """Weights proportional to the decayed error rate."""
    return {name: cap.error_rate for name, cap in snapshot.capabilities.items()}


def uniform(snapshot: WeaknessSnapshot, params: QuotaSettings) -> Weights:
    """Equal weights: the control arm that shows whether targeting, not data volume, makes the gain."""
    return {name: 1.0 for name in snapshot.capabilities}


def learning_progress(snapshot: WeaknessSnapshot, params: QuotaSettings) -> Weights:
    """Confident weakness times (exploration + relative, evidence-discounted progress).

    progress_i = max(0, -trend_i) * n_i / (n_i + progress_confidence_n); weight_i = ci_low_i *
    (exploration + progress_i / max_j progress_j). Without any measured progress this is
    proportional to the lower credible bound of the error rate.
    """
    progress = {
        name: max(0.0, -cap.trend) * cap.effective_n / (cap.effective_n + params.progress_confidence_n)
        for name, cap in snapshot.capabilities.items()
    }
    best = max(progress.values(), default=0.0)
    return {
        name: cap.ci_low * (params.exploration + (progress[name] / best if best > 0 else 0.0))
        for name, cap in snapshot.capabilities.items()
    }


STRATEGIES: dict[StrategyName, Strategy] = {
    "dpe_step": dpe_step,
    "proportional": proportional,
    "uniform": uniform,
    "learning_progress": learning_progress,
    "static": dpe_step,
}

PLANNED_ONCE: frozenset[StrategyName] = frozenset({"static"})
"""Strategies whose first plan's weights serve every later round (`plan_quotas`' `weights`)."""


def _bounds(names: list[str], params: QuotaSettings) -> tuple[dict[str, int], dict[str, int | None]]:
    """Effective floors (>= 1 when the budget covers everyone, scaled down when they exceed it) and caps."""
    budget = params.budget
    floors = {name: params.floors.get(name, params.floor) for name in names}
    if budget >= len(names):
        floors = {name: max(floor, 1) for name, floor in floors.items()}
    if sum(floors.values()) > budget:
        fair = budget // len(names)
        floors = {name: min(floor, fair) for name, floor in floors.items()}
    caps = {name: params.caps.get(name, params.cap) for name in names}
    return floors, {name: None if cap is None else max(cap, floors[name]) for name, cap in caps.items()}


def _clamp(value: Fraction, low: int, high: int | None) -> Fraction:
    return max(Fraction(low), value if high is None else min(value, Fraction(high)))


def _water_fill(weights: dict[str, Fraction], floors: dict[str, int], caps: dict[str, int | None],
                budget: int) -> dict[str, Fraction]:
    """Exact shares q_i = clamp(lam * w_i, floor_i, cap_i) with the largest lam such that sum q_i <= budget.

    The sum is piecewise linear in lam with breakpoints at floor_i / w_i and cap_i / w_i: find the
    segment where it reaches the budget, then solve the linear equation on it.
    """
    def total(lam: Fraction) -> Fraction:
        return sum((_clamp(lam * w, floors[n], caps[n]) for n, w in weights.items()), Fraction(0))

    breakpoints = sorted({Fraction(bound) / w for n, w in weights.items() if w > 0
                          for bound in (floors[n], caps[n]) if bound is not None})
    low = Fraction(0)
    for point in breakpoints:
        if total(point) >= budget:
            break
        low = point
    slope = sum((w for n, w in weights.items()
                 if w > 0 and low * w >= floors[n] and (caps[n] is None or low * w < caps[n])), Fraction(0))
    lam = low + (budget - total(low)) / slope if slope > 0 else low
    return {n: _clamp(lam * w, floors[n], caps[n]) for n, w in weights.items()}


def allocate(weights: Weights, params: QuotaSettings) -> dict[str, int]:
    """Integer quotas from weights, within floors, caps and the budget (see the module docstring).

    >>> allocate({"a": 1.0, "b": 1.0, "c": 1.0}, QuotaSettings(budget=10))
    {'a': 4, 'b': 3, 'c': 3}
    >>> allocate({"a": 9.0, "b": 0.0}, QuotaSettings(budget=10, floor=2))
    {'a': 8, 'b': 2}
    """
    names = sorted(weights)
    if not names:
        return {}
    exact = {n: Fraction(max(weights[n], 0.0)) for n in names}
    if not any(exact.values()):
        exact = {n: Fraction(1) for n in names}
    floors, caps = _bounds(names, params)
    shares = _water_fill(exact, floors, caps, params.budget)
    if sum(shares.values()) < params.budget:
        # every weighted capability is at its cap: the rest goes evenly to those still below theirs
        shares = _water_fill({n: Fraction(1) for n in names}, {n: int(s) for n, s in shares.items()}, caps,
                             params.budget)
    quotas = {n: math.floor(share) for n, share in shares.items()}
    remainder = int(sum(shares.values())) - sum(quotas.values())
    by_fraction = sorted(names, key=lambda n: (-(shares[n] - quotas[n]), -exact[n], n))
    for name in by_fraction[:remainder]:
        quotas[name] += 1
    return quotas


def plan_quotas(snapshot: WeaknessSnapshot, params: QuotaSettings, round: int, *, producer: str = "dpe",
                weights: Weights | None = None) -> QuotaPlan:
    """The quota plan of `params.strategy` for `snapshot`, naming the snapshot it came from.

    `weights`, when given, replace the strategy's (a `PLANNED_ONCE` strategy's first weights).
    """
    weights = STRATEGIES[params.strategy](snapshot, params) if weights is None else weights
    return QuotaPlan(
        producer=producer,
        round=round,
        strategy=params.strategy,
        budget=params.budget,
        quotas=allocate(weights, params),
        weights=weights,
        snapshot_id=snapshot.snapshot_id,
        policy_version=snapshot.policy_version,
    )
