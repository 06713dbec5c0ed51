"""Topic administration: idempotent creation from the registry, listing, description."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient, TopicPartition
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


def cluster_id(settings: CoreSettings, bootstrap: str) -> str:
    """The bus's cluster id: offsets only mean something on the cluster that gave them."""
    admin = _admin(settings, bootstrap)
    try:
        return str(admin.describe_cluster()["cluster_id"])
    finally:
        admin.close()


def committed_offsets(settings: CoreSettings, bootstrap: str) -> dict[str, dict[TopicPartition, int]]:
    """Every consumer group's committed offsets."""
    admin = _admin(settings, bootstrap)
    try:
        groups = [group["group_id"] for group in admin.list_groups()]
        return {group: {tp: meta.offset for tp, meta in admin.list_group_offsets(group).get(group, {}).items()
                        if meta.offset >= 0}
                for group in groups}
    finally:
        admin.close()


def slowest_committed(settings: CoreSettings, bootstrap: str, topic: str) -> dict[int, int]:
    """Per partition of `topic`, the lowest offset any consumer group committed (partitions no group
    committed on are left out)."""
    lowest: dict[int, int] = {}
    for offsets in committed_offsets(settings, bootstrap).values():
        for tp, offset in offsets.items():
            if tp.topic == topic:
                lowest[tp.partition] = min(offset, lowest.get(tp.partition, offset))
    return lowest


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
