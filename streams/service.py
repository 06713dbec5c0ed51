"""The weakness stream as a Faust app: evidence agents, the planner agent, the report timer.

Topics: eval outcomes and divergences in (co-partitioned by capability, raw values decoded with the
registry contracts); the internal report topic between workers and the planner; snapshots, plans
and dead letters out. Tables (memory store, changelog, no windows): ``capability_states`` (the
serialized `CapabilityState` per capability, partitioned like the evidence), ``planner_view`` (latest
report per capability) and ``planner_rounds`` (the snapshot and round counters), both on the report topic's single
partition. Any number of workers can run with the same settings: they share the partitions, and a
restarted worker recovers its tables from the changelogs.

Example:
    >>> app = create_app(settings, "127.0.0.1:9092")            # doctest: +SKIP
    >>> sorted(app.agents)                                        # doctest: +SKIP
    ['divergences', 'outcomes', 'planner']

`run_worker(settings)` creates the registry topics if needed, exposes metrics on ``metrics.port`` or
``stream.metrics_port`` and runs one worker until SIGTERM or SIGINT (Faust's own handlers). Start as
many as you like with the same settings; they share the evidence partitions.
"""

from __future__ import annotations

import os
import socket
from typing import Any, AsyncIterator, Callable, Coroutine

import faust
from faust.types import StreamT
from faust.worker import Worker

from dpe.broker import resolve_bootstrap
from dpe.bus.admin import ensure_topics
from dpe.events import Divergence, EvalOutcome, Event
from dpe.topics import TOPICS
from monitoring.metrics import serve_metrics
from streams.aggregator import Aggregator, ToEvidence
from streams.merger import ReportMerger
from streams.ordering import PartitionOrder
from streams.runtime import WeaknessApp, faust_options
from streams.scoring import divergence_evidence, outcome_evidence
from streams.settings import StreamConfig
from streams.topics import StreamTopics

Agent = Callable[[StreamT], Coroutine[Any, Any, None]]


def worker_name() -> str:
    """host:pid, naming this worker in its reports."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _batches(stream: StreamT, settings: StreamConfig) -> AsyncIterator:
    return stream.take_events(settings.stream.batch_size, settings.stream.batch_within_s)


def evidence_agent(settings: StreamConfig, aggregator: Aggregator, model: type[Event],
                   to_evidence: ToEvidence) -> Agent:
    """An agent that feeds batches of raw `model` events to the aggregator."""

    async def consume(stream: StreamT) -> None:
        async for events in _batches(stream, settings):
            await aggregator.consume(events, model, to_evidence)

    return consume


def planner_agent(settings: StreamConfig, planner: ReportMerger) -> Agent:
    """The agent that feeds batches of worker reports to the planner."""

    async def consume(stream: StreamT) -> None:
        async for events in _batches(stream, settings):
            await planner.consume(events)

    return consume


def create_app(settings: StreamConfig, bootstrap: str) -> faust.App:
    """The weakness stream's Faust app for `settings`, talking to `bootstrap`."""
    app = WeaknessApp(**faust_options(settings, bootstrap))
    topics = StreamTopics(app, settings)
    evidence_partitions = settings.kafka.partitions_override or TOPICS["eval_outcomes"].partitions
    states = app.Table("capability_states", partitions=evidence_partitions, key_type=str, value_type=bytes)
    view = app.Table("planner_view", partitions=1, key_type=str)
    rounds = app.Table("planner_rounds", partitions=1, key_type=str)

    aggregator = Aggregator(settings, states, topics, worker_name(), PartitionOrder(lambda: app.consumer))
    app.on_partitions_revoked.connect(aggregator.on_partitions_revoked)
    planner = ReportMerger(settings, view, rounds, topics)
    app.agent(topics.source(EvalOutcome), name="outcomes")(
        evidence_agent(settings, aggregator, EvalOutcome, outcome_evidence))
    app.agent(topics.source(Divergence), name="divergences")(
        evidence_agent(settings, aggregator, Divergence, divergence_evidence))
    app.agent(topics.partials, name="planner")(planner_agent(settings, planner))
    app.timer(settings.stream.snapshot_every_s, name="report")(aggregator.report_if_due)
    return app


def run_worker(settings: StreamConfig) -> None:
    """Create the registry topics if needed, expose metrics, and run one worker of the stream."""
    bootstrap = resolve_bootstrap(settings)
    ensure_topics(settings, bootstrap)
    settings.home.mkdir(parents=True, exist_ok=True)
    serve_metrics(settings.metrics.port_for(settings.stream.metrics_port), settings.metrics.addr)
    app = create_app(settings, bootstrap)
    Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
