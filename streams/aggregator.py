"""The worker side of the stream: batches of evidence events into capability states, and reports.

Per batch: admit each record in its partition's log order (`streams.ordering`), decode each raw value
with its topic's contract, turn it into evidence (rejecting unknown capabilities and bad scores), apply
it to the capability's state, then write each changed state to the table once (its `dump_state`
bytes), with that key's last event of the batch, and wait until the broker has those writes (see
`streams.tables`). Anything that fails goes to the dead-letter topic with its origin and reason, and
the batch goes on. Every `snapshot_every_events` events or `snapshot_every_s` seconds the capabilities
changed since the last report are summarised and sent to the planner as a `PartialWeakness`.

The table holds bytes; parsed states are cached between batches and dropped at every rebalance, so
after one the states are read again from the table, which Faust has recovered from its changelog.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Sequence

from faust.types import CollectionT, EventT

from dpe.bus.codec import decode
from dpe.bus.deadletter import dead_letter_for
from dpe.events import Event
from dpe.topics import MODEL_TOPIC
from monitoring.metrics import HANDLE_SECONDS, WEAKNESS_EVENTS
from streams.contracts import CapabilityReport, PartialWeakness
from streams.ordering import Admission, PartitionOrder
from streams.scoring import Applied, CapabilityState, Evidence, apply, dump_state, load_state, summarise
from streams.settings import ScoringSettings, StreamConfig
from streams.tables import store, written
from streams.topics import SERVICE, StreamTopics

ToEvidence = Callable[[Event, ScoringSettings], Evidence | None]


class Aggregator:
    """Owns the capability-state table of one worker and reports what changed."""

    def __init__(self, settings: StreamConfig, states: CollectionT, topics: StreamTopics, worker: str,
                 order: PartitionOrder):
        self.params = settings.stream.scoring
        self.every_events = settings.stream.snapshot_every_events
        self.every_s = settings.stream.snapshot_every_s
        self.max_event_bytes = settings.kafka.max_event_bytes
        self.states = states
        self.topics = topics
        self.worker = worker
        self.order = order
        self.changed: set[str] = set()
        self.pending_events = 0
        self.last_report = time.monotonic()
        self.seq = 0
        self.cache: dict[str, CapabilityState] = {}

    def _stored(self, capability: str) -> CapabilityState | None:
        state = self.cache.get(capability)
        if state is None:
            raw = self.states.data.get(capability)
            if raw is not None:
                state = self.cache[capability] = load_state(raw)
        return state

    def _state(self, capability: str) -> CapabilityState:
        state = self._stored(capability)
        if state is None:
            state = self.cache[capability] = CapabilityState()
        return state

    async def on_partitions_revoked(self, app: Any, revoked: Any, **kwargs: Any) -> None:
        """Signal handler: forget the parsed states (the table is recovered before the next batch) and the
        partitions' positions."""
        self.cache.clear()
        self.order.forget()

    async def consume(self, events: Sequence[EventT], model: type[Event], to_evidence: ToEvidence) -> None:
        """Apply one batch of raw `model` events; dead-letter the ones that cannot be applied."""
        started = time.perf_counter()
        max_bytes = MODEL_TOPIC[model].max_bytes(self.max_event_bytes)
        last_event: dict[str, EventT] = {}
        results: Counter[str] = Counter()
        letters = []
        for event in events:
            admission = self.order.admit(event.message.tp, event.message.offset)
            if admission is not Admission.APPLY:
                results[admission.value] += 1
                continue
            try:
                evidence = to_evidence(decode(model, event.value, max_bytes), self.params)
                result = Applied.MEASURE_ONLY if evidence is None else apply(
                    self._state(evidence.capability), evidence, self.params)
            except Exception as error:  # noqa: BLE001 - a bad event is dead-lettered, never stops the stream
                letters.append(dead_letter_for(event.message, error, f"{SERVICE}.handle", SERVICE,
                                              self.max_event_bytes))
                continue
            results[result.value] += 1
            if result is Applied.APPLIED:
                last_event[evidence.capability] = event
        writes = []
        for capability, event in last_event.items():
            state = self.cache[capability]
            state.revision += 1
            writes.append(store(self.states, capability, dump_state(state), event))
        await written(writes)
        for letter in letters:
            await self.topics.dead_letter(letter)
        await self.order.rewind()
        topic = events[0].message.topic
        for result, count in results.items():
            WEAKNESS_EVENTS.labels(topic, result).inc(count)
        self.changed.update(last_event)
        self.pending_events += len(events)
        HANDLE_SECONDS.labels(SERVICE).observe(time.perf_counter() - started)
        await self.report_if_due()

    async def report_if_due(self) -> None:
        """Report changed capabilities if enough events or time have passed since the last report."""
        due = self.pending_events >= self.every_events or time.monotonic() - self.last_report >= self.every_s
        if self.changed and due:
            await self.report()

    async def report(self) -> None:
        """Send the planner the current weakness of every capability changed since the last report."""
        changed, self.changed = sorted(self.changed), set()
        self.pending_events = 0
        self.last_report = time.monotonic()
        states = {capability: self._stored(capability) for capability in changed}
        reports = {
            capability: CapabilityReport(revision=state.revision, policy_version=state.newest,
                                         outcomes_at_version=state.outcomes_at(state.newest),
                                         weakness=summarise(state, self.params))
            for capability, state in states.items() if state is not None
        }
        if reports:
            await self.topics.send(PartialWeakness(producer=SERVICE, worker=self.worker, seq=self.seq,
                                                   reports=reports))
            self.seq += 1
