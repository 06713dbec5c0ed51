"""What must hold after a soak: pure functions over what was observed on the topics and in the checkpoint folder.

Every function takes plain observations (checkpoint events, accepted-sample records, quota plans,
evidence) and returns what it found, never a bare verdict, so the report can say what
went wrong and the unit tests can hand each one a trained-twice sample, a version gap, an unfilled
plan or a lost sample directly.

- `lineage`: the chain of checkpoints from the newest back to version 0 by ``parent_version``;
  `trained_twice`: sample ids trained by more than one checkpoint of it (or twice by one);
- `sample_fates`: every accepted sample is trained along the lineage, skipped with a reason
  (the checkpoint manifests' ``skipped``), pending (read after the newest checkpoint's positions:
  the round under way when the soak stopped) or lost;
- `plan_fills`: the accepted samples of each plan per capability against its quotas;
- `version_gaps`, `stalls`, `busy_share`;
- `weakness_diffs`: the last weakness snapshot against the stream's own scoring replayed over the
  observed eval outcomes and divergences.

Example:
    >>> chain = lineage([Checkpoint(policy_version=0, uri="base"),
    ...                  Checkpoint(policy_version=1, parent_version=0, uri="v1", sample_ids=["a", "b"]),
    ...                  Checkpoint(policy_version=2, parent_version=1, uri="v2", sample_ids=["b"])])
    >>> trained_twice(chain), version_gaps(c.policy_version for c in chain)
    ({'b': [1, 2]}, [])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from dpe.events import CapabilityWeakness, Checkpoint, Divergence, EvalOutcome, QuotaPlan, WeaknessSnapshot
from streams.scoring import (
    CapabilityState,
    Evidence,
    RejectedEvidence,
    divergence_evidence,
    outcome_evidence,
    replay,
    summarise,
)
from streams.settings import ScoringSettings


@dataclass(frozen=True)
class AcceptedRecord:
    """One accepted-sample record as last seen on the bus: the sample, its plan, and where it sits.

    `epoch` counts the bus's replacements when it was read (`partition` and `offset` are on that bus).
    """

    sample_id: str
    plan_id: str
    capability: str
    partition: int
    offset: int
    epoch: int = 0


@dataclass(frozen=True)
class Frontier:
    """Where the newest checkpoint of the lineage stopped reading: the bus epoch and the next offset per partition."""

    epoch: int
    positions: Mapping[int, int]

    def behind(self, record: AcceptedRecord) -> bool:
        """Whether `record` was written after the frontier (on a later bus, or at or past its position).

        >>> Frontier(epoch=1, positions={0: 5}).behind(AcceptedRecord("s", "p", "c", partition=0, offset=5, epoch=1))
        True
        >>> Frontier(epoch=1, positions={0: 5}).behind(AcceptedRecord("s", "p", "c", partition=0, offset=4, epoch=1))
        False
        """
        if record.epoch != self.epoch:
            return record.epoch > self.epoch
        return record.offset >= self.positions.get(record.partition, 0)


def lineage(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints from version 0 to the newest one, following ``parent_version`` back; oldest first.

    A version off that chain (a fork: a round trained again from an older parent) is left out.

    >>> forked = [Checkpoint(policy_version=0, uri="b"), Checkpoint(policy_version=1, parent_version=0, uri="1"),
    ...           Checkpoint(policy_version=2, parent_version=0, uri="2")]
    >>> [c.policy_version for c in lineage(forked)]
    [0, 2]
    """
    by_version = {checkpoint.policy_version: checkpoint for checkpoint in checkpoints}
    chain: list[Checkpoint] = []
    version = max(by_version, default=None)
    while version in by_version and len(chain) < len(by_version):
        chain.append(by_version[version])
        version = by_version[version].parent_version
    return chain[::-1]


def trained_twice(chain: Sequence[Checkpoint]) -> dict[str, list[int]]:
    """Sample ids trained more than once along `chain`, with the versions that trained them."""
    versions: dict[str, list[int]] = defaultdict(list)
    for checkpoint in chain:
        for sample_id in checkpoint.sample_ids:
            versions[sample_id].append(checkpoint.policy_version)
    return {sample_id: found for sample_id, found in versions.items() if len(found) > 1}


def version_gaps(versions: Iterable[int]) -> list[int]:
    """Versions missing between 0 and the newest announced one.

    >>> version_gaps([0, 1, 3, 4, 4])
    [2]
    """
    seen = set(versions)
    return [version for version in range(max(seen, default=-1) + 1) if version not in seen]


@dataclass(frozen=True)
class Fates:
    """What became of every accepted sample id."""

    trained: frozenset[str]
    skipped: Mapping[str, str]
    """Sample id -> the reason a checkpoint recorded for not training it."""
    pending: frozenset[str]
    lost: Mapping[str, str]
    """Sample id -> why it counts as lost."""


def sample_fates(records: Iterable[AcceptedRecord], chain: Sequence[Checkpoint],
                 skipped: Mapping[int, Mapping[str, Sequence[str]]], frontier: Frontier | None) -> Fates:
    """Sort every accepted sample id into trained, skipped (with a reason), pending or lost.

    `skipped` is each version's manifest ``skipped`` (reason -> ids); `frontier` is where the newest
    checkpoint of `chain` stopped reading (None before the first trained round: all is pending).
    An id neither trained nor skipped is pending when one of its records lies behind the frontier,
    lost otherwise.

    >>> chain = [Checkpoint(policy_version=0, uri="b"), Checkpoint(policy_version=1, parent_version=0, uri="1",
    ...                                                            sample_ids=["a"])]
    >>> records = [AcceptedRecord(sid, "p", "color", partition=0, offset=i) for i, sid in enumerate("abcd")]
    >>> fates = sample_fates(records, chain, {1: {"duplicate": ["b"]}}, Frontier(epoch=0, positions={0: 3}))
    >>> sorted(fates.trained), dict(fates.skipped), sorted(fates.pending), sorted(fates.lost)
    (['a'], {'b': 'duplicate'}, ['d'], ['c'])
    """
    trained = {sample_id for checkpoint in chain for sample_id in checkpoint.sample_ids}
    reasons = {sample_id: reason for checkpoint in chain
               for reason, ids in skipped.get(checkpoint.policy_version, {}).items() for sample_id in ids}
    by_id: dict[str, list[AcceptedRecord]] = defaultdict(list)
    for record in records:
        by_id[record.sample_id].append(record)
    skipped_ids, pending, lost = {}, set(), {}
    for sample_id, found in by_id.items():
        if sample_id in trained:
            continue
        if sample_id in reasons:
            skipped_ids[sample_id] = reasons[sample_id]
        elif frontier is None or any(frontier.behind(record) for record in found):
            pending.add(sample_id)
        else:
            lost[sample_id] = "read before the newest checkpoint's positions, neither trained nor recorded as skipped"
    return Fates(frozenset(trained & set(by_id)), skipped_ids, frozenset(pending), lost)


PlanStatus = Literal["filled", "spilled", "open", "timed_out", "unfilled", "overfilled", "replanned"]
FAILED_PLAN_STATUSES: frozenset[str] = frozenset({"unfilled", "overfilled", "replanned"})


@dataclass(frozen=True)
class PlanFill:
    """One plan's quotas against the distinct samples accepted for it, per capability."""

    plan_id: str
    policy_version: int
    quotas: Mapping[str, int]
    accepted: Mapping[str, int]
    status: PlanStatus

    @property
    def failed(self) -> bool:
        return self.status in FAILED_PLAN_STATUSES


def followed_plans(plans: Iterable[QuotaPlan]) -> list[tuple[QuotaPlan, set[str]]]:
    """The plans the agents follow, in order, each with the ids of the plans that merely repeat it.

    A plan with the same quotas for the same policy version as the one followed continues it (as
    `consumers.agents.ledger.QuotaLedger.use_plan` does), so its samples count for the first.

    >>> a = QuotaPlan(round=0, strategy="s", budget=2, quotas={"color": 2}, weights={}, snapshot_id="x", policy_version=0)
    >>> again = a.model_copy(update={"plan_id": "again"})
    >>> [(plan.plan_id == a.plan_id, sorted(ids) == sorted([a.plan_id, "again"])) for plan, ids in followed_plans([a, again])]
    [(True, True)]
    """
    followed: list[tuple[QuotaPlan, set[str]]] = []
    for plan in sorted(plans, key=lambda p: p.ts):
        if followed and (followed[-1][0].policy_version, followed[-1][0].quotas) == (plan.policy_version, plan.quotas):
            followed[-1][1].add(plan.plan_id)
        else:
            followed.append((plan, {plan.plan_id}))
    return followed


def plan_fills(plans: Iterable[QuotaPlan], records: Iterable[AcceptedRecord], chain: Sequence[Checkpoint],
               round_samples: int) -> list[PlanFill]:
    """Each followed plan's fill: exactly its quotas, unless its round is still open or was closed by timeout.

    The round of a plan for version v is the lineage checkpoint whose parent is v; fewer than
    `round_samples` trained samples there means the trainer closed it on time, short of the plan
    (then fewer samples than the quotas is right, more never is). A plan replaced by another for
    the same version before it was full is ``replanned``. A plan whose capabilities out of the policy's
    reach gave their room to the others (`consumers.agents.reach`) is ``spilled``: exactly its budget,
    and every capability over its quota paid for by others under theirs.

    >>> plan = QuotaPlan(round=0, strategy="s", budget=3, quotas={"color": 2, "chart": 1}, weights={},
    ...                  snapshot_id="x", policy_version=0)
    >>> chain = [Checkpoint(policy_version=0, uri="b"),
    ...          Checkpoint(policy_version=1, parent_version=0, uri="1", sample_ids=["a", "b", "c"])]
    >>> records = [AcceptedRecord(sid, plan.plan_id, "color", 0, i) for i, sid in enumerate("ab")]
    >>> [(fill.status, sorted(fill.accepted.items())) for fill in plan_fills([plan], records, chain, round_samples=3)]
    [('unfilled', [('chart', 0), ('color', 2)])]
    """
    accepted: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for record in records:
        accepted[record.plan_id][record.capability].add(record.sample_id)
    rounds = {checkpoint.parent_version: checkpoint for checkpoint in chain if checkpoint.parent_version is not None}
    followed = followed_plans(plans)
    fills = []
    for index, (plan, ids) in enumerate(followed):
        counts = {capability: len(set().union(*(accepted[plan_id][capability] for plan_id in ids)))
                  for capability in set(plan.quotas) | {c for plan_id in ids for c in accepted[plan_id]}}
        replaced = any(later.policy_version == plan.policy_version for later, _ in followed[index + 1:])
        fills.append(PlanFill(plan.plan_id, plan.policy_version, plan.quotas, counts,
                              _plan_status(plan.quotas, counts, rounds.get(plan.policy_version), round_samples,
                                           replaced)))
    return fills


def _plan_status(quotas: Mapping[str, int], counts: Mapping[str, int], trained: Checkpoint | None,
                 round_samples: int, replaced: bool) -> PlanStatus:
    """
    >>> _plan_status({"color": 2, "chart": 2}, {"color": 3, "chart": 1}, None, 4, replaced=False)
    'spilled'
    >>> _plan_status({"color": 2, "chart": 2}, {"color": 3, "chart": 2}, None, 4, replaced=False)
    'overfilled'
    """
    over = sum(max(counts.get(capability, 0) - quotas.get(capability, 0), 0) for capability in counts)
    if sum(counts.values()) > sum(quotas.values()) or over and any(c not in quotas for c in counts):
        return "overfilled"
    if all(counts.get(capability, 0) == quota for capability, quota in quotas.items()):
        return "filled"
    if over and sum(counts.values()) == sum(quotas.values()):
        return "spilled"
    if replaced:
        return "replanned"
    if trained is None:
        return "open"
    return "timed_out" if len(trained.sample_ids) < round_samples else "unfilled"


def stalls(version_times: Iterable[float], start: float, end: float, after_s: float) -> list[tuple[float, float]]:
    """Stretches between `start` and `end` longer than `after_s` without a new policy version.

    >>> stalls([10.0, 20.0, 300.0], start=0.0, end=330.0, after_s=120.0)
    [(20.0, 300.0)]
    """
    marks = [start, *sorted(t for t in version_times if start < t < end), end]
    return [(a, b) for a, b in pairwise(marks) if b - a > after_s]


def busy_share(chain: Sequence[Checkpoint], wall_s: float) -> float:
    """Time spent training (the ``train_s`` each checkpoint announces) over `wall_s`.

    >>> busy_share([Checkpoint(policy_version=1, uri="1", metrics={"train_s": 3.0})], wall_s=12.0)
    0.25
    """
    return sum(checkpoint.metrics.get("train_s", 0.0) for checkpoint in chain) / wall_s if wall_s > 0 else 0.0


def evidence_of(event: EvalOutcome | Divergence, params: ScoringSettings) -> Evidence | None:
    """The stream's evidence for an observed event (None for measure-only suites and evidence it refuses)."""
    try:
        return outcome_evidence(event, params) if isinstance(event, EvalOutcome) else divergence_evidence(event, params)
    except RejectedEvidence:
        return None


WEAKNESS_FIELDS = ("events", "error_rate", "effective_n", "ci_low", "ci_high", "trend")


@dataclass(frozen=True)
class WeaknessDiff:
    """A figure of one capability where the stream's snapshot and the recomputation disagree."""

    capability: str
    field: str
    stream: float | None
    recomputed: float


def weakness_diffs(snapshot: WeaknessSnapshot, evidence: Iterable[Evidence], params: ScoringSettings,
                   tolerance: float = 1e-6) -> list[WeaknessDiff]:
    """The figures of `snapshot` that differ (beyond `tolerance`, relative above 1) from the stream's own
    scoring (`streams.scoring.replay`, then `summarise`) over the observed `evidence`.

    A capability without evidence is compared with the prior; one missing from the snapshot is a diff.

    >>> params = ScoringSettings(taxonomy=("color",))
    >>> outcome = EvalOutcome(policy_version=0, suite="s", item_id="i", capability="color", answer_type="text",
    ...                       expected="red", predicted="blue", correct=False, score=0.0)
    >>> evidence = [evidence_of(outcome, params)]
    >>> fresh = WeaknessSnapshot(seq=1, policy_version=0, events_total=1,
    ...                          capabilities={"color": summarise(replay(evidence, params)["color"], params)})
    >>> weakness_diffs(fresh, evidence, params)
    []
    >>> stale = fresh.model_copy(update={"capabilities": {"color": summarise(CapabilityState(), params)}})
    >>> [(d.field, d.stream, d.recomputed) for d in weakness_diffs(stale, evidence, params)][:2]
    [('events', 0, 1), ('error_rate', 0.5, 1.0)]
    """
    states = replay(evidence, params)
    prior = summarise(CapabilityState(), params)
    diffs = []
    for capability in sorted(set(snapshot.capabilities) | set(states)):
        recomputed = summarise(states[capability], params) if capability in states else prior
        reported: CapabilityWeakness | None = snapshot.capabilities.get(capability)
        for name in WEAKNESS_FIELDS:
            expected = getattr(recomputed, name)
            value = getattr(reported, name) if reported is not None else None
            if value is None or abs(value - expected) > tolerance * max(1.0, abs(expected)):
                diffs.append(WeaknessDiff(capability, name, value, expected))
    return diffs
