"""Per-capability weakness from graded outcomes and divergences: pure functions, no Kafka.

Evidence: an `EvalOutcome` is one observation with error ``1 - score`` and weight 1; a `Divergence`
(AuditDM: an audited probe the references agreed on) is an error if the target diverged and a success
if it matched, with weight ``divergence_weight * consensus_strength``. Each has an idempotency
key (``outcome_id`` / ``divergence_id``) and a last-writer-wins stamp ``(ts, event_id)``.

State (`CapabilityState`): one ledger per evidence source (outcomes, divergences), because the two
arrive on separate topics that a worker may read at different speeds. A ledger keeps, for the newest
`keep_versions` policy versions of its source (the window), the winning observation per key. A
duplicate changes nothing, a re-run of the same (policy version, suite, item) replaces the earlier
one, and any delivery order of a source's evidence, interleaved in any way with the other source,
gives the same state. When a version leaves a ledger's window its observations are folded, in
version order, into decayed sums and a short per-version history (for the trend), so the state
stays bounded. Evidence for a version its ledger has already folded can no longer be deduplicated
and is ignored (`Applied.LATE`): with versions published in order, only a replay from far back
produces it.

Reach: versions come one checkpoint at a time, so no single event may move a state far ahead (it
would make every later version "late" and freeze the state). Evidence more than `MAX_VERSION_LEAP`
versions ahead of everything the state holds is refused (`VersionTooFarAhead`, dead-lettered) when
its source's ledger already has evidence; a source's first evidence is taken as it comes (sources
may be read at very different speeds), but if it stays that ledger's only observation and evidence
of the same source arrives far behind it, it was the outlier and is dropped. Either order of one
outlier and the good evidence of its source gives the same state.

Summary (`summarise`): an exponentially decayed error rate with a half-life in policy versions (age
= versions behind the newest version of any source) or in events (age = number of newer
observations of the same source); the effective sample count (the decayed weight); an equal-tailed
credible interval of the Beta posterior with prior ``Beta(prior_errors, prior_successes)``; and the
trend, the weighted least-squares slope of per-version error rates (negative: improving).

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
from contextlib import suppress
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable

from dpe.bus.codec import InvalidEvent
from dpe.events import CapabilityWeakness, Divergence, EvalOutcome
from streams.beta import credible_interval
from streams.settings import ScoringSettings

OUTCOME = "outcome"
"""The evidence source of eval outcomes (divergences are the other)."""

MAX_VERSION_LEAP = 1000
"""Most policy versions evidence may be ahead of the newest version a state holds."""

Observation = tuple[float, str, float, float]
"""``(ts, event_id, error, weight)``; tuples compare in last-writer-wins order."""


@dataclass(frozen=True, slots=True)
class Evidence:
    """One observation about one capability from one source, with its idempotency key and policy version."""

    capability: str
    source: str
    key: str
    version: int
    observation: Observation


class Applied(str, Enum):
    """What applying one piece of evidence did to a state."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    SUPERSEDED = "superseded"
    LATE = "late"
    MEASURE_ONLY = "measure_only"


class RejectedEvidence(InvalidEvent):
    """Evidence the stream refuses (unknown capability, score not in [0, 1], version far ahead); it is
    dead-lettered."""

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


def outcome_evidence(outcome: EvalOutcome, params: ScoringSettings) -> Evidence | None:
    """An eval outcome as evidence: error ``1 - score``, weight 1, keyed by its ``outcome_id``
    (None for a suite in `measure_only_suites`)."""
    capability = _known_capability(outcome.capability, params)
    if outcome.suite in params.measure_only_suites:
        return None
    score = _unit_interval(outcome.score, "score")
    return Evidence(capability, OUTCOME, outcome.outcome_id, outcome.policy_version,
                    (outcome.ts.timestamp(), outcome.event_id, 1.0 - score, 1.0))


def divergence_evidence(divergence: Divergence, params: ScoringSettings) -> Evidence:
    """An audited probe as evidence: an error if the target diverged, else a success, weighted by
    ``divergence_weight * consensus_strength``."""
    capability = _known_capability(divergence.capability, params)
    strength = _unit_interval(divergence.consensus_strength, "consensus_strength")
    error = 1.0 if divergence.diverged else 0.0
    return Evidence(capability, "divergence", divergence.divergence_id, divergence.policy_version,
                    (divergence.ts.timestamp(), divergence.event_id, error, params.divergence_weight * strength))


@dataclass
class Ledger:
    """The evidence of one source about one capability: a window of recent versions plus folded sums."""

    newest: int = -1
    folded_through: int = -1
    window: dict[int, dict[str, Observation]] = field(default_factory=dict)
    folded_weight: float = 0.0
    folded_errors: float = 0.0
    folded_version: int = -1
    folded_count: int = 0
    history: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def events(self) -> int:
        """Distinct observations, folded or not."""
        return self.folded_count + sum(len(observations) for observations in self.window.values())


@dataclass
class CapabilityState:
    """Everything the stream keeps about one capability; bounded by `keep_versions` and `trend_versions`.

    `revision` counts the writes of this state to its table (it orders the reports of two workers);
    it is not part of the scoring state, so it is left out of equality.
    """

    ledgers: dict[str, Ledger] = field(default_factory=dict)
    revision: int = field(default=0, compare=False)

    @property
    def newest(self) -> int:
        """Newest policy version in any source's evidence (-1: none)."""
        return max((ledger.newest for ledger in self.ledgers.values()), default=-1)

    def outcomes_at(self, version: int) -> int:
        """Distinct eval outcomes of `version` (0 once that version has been folded)."""
        ledger = self.ledgers.get(OUTCOME)
        return len(ledger.window.get(version, {})) if ledger is not None else 0


def apply(state: CapabilityState, evidence: Evidence, params: ScoringSettings) -> Applied:
    """Add `evidence` to `state` in place (idempotent: duplicates and older re-runs change nothing).

    Raises `RejectedEvidence` for evidence out of reach (see the module docstring), leaving `state` as it was.
    """
    ledger = _ledger_for(state, evidence)
    _check_reach(state, ledger, evidence)
    if evidence.version <= ledger.folded_through:
        return Applied.LATE
    observations = ledger.window.setdefault(evidence.version, {})
    current = observations.get(evidence.key)
    if current is not None and current >= evidence.observation:
        return Applied.DUPLICATE if current == evidence.observation else Applied.SUPERSEDED
    observations[evidence.key] = evidence.observation
    if evidence.version > ledger.newest:
        ledger.newest = evidence.version
        limit = ledger.newest - params.keep_versions
        for version in sorted(v for v in ledger.window if v <= limit):
            _fold(ledger, version, ledger.window.pop(version), params)
        ledger.folded_through = max(ledger.folded_through, limit)
    return Applied.APPLIED


def _ledger_for(state: CapabilityState, evidence: Evidence) -> Ledger:
    """The ledger of `evidence`'s source: a new one if there is none, or if its only observation is more
    than MAX_VERSION_LEAP versions ahead of `evidence` (that observation was the outlier).

    >>> outlier = Ledger(newest=10**8, window={10**8: {"k": (0.0, "e", 1.0, 1.0)}})
    >>> state = CapabilityState(ledgers={"outcome": outlier})
    >>> _ledger_for(state, Evidence("counting", "outcome", "3/s/i", 3, (0.0, "f", 0.0, 1.0))) is outlier
    False
    >>> state.ledgers["outcome"].events
    0
    """
    ledger = state.ledgers.get(evidence.source)
    if ledger is None or (ledger.events == 1 and ledger.newest - evidence.version > MAX_VERSION_LEAP):
        ledger = state.ledgers[evidence.source] = Ledger()
    return ledger


def _check_reach(state: CapabilityState, ledger: Ledger, evidence: Evidence) -> None:
    """Refuse `evidence` whose version is more than MAX_VERSION_LEAP ahead of all of `state`, unless
    its `ledger` is still empty."""
    leap = evidence.version - state.newest
    if ledger.newest >= 0 and leap > MAX_VERSION_LEAP:
        raise RejectedEvidence(
            "VersionTooFarAhead",
            f"policy version {evidence.version} is {leap} versions ahead of the newest evidence about "
            f"{evidence.capability!r} ({state.newest}); at most {MAX_VERSION_LEAP} are believed",
        )


def _newest_first(window: dict[int, dict[str, Observation]]) -> list[Observation]:
    """Observations ordered newest first: by policy version, then (ts, event_id), then key."""
    ranked = sorted(
        ((version, obs[0], obs[1], key), obs) for version, observations in window.items()
        for key, obs in observations.items()
    )
    return [obs for _, obs in reversed(ranked)]


def _decay(age: float, params: ScoringSettings) -> float:
    return 2.0 ** (-age / params.half_life)


def _fold(ledger: Ledger, version: int, observations: dict[str, Observation], params: ScoringSettings) -> None:
    weight = math.fsum(obs[3] for obs in observations.values())
    errors = math.fsum(obs[3] * obs[2] for obs in observations.values())
    ledger.history = [*ledger.history, (version, weight, errors)][-params.trend_versions:]
    ledger.folded_count += len(observations)
    if params.half_life_unit == "versions":
        carried = _decay(version - ledger.folded_version, params)
    else:
        ranked = _newest_first({version: observations})
        carried = _decay(len(ranked), params)
        weight = math.fsum(obs[3] * _decay(rank, params) for rank, obs in enumerate(ranked))
        errors = math.fsum(obs[3] * obs[2] * _decay(rank, params) for rank, obs in enumerate(ranked))
    ledger.folded_weight = ledger.folded_weight * carried + weight
    ledger.folded_errors = ledger.folded_errors * carried + errors
    ledger.folded_version = version


def _decayed_terms(ledger: Ledger, newest: int, params: ScoringSettings) -> list[tuple[float, float]]:
    """(weight, weighted error) of every window observation and of the folded sums, decayed to now.

    In versions, age counts from `newest` (of any source); in events, from the ledger's own newest.
    """
    if params.half_life_unit == "versions":
        terms = [
            (obs[3] * factor, obs[3] * obs[2] * factor)
            for version, observations in ledger.window.items()
            for factor in (_decay(newest - version, params),)
            for obs in observations.values()
        ]
        folded = _decay(newest - ledger.folded_version, params)
    else:
        terms = [(obs[3] * _decay(rank, params), obs[3] * obs[2] * _decay(rank, params))
                 for rank, obs in enumerate(_newest_first(ledger.window))]
        folded = _decay(len(terms), params)
    terms.append((ledger.folded_weight * folded, ledger.folded_errors * folded))
    return terms


def _per_version(ledger: Ledger) -> list[tuple[int, float, float]]:
    """(version, weight, weighted errors) of every version the ledger remembers, undecayed."""
    window = [
        (version, math.fsum(o[3] for o in obs.values()), math.fsum(o[3] * o[2] for o in obs.values()))
        for version, obs in ledger.window.items()
    ]
    return [*ledger.history, *window]


def _trend(state: CapabilityState, params: ScoringSettings) -> float:
    """Weighted least-squares slope of per-version error rates over the last `trend_versions` versions."""
    by_version: dict[int, list[tuple[float, float]]] = {}
    for ledger in state.ledgers.values():
        for version, weight, errors in _per_version(ledger):
            by_version.setdefault(version, []).append((weight, errors))
    points = [(version, math.fsum(w for w, _ in sums), math.fsum(e for _, e in sums))
              for version, sums in sorted(by_version.items())]
    points = [p for p in points if p[1] > 0][-params.trend_versions:]
    if len(points) < 2:
        return 0.0
    total = math.fsum(w for _, w, _ in points)
    mean_x = math.fsum(w * v for v, w, _ in points) / total
    mean_y = math.fsum(e for _, _, e in points) / total
    covariance = math.fsum(w * (v - mean_x) * (e / w - mean_y) for v, w, e in points)
    variance = math.fsum(w * (v - mean_x) ** 2 for v, w, _ in points)
    return covariance / variance


def _divergence_scale(outcome_weight: float, divergence_weight: float, params: ScoringSettings) -> float:
    """The factor that keeps divergences within `divergence_share` of the evidence weight (1 without
    outcomes: then divergences are all there is).

    >>> _divergence_scale(30.0, 90.0, ScoringSettings(divergence_share=0.25))
    0.1111111111111111
    """
    share = params.divergence_share
    if outcome_weight <= 0 or divergence_weight <= 0 or share >= 1:
        return 1.0
    return min(1.0, share * outcome_weight / ((1 - share) * divergence_weight))


def summarise(state: CapabilityState, params: ScoringSettings) -> CapabilityWeakness:
    """The rolling weakness of one capability (a state without evidence gives the prior)."""
    newest = state.newest
    outcomes = _decayed_terms(state.ledgers[OUTCOME], newest, params) if OUTCOME in state.ledgers else []
    others = [term for source, ledger in state.ledgers.items() if source != OUTCOME
              for term in _decayed_terms(ledger, newest, params)]
    scale = _divergence_scale(math.fsum(w for w, _ in outcomes), math.fsum(w for w, _ in others), params)
    terms = outcomes + [(w * scale, e * scale) for w, e in others]
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
        events=sum(ledger.events for ledger in state.ledgers.values()),
        trend=_trend(state, params),
    )


def replay(evidence: Iterable[Evidence], params: ScoringSettings) -> dict[str, CapabilityState]:
    """States from a sequence of evidence, e.g. recomputed from the topics' logs; refused evidence is
    left out, as the stream dead-letters it.

    >>> replay([], ScoringSettings(taxonomy=("counting",)))
    {}
    """
    states: dict[str, CapabilityState] = {}
    for item in evidence:
        with suppress(RejectedEvidence):
            apply(states.setdefault(item.capability, CapabilityState()), item, params)
    return states


def dump_state(state: CapabilityState) -> bytes:
    """Compact JSON of a state (the table changelog value); `load_state` reads it back exactly."""
    ledgers = {
        source: {
            "newest": ledger.newest,
            "folded_through": ledger.folded_through,
            "window": {str(version): obs for version, obs in ledger.window.items()},
            "folded": [ledger.folded_weight, ledger.folded_errors, ledger.folded_version, ledger.folded_count],
            "history": ledger.history,
        }
        for source, ledger in state.ledgers.items()
    }
    return json.dumps({"ledgers": ledgers, "revision": state.revision}, separators=(",", ":")).encode()


def _load_ledger(data: dict) -> Ledger:
    weight, errors, version, count = data["folded"]
    return Ledger(
        newest=data["newest"],
        folded_through=data["folded_through"],
        window={int(v): {key: tuple(obs) for key, obs in observations.items()}
                for v, observations in data["window"].items()},
        folded_weight=weight,
        folded_errors=errors,
        folded_version=version,
        folded_count=count,
        history=[tuple(point) for point in data["history"]],
    )


def load_state(raw: bytes) -> CapabilityState:
    """The state `dump_state` wrote.

    >>> ledger = Ledger(newest=2, window={2: {"2/s/i": (1.5, "e", 1.0, 1.0)}})
    >>> s = CapabilityState(ledgers={"outcome": ledger}, revision=7)
    >>> restored = load_state(dump_state(s))
    >>> restored == s, restored.revision
    (True, 7)
    """
    data = json.loads(raw)
    return CapabilityState(ledgers={source: _load_ledger(ledger) for source, ledger in data["ledgers"].items()},
                           revision=data["revision"])
