"""Consumed records as validated deliveries; the logic shared by the async and sync clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

from dpe.bus.codec import InvalidEvent, decode
from dpe.bus.deadletter import RecordLike
from dpe.events import Event
from dpe.topics import TopicSpec, spec_for_topic

E = TypeVar("E", bound=Event)


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
