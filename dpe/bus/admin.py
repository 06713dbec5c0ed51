"""Topic administration: idempotent creation from the registry, listing, description."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from dpe.bus.options import kafka_python_options
from dpe.config import CoreSettings
from dpe.topics import TOPICS, TopicSpec


@dataclass(frozen=True)
class TopicStatus:
    name: str
    spec: TopicSpec
    created: bool
    partitions: int


def _admin(settings: CoreSettings, bootstrap: str) -> KafkaAdminClient:
    return KafkaAdminClient(**kafka_python_options(settings.kafka, bootstrap), request_timeout_ms=10_000)


def _partitions(settings: CoreSettings, spec: TopicSpec) -> int:
    return settings.kafka.partitions_override or spec.partitions


def existing_topics(settings: CoreSettings, bootstrap: str) -> set[str]:
    admin = _admin(settings, bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def ensure_topics(settings: CoreSettings, bootstrap: str) -> list[TopicStatus]:
    """Create every registry topic that does not exist yet; running it twice changes nothing."""
    prefix = settings.kafka.topic_prefix
    admin = _admin(settings, bootstrap)
    try:
        present = set(admin.list_topics())
        statuses = []
        for spec in TOPICS.values():
            name = spec.name(prefix)
            created = False
            if name not in present:
                topic = NewTopic(name, _partitions(settings, spec), settings.kafka.replication_factor, topic_configs=dict(spec.configs))
                try:
                    admin.create_topics([topic])
                    created = True
                except TopicAlreadyExistsError:
                    created = False
            statuses.append(TopicStatus(name, spec, created, _partitions(settings, spec)))
        return statuses
    finally:
        admin.close()
