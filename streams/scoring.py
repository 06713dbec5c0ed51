"""Per-capability weakness from graded outcomes and divergences: pure functions, no Kafka.

Evidence: an `EvalOutcome` is one observation with error ``1 - score`` and weight 1; a `Divergence`
(AuditDM) is an error with weight ``divergence_weight * consensus_strength``. Each has an idempotency
key (``outcome_id`` / ``divergence_id``) and a last-writer-wins stamp ``(ts, event_id)``.

State (`CapabilityState`): for the newest `keep_versions` policy versions (the window), the winning
observation per key. A duplicate changes nothing, a re-run of the same (policy version, suite, item)
replaces the earlier one, and any delivery order gives the same state. When a version leaves the
window, its observations are folded, in version order, into decayed sums and a short per-version
history (for the trend), so the state stays bounded. Evidence for an already folded version can no
longer be deduplicated and is ignored (`Applied.LATE`).

Summary (`summarise`): an exponentially decayed error rate with a half-life in policy versions (age
= versions behind the newest) or in events (age = number of newer observations); the effective
sample count (the decayed weight); an equal-tailed credible interval of the Beta posterior with
prior ``Beta(prior_errors, prior_successes)``; and the trend, the weighted least-squares slope of
per-version error rates (negative: improving).

Example:
    >>> from dpe.events import EvalOutcome
    >>> params = ScoringSettings(taxonomy=("counting",))
    >>> state = CapabilityState()
    >>> for i, score in enumerate([1.0, 0.0, 0.0, 1.0]):
    ...     outcome = EvalOutcome(policy_version=1, suite="s", item_id=f"i{i}", capability="counting",
    ...                           answer_type="number", expected="3", predicted="3", correct=score == 1.0, score=score)
    ...     apply(state, outcome_evidence(outcome, params), params).value
    'applied'
    'applied'
    'applied'
    'applied'
    >>> weakness = summarise(state, params)
    >>> weakness.error_rate, weakness.effective_n, weakness.events
    (0.5, 4.0, 4)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable

from dpe.bus.codec import InvalidEvent
from dpe.events import CapabilityWeakness, Divergence, EvalOutcome
from streams.beta import credible_interval
from streams.settings import ScoringSettings

Observation = tuple[float, str, float, float]
"""``(ts, event_id, error, weight)``; tuples compare in last-writer-wins order."""


@dataclass(frozen=True, slots=True)
class Evidence:
    """One observation about one capability, with its idempotency key and policy version."""

    capability: str
    key: str
    version: int
    observation: Observation


class Applied(str, Enum):
    """What applying one piece of evidence did to a state."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    SUPERSEDED = "superseded"
    LATE = "late"


class RejectedEvidence(InvalidEvent):
    """Evidence the stream refuses (unknown capability, score not in [0, 1]); it is dead-lettered."""

    def __init__(self, error_class: str, message: str):
        super().__init__(error_class, message, stage="weakness.score")


def _known_capability(capability: str, params: ScoringSettings) -> str:
    if not params.open_taxonomy and capability not in params.taxonomy:
        raise RejectedEvidence(
            "UnknownCapability", f"capability {capability!r} is not in the taxonomy {list(params.taxonomy)}"
        )
    return capability


def _unit_interval(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise RejectedEvidence("InvalidScore", f"{name} {value!r} is not a number in [0, 1]")
    return float(value)


def outcome_evidence(outcome: EvalOutcome, params: ScoringSettings) -> Evidence:
    """An eval outcome as evidence: error ``1 - score``, weight 1, keyed by its ``outcome_id``."""
    capability = _known_capability(outcome.capability, params)
    score = _unit_interval(outcome.score, "score")
    return Evidence(capability, "o:" + outcome.outcome_id, outcome.policy_version,
                    (outcome.ts.timestamp(), outcome.event_id, 1.0 - score, 1.0))


def divergence_evidence(divergence: Divergence, params: ScoringSettings) -> Evidence:
    """A divergence as evidence: an error weighted by ``divergence_weight * consensus_strength``."""
    capability = _known_capability(divergence.capability, params)
    strength = _unit_interval(divergence.consensus_strength, "consensus_strength")
    return Evidence(capability, "d:" + divergence.divergence_id, divergence.policy_version,
                    (divergence.ts.timestamp(), divergence.event_id, 1.0, params.divergence_weight * strength))


@dataclass
class CapabilityState:
    """Everything the stream keeps about one capability; bounded by `keep_versions` and `trend_versions`.

    `revision` counts the writes of this state to its table (it orders the reports of two workers);
    it is not part of the scoring state, so it is left out of equality.
    """

    newest: int = -1
    folded_through: int = -1
    window: dict[int, dict[str, Observation]] = field(default_factory=dict)
    folded_weight: float = 0.0
    folded_errors: float = 0.0
    folded_version: int = -1
    folded_count: int = 0
    history: list[tuple[int, float, float]] = field(default_factory=list)
    revision: int = field(default=0, compare=False)


def apply(state: CapabilityState, evidence: Evidence, params: ScoringSettings) -> Applied:
    """Add `evidence` to `state` in place (idempotent: duplicates and older re-runs change nothing)."""
    if evidence.version <= state.folded_through:
        return Applied.LATE
    observations = state.window.setdefault(evidence.version, {})
    current = observations.get(evidence.key)
    if current is not None and current >= evidence.observation:
        return Applied.DUPLICATE if current == evidence.observation else Applied.SUPERSEDED
    observations[evidence.key] = evidence.observation
    if evidence.version > state.newest:
        state.newest = evidence.version
        limit = state.newest - params.keep_versions
        for version in sorted(v for v in state.window if v <= limit):
            _fold(state, version, state.window.pop(version), params)
        state.folded_through = max(state.folded_through, limit)
    return Applied.APPLIED


def _newest_first(window: dict[int, dict[str, Observation]]) -> list[Observation]:
    """Observations ordered newest first: by policy version, then (ts, event_id), then key."""
    ranked = sorted(
        ((version, obs[0], obs[1], key), obs) for version, observations in window.items()
        for key, obs in observations.items()
    )
    return [obs for _, obs in reversed(ranked)]


def _decay(age: float, params: ScoringSettings) -> float:
    return 2.0 ** (-age / params.half_life)


def _fold(state: CapabilityState, version: int, observations: dict[str, Observation], params: ScoringSettings) -> None:
    weight = math.fsum(obs[3] for obs in observations.values())
    errors = math.fsum(obs[3] * obs[2] for obs in observations.values())
    state.history = [*state.history, (version, weight, errors)][-params.trend_versions:]
    state.folded_count += len(observations)
    if params.half_life_unit == "versions":
        carried = _decay(version - state.folded_version, params)
    else:
        ranked = _newest_first({version: observations})
        carried = _decay(len(ranked), params)
        weight = math.fsum(obs[3] * _decay(rank, params) for rank, obs in enumerate(ranked))
        errors = math.fsum(obs[3] * obs[2] * _decay(rank, params) for rank, obs in enumerate(ranked))
    state.folded_weight = state.folded_weight * carried + weight
    state.folded_errors = state.folded_errors * carried + errors
    state.folded_version = version


def _decayed_terms(state: CapabilityState, params: ScoringSettings) -> list[tuple[float, float]]:
    """(weight, weighted error) of every window observation and of the folded sums, decayed to now."""
    if params.half_life_unit == "versions":
        terms = [
            (obs[3] * factor, obs[3] * obs[2] * factor)
            for version, observations in state.window.items()
            for factor in (_decay(state.newest - version, params),)
            for obs in observations.values()
        ]
        folded = _decay(state.newest - state.folded_version, params)
    else:
        terms = [(obs[3] * _decay(rank, params), obs[3] * obs[2] * _decay(rank, params))
                 for rank, obs in enumerate(_newest_first(state.window))]
        folded = _decay(len(terms), params)
    terms.append((state.folded_weight * folded, state.folded_errors * folded))
    return terms


def _trend(state: CapabilityState, params: ScoringSettings) -> float:
    """Weighted least-squares slope of per-version error rates over the last `trend_versions` versions."""
    window = [
        (version, math.fsum(o[3] for o in obs.values()), math.fsum(o[3] * o[2] for o in obs.values()))
        for version, obs in state.window.items()
    ]
    points = [p for p in sorted([*state.history, *window]) if p[1] > 0][-params.trend_versions:]
    if len({p[0] for p in points}) < 2:
        return 0.0
    total = math.fsum(w for _, w, _ in points)
    mean_x = math.fsum(w * v for v, w, _ in points) / total
    mean_y = math.fsum(e for _, _, e in points) / total
    covariance = math.fsum(w * (v - mean_x) * (e / w - mean_y) for v, w, e in points)
    variance = math.fsum(w * (v - mean_x) ** 2 for v, w, _ in points)
    return covariance / variance


def summarise(state: CapabilityState, params: ScoringSettings) -> CapabilityWeakness:
    """The rolling weakness of one capability (a state without evidence gives the prior)."""
    terms = _decayed_terms(state, params)
    weight = math.fsum(w for w, _ in terms)
    errors = min(math.fsum(e for _, e in terms), weight)
    prior_errors, prior_successes = params.prior_errors, params.prior_successes
    rate = errors / weight if weight > 0 else prior_errors / (prior_errors + prior_successes)
    low, high = credible_interval(prior_errors + errors, prior_successes + weight - errors, params.credible_level)
    return CapabilityWeakness(
        error_rate=min(max(rate, 0.0), 1.0),
        effective_n=weight,
        ci_low=low,
        ci_high=high,
        events=state.folded_count + sum(len(obs) for obs in state.window.values()),
        trend=_trend(state, params),
    )


def replay(evidence: Iterable[Evidence], params: ScoringSettings) -> dict[str, CapabilityState]:
    """States from a sequence of evidence, e.g. recomputed from a topic's log.

    >>> replay([], ScoringSettings(taxonomy=("counting",)))
    {}
    """
    states: dict[str, CapabilityState] = {}
    for item in evidence:
        apply(states.setdefault(item.capability, CapabilityState()), item, params)
    return states


def dump_state(state: CapabilityState) -> bytes:
    """Compact JSON of a state (the table changelog value); `load_state` reads it back exactly."""
    return json.dumps(
        {
            "newest": state.newest,
            "folded_through": state.folded_through,
            "window": {str(version): obs for version, obs in state.window.items()},
            "folded": [state.folded_weight, state.folded_errors, state.folded_version, state.folded_count],
            "history": state.history,
            "revision": state.revision,
        },
        separators=(",", ":"),
    ).encode()


def load_state(raw: bytes) -> CapabilityState:
    """The state `dump_state` wrote.

    >>> s = CapabilityState(newest=2, window={2: {"o:2/s/i": (1.5, "e", 1.0, 1.0)}}, revision=7)
    >>> restored = load_state(dump_state(s))
    >>> restored == s, restored.revision
    (True, 7)
    """
    data = json.loads(raw)
    weight, errors, version, count = data["folded"]
    return CapabilityState(
        newest=data["newest"],
        folded_through=data["folded_through"],
        window={int(v): {key: tuple(obs) for key, obs in observations.items()}
                for v, observations in data["window"].items()},
        folded_weight=weight,
        folded_errors=errors,
        folded_version=version,
        folded_count=count,
        history=[tuple(point) for point in data["history"]],
        revision=data["revision"],
    )
