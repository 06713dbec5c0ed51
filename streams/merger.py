"""The planner: merges the workers' reports into one global weakness snapshot and a quota plan.

It consumes the single-partition report topic (so exactly one worker plans at a time), keeps the
latest report per capability in a table (the highest revision wins, so a stale report from a worker
that lost a partition cannot undo its successor's), and for every batch that changed something
publishes a `WeaknessSnapshot` of all capabilities. Capabilities of a closed taxonomy that have no
evidence yet appear with the prior.

Plans: with ``quotas.round_evidence`` 0 every snapshot also gets a `QuotaPlan` (round = snapshot
seq). Otherwise a round is one policy version: its plan is published once, by the first snapshot
in which the newest version has at least ``round_evidence`` graded outcomes, so a round's mixture
comes from the diagnosis of the policy it will train and not from its predecessors'. The plan goes out
before the round is recorded, so a planner killed in between plans that round again on restart rather
than never (agents follow the newest plan of a version).

Example:
    >>> from dpe.events import CapabilityWeakness
    >>> params = ScoringSettings(taxonomy=("chart", "color"))
    >>> w = CapabilityWeakness(error_rate=0.5, effective_n=4, ci_low=0.2, ci_high=0.8, events=4)
    >>> snap = build_snapshot({"chart": CapabilityReport(revision=3, policy_version=2, weakness=w)}, params, seq=7)
    >>> sorted(snap.capabilities), snap.capabilities["color"].events, snap.policy_version, snap.events_total
    (['chart', 'color'], 0, 2, 4)
"""

from __future__ import annotations

from typing import Mapping, Sequence

from faust.types import CollectionT, EventT

from dpe.bus.codec import InvalidEvent, decode
from dpe.bus.deadletter import dead_letter_for
from dpe.events import QuotaPlan, WeaknessSnapshot
from monitoring.metrics import (
    QUOTA_PLANS,
    QUOTA_SAMPLES,
    WEAKNESS_CREDIBLE_BOUND,
    WEAKNESS_EFFECTIVE_N,
    WEAKNESS_ERROR_RATE,
)
from streams.contracts import CapabilityReport, PartialWeakness
from streams.scoring import CapabilityState, summarise
from streams.settings import ScoringSettings, StreamConfig
from streams.strategies import PLANNED_ONCE, plan_quotas
from streams.tables import store, written
from streams.topics import SERVICE, StreamTopics

SEQ_KEY = "seq"
ROUND_KEY = "round"
PLANNED_KEY = "planned_version"
FIRST_WEIGHTS_KEY = "first_weights"


def newer(current: CapabilityReport | None, incoming: CapabilityReport) -> bool:
    """Whether `incoming` replaces `current` (same revision: the later report wins).

    >>> from dpe.events import CapabilityWeakness
    >>> w = CapabilityWeakness(error_rate=0.5, effective_n=4, ci_low=0.2, ci_high=0.8, events=4)
    >>> newer(CapabilityReport(revision=5, policy_version=1, weakness=w),
    ...       CapabilityReport(revision=4, policy_version=1, weakness=w))
    False
    """
    return current is None or incoming.revision >= current.revision


def build_snapshot(reports: Mapping[str, CapabilityReport], params: ScoringSettings, seq: int,
                   producer: str = SERVICE) -> WeaknessSnapshot:
    """The global snapshot of the latest report per capability (plus the prior for unseen taxonomy entries)."""
    prior = summarise(CapabilityState(), params)
    names = set(params.taxonomy) | (set(reports) if params.open_taxonomy else set())
    capabilities = {name: reports[name].weakness if name in reports else prior for name in sorted(names)}
    seen = [reports[name] for name in capabilities if name in reports]
    return WeaknessSnapshot(
        producer=producer,
        seq=seq,
        policy_version=max((r.policy_version for r in seen), default=0),
        capabilities=capabilities,
        events_total=sum(r.weakness.events for r in seen),
    )


def diagnosed(reports: Mapping[str, CapabilityReport], version: int) -> int:
    """Graded outcomes of policy `version` over all capabilities whose newest evidence is of it."""
    return sum(report.outcomes_at_version for report in reports.values() if report.policy_version == version)


def export_weakness(snapshot: WeaknessSnapshot) -> None:
    """Set the weakness gauges from the latest snapshot."""
    for name, weakness in snapshot.capabilities.items():
        WEAKNESS_ERROR_RATE.labels(name).set(weakness.error_rate)
        WEAKNESS_EFFECTIVE_N.labels(name).set(weakness.effective_n)
        WEAKNESS_CREDIBLE_BOUND.labels(name, "low").set(weakness.ci_low)
        WEAKNESS_CREDIBLE_BOUND.labels(name, "high").set(weakness.ci_high)


def export_plan(plan: QuotaPlan) -> None:
    """Set the quota gauges from the latest plan."""
    for name, quota in plan.quotas.items():
        QUOTA_SAMPLES.labels(name).set(quota)
    QUOTA_PLANS.labels(plan.strategy).inc()


class ReportMerger:
    """Merges reports into its view table and publishes a snapshot and a plan per changed batch."""

    def __init__(self, settings: StreamConfig, view: CollectionT, rounds: CollectionT, topics: StreamTopics):
        self.scoring = settings.stream.scoring
        self.quotas = settings.stream.quotas
        self.max_event_bytes = settings.kafka.max_event_bytes
        self.view = view
        self.rounds = rounds
        self.topics = topics

    def reports(self) -> dict[str, CapabilityReport]:
        """The latest report per capability."""
        return {name: CapabilityReport.model_validate(raw) for name, raw in self.view.data.items()}

    async def consume(self, events: Sequence[EventT]) -> None:
        """Merge one batch of raw `PartialWeakness` events; publish a snapshot and plan if anything changed."""
        reports = self.reports()
        last_event: dict[str, EventT] = {}
        for event in events:
            try:
                partial = decode(PartialWeakness, event.value, self.max_event_bytes)
            except InvalidEvent as error:
                await self.topics.dead_letter(dead_letter_for(event.message, error, f"{SERVICE}.plan", SERVICE,
                                                                        self.max_event_bytes))
                continue
            for name, report in partial.reports.items():
                if newer(reports.get(name), report):
                    reports[name] = report
                    last_event[name] = event
        if not last_event:
            return
        writes = [store(self.view, name, reports[name].model_dump(mode="json"), event)
                  for name, event in last_event.items()]
        seq = self.rounds.data.get(SEQ_KEY, -1) + 1
        writes.append(store(self.rounds, SEQ_KEY, seq, events[-1]))
        await written(writes)
        snapshot = build_snapshot(reports, self.scoring, seq=seq)
        await self.topics.send(snapshot)
        export_weakness(snapshot)
        round_number = self.round_due(reports, snapshot, seq)
        if round_number is None:
            return
        once = self.quotas.strategy in PLANNED_ONCE
        plan = plan_quotas(snapshot, self.quotas, round_number, producer=SERVICE,
                           weights=self.rounds.data.get(FIRST_WEIGHTS_KEY) if once else None)
        await self.topics.send(plan)
        export_plan(plan)
        writes = []
        if once and FIRST_WEIGHTS_KEY not in self.rounds.data:
            writes.append(store(self.rounds, FIRST_WEIGHTS_KEY, plan.weights, events[-1]))
        if self.quotas.round_evidence:
            writes += [store(self.rounds, ROUND_KEY, round_number, events[-1]),
                       store(self.rounds, PLANNED_KEY, snapshot.policy_version, events[-1])]
        await written(writes)

    def round_due(self, reports: Mapping[str, CapabilityReport], snapshot: WeaknessSnapshot, seq: int) -> int | None:
        """The round number `snapshot` should be planned as, or None when it brings no plan."""
        if not self.quotas.round_evidence:
            return seq
        version = snapshot.policy_version
        if self.rounds.data.get(PLANNED_KEY, -1) >= version or diagnosed(reports, version) < self.quotas.round_evidence:
            return None
        return self.rounds.data.get(ROUND_KEY, -1) + 1

