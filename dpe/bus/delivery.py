"""Consumed records as validated deliveries; the logic shared by the async and sync clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Iterable, TypeVar

from dpe.bus.codec import InvalidEvent, decode
from dpe.bus.deadletter import RecordLike
from dpe.events import Event
from dpe.topics import TopicSpec, spec_for_topic
from monitoring.metrics import CONSUMER_LAG

E = TypeVar("E", bound=Event)

LAG_REPORT_INTERVAL_S = 5.0
"""How often a subscriber refreshes its `dpe_consumer_lag_messages` gauge while fetching."""


@dataclass(frozen=True)
class Delivery(Generic[E]):
    """A valid event with where it was read from."""

    event: E
    record: RecordLike

    @property
    def topic(self) -> str:
        return self.record.topic

    @property
    def partition(self) -> int:
        return self.record.partition

    @property
    def offset(self) -> int:
        return self.record.offset


class Skipped(Exception):
    """A valid event its consumer reads and deliberately leaves alone, for a reason it records (not a dead letter:
    nothing is wrong with it), such as a sample too stale to train on.

    >>> Skipped("stale_dropped").reason
    'stale_dropped'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rejection:
    """A record that could not be decoded as its topic's event."""

    record: RecordLike
    error: InvalidEvent


def topic_specs(topics: Iterable[str], prefix: str) -> dict[str, TopicSpec]:
    """Map full topic names to their registry specs."""
    return {topic: spec_for_topic(topic, prefix) for topic in topics}


def split_records(
    records: Iterable[RecordLike], specs: dict[str, TopicSpec], max_event_bytes: int
) -> tuple[list[Delivery], list[Rejection]]:
    """Decode each record with its topic's model: valid deliveries and rejections, in order."""
    deliveries: list[Delivery] = []
    rejections: list[Rejection] = []
    for record in records:
        spec = specs[record.topic]
        try:
            deliveries.append(Delivery(decode(spec.model, record.value, spec.max_bytes(max_event_bytes)), record))
        except InvalidEvent as error:
            rejections.append(Rejection(record, error))
    return deliveries, rejections


def record_lag(group_id: str | None, lags: dict[Any, int]) -> None:
    """Set the consumer-lag gauge per topic from per-partition lags (keys have a `.topic`)."""
    per_topic: dict[str, int] = {}
    for tp, lag in lags.items():
        per_topic[tp.topic] = per_topic.get(tp.topic, 0) + lag
    for topic, lag in per_topic.items():
        CONSUMER_LAG.labels(group_id or "-", topic).set(lag)
