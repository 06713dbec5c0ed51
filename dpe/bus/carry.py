"""Carry a bus's state into a fresh bus: what a Kafka with retention and compaction would have kept.

The embedded broker keeps every record in memory and has neither retention nor compaction, so an
always-on run replaces it now and then by a fresh one (`dpe.spiral.bus`), and a stopped run keeps
its bus on disk to be resumed. What crosses over, per partition of every topic under the prefix:

- the records no consumer group has consumed yet: from the lowest offset any group committed on the
  partition (everything when none did, unless the topic is compacted), the newest `max_tail` at most; older unconsumed records are
  counted as dropped, as Kafka's retention would drop them;
- on compacted topics (``cleanup.policy`` with ``compact`` in the registry, and every ``-changelog``
  topic, which hold Faust's tables) also the latest record of every key (a null value deletes it);
- every group's committed offsets, moved to where its next record now sits.

Carried records keep their partition, order, key, headers and timestamp; offsets start again at 0.

Example:
    >>> state = read_state(settings, old_bootstrap, max_tail=50_000)       # doctest: +SKIP
    >>> save_state(state, run_dir / "bus" / "state.jsonl.gz")               # doctest: +SKIP
    >>> write_state(settings, new_bootstrap, state)                         # doctest: +SKIP
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from dpe.bus.admin import cluster_id, committed_offsets
from dpe.bus.options import kafka_python_options
from dpe.config import CoreSettings
from dpe.topics import TOPICS

CHANGELOG_SUFFIX = "-changelog"
"""Faust names its tables' changelog topics ``<app id>-<table>-changelog``; they are compacted."""


@dataclass(frozen=True)
class CarriedRecord:
    """One record as it was on the old bus (`offset` there)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0


@dataclass(frozen=True)
class CarriedTopic:
    """A topic's shape and the records carried over, in partition and offset order."""

    name: str
    partitions: int
    configs: dict[str, str]
    records: tuple[CarriedRecord, ...]
    dropped: int = 0
    """Unconsumed records left behind because the partition's tail held more than `max_tail`."""


@dataclass(frozen=True)
class BusState:
    """Everything carried from one bus: topics, and each group's offsets on the new numbering."""

    cluster_id: str
    topics: tuple[CarriedTopic, ...]
    groups: dict[str, dict[tuple[str, int], int]] = field(default_factory=dict)
    saved_at: float = field(default_factory=time.time)

    @property
    def records(self) -> int:
        return sum(len(topic.records) for topic in self.topics)

    @property
    def dropped(self) -> int:
        return sum(topic.dropped for topic in self.topics)


def is_compacted(topic: str, prefix: str) -> bool:
    """Whether `topic` keeps each key's latest record (registry config, or a Faust changelog).

    >>> is_compacted("dpe.quotas", "dpe."), is_compacted("dpe.weakness-view-changelog", "dpe.")
    (True, True)
    >>> is_compacted("dpe.eval.outcomes", "dpe.")
    False
    """
    if topic.endswith(CHANGELOG_SUFFIX):
        return True
    for spec in TOPICS.values():
        if spec.name(prefix) == topic:
            return "compact" in spec.configs.get("cleanup.policy", "")
    return False


def select(records: Sequence[CarriedRecord], consumed: int | None, *, compacted: bool,
           max_tail: int) -> tuple[list[CarriedRecord], int]:
    """The records of one partition to carry, in order, and how many unconsumed ones are dropped.

    `consumed` is the lowest offset committed on the partition by any group (None: no group has; a
    compacted partition then keeps each key's latest only, the others their newest `max_tail`).

    >>> recs = [CarriedRecord(0, o, b"k" if o < 3 else b"j", b"v%d" % o) for o in range(6)]
    >>> [r.offset for r in select(recs, 4, compacted=False, max_tail=10)[0]]
    [4, 5]
    >>> [r.offset for r in select(recs, 4, compacted=True, max_tail=10)[0]]   # key k's latest is 2
    [2, 4, 5]
    >>> [r.offset for r in select(recs, None, compacted=True, max_tail=10)[0]]
    [2, 5]
    >>> [r.offset for r in select(recs, None, compacted=False, max_tail=2)[0]], select(recs, None, compacted=False, max_tail=2)[1]
    ([4, 5], 4)
    """
    if consumed is None:
        tail = [] if compacted else list(records)
    else:
        tail = [record for record in records if record.offset >= consumed]
    dropped = max(0, len(tail) - max_tail)
    kept = {record.offset for record in tail[dropped:]}
    if compacted:
        latest: dict[bytes | None, CarriedRecord] = {}
        for record in records:
            latest[record.key] = record
        kept |= {record.offset for record in latest.values() if record.value is not None}
    return [record for record in records if record.offset in kept], dropped


def moved_offset(carried: Sequence[CarriedRecord], committed: int) -> int:
    """Where a group that committed `committed` on the old bus goes on on the new one.

    >>> moved_offset([CarriedRecord(0, 2, None, b""), CarriedRecord(0, 7, None, b"")], 5)
    1
    """
    return sum(1 for record in carried if record.offset < committed)


def _admin(settings: CoreSettings, bootstrap: str) -> KafkaAdminClient:
    return KafkaAdminClient(**kafka_python_options(settings.kafka, bootstrap, "carry"), request_timeout_ms=10_000)


def _largest_record(settings: CoreSettings) -> int:
    return max(spec.max_bytes(settings.kafka.max_event_bytes) for spec in TOPICS.values()) + (1 << 20)


def _read_partitions(settings: CoreSettings, bootstrap: str, starts: dict[TopicPartition, int],
                     idle_ms: int) -> dict[TopicPartition, list[CarriedRecord]]:
    """The records of each partition from its offset in `starts` on, read until `idle_ms` pass without one
    (the bus is quiet)."""
    consumer = KafkaConsumer(**kafka_python_options(settings.kafka, bootstrap, "carry"), enable_auto_commit=False,
                             fetch_max_bytes=_largest_record(settings), max_partition_fetch_bytes=_largest_record(settings))
    out: dict[TopicPartition, list[CarriedRecord]] = {tp: [] for tp in starts}
    try:
        consumer.assign(list(starts))
        consumer.seek_to_beginning(*starts)
        for tp, offset in starts.items():
            if offset:
                consumer.seek(tp, offset)
        while batch := consumer.poll(timeout_ms=idle_ms, max_records=50_000):
            for tp, records in batch.items():
                out[tp].extend(CarriedRecord(r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
                               for r in records)
    finally:
        consumer.close()
    return out


def first_needed(consumed: int | None, *, compacted: bool) -> int:
    """The first offset of a partition that `select` may carry: a compacted partition's every record holds
    some key's latest, another's records before `consumed` are gone (they were consumed).

    >>> first_needed(7, compacted=False), first_needed(7, compacted=True), first_needed(None, compacted=False)
    (7, 0, 0)
    """
    return 0 if compacted or consumed is None else consumed


def read_state(settings: CoreSettings, bootstrap: str, *, max_tail: int, idle_ms: int = 1500) -> BusState:
    """What a fresh bus needs to go on where `bootstrap`'s stopped (read once its writers have stopped)."""
    prefix = settings.kafka.topic_prefix
    cluster = cluster_id(settings, bootstrap)
    admin = _admin(settings, bootstrap)
    try:
        names = sorted(name for name in admin.list_topics() if name.startswith(prefix))
        shapes = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(names)}
    finally:
        admin.close()
    committed = committed_offsets(settings, bootstrap)
    partitions = [TopicPartition(name, p) for name in names for p in range(shapes[name])]
    consumed = {tp: min((offsets[tp] for offsets in committed.values() if tp in offsets), default=None)
                for tp in partitions}
    starts = {tp: first_needed(consumed[tp], compacted=is_compacted(tp.topic, prefix)) for tp in partitions}
    read = _read_partitions(settings, bootstrap, starts, idle_ms)
    carried: dict[TopicPartition, list[CarriedRecord]] = {}
    dropped: dict[str, int] = dict.fromkeys(names, 0)
    for tp, records in read.items():
        carried[tp], lost = select(records, consumed[tp], compacted=is_compacted(tp.topic, prefix), max_tail=max_tail)
        dropped[tp.topic] += lost
    groups = {
        group: {(tp.topic, tp.partition): moved_offset(carried[tp], offset)
                for tp, offset in offsets.items() if tp in carried}
        for group, offsets in committed.items()
    }
    topics = tuple(
        CarriedTopic(name, shapes[name], _configs(name, prefix),
                     tuple(r for p in range(shapes[name]) for r in carried[TopicPartition(name, p)]), dropped[name])
        for name in names
    )
    return BusState(cluster, topics, {group: offsets for group, offsets in groups.items() if offsets})


def _configs(topic: str, prefix: str) -> dict[str, str]:
    """Topic configs to create `topic` with on the new bus (the registry's; compaction for changelogs)."""
    for spec in TOPICS.values():
        if spec.name(prefix) == topic:
            return dict(spec.configs)
    return {"cleanup.policy": "compact"} if topic.endswith(CHANGELOG_SUFFIX) else {}


def write_state(settings: CoreSettings, bootstrap: str, state: BusState) -> None:
    """Create `state`'s topics on a fresh bus, produce its records in order, set its groups' offsets."""
    admin = _admin(settings, bootstrap)
    try:
        present = set(admin.list_topics())
        missing = [NewTopic(t.name, t.partitions, settings.kafka.replication_factor, topic_configs=t.configs)
                   for t in state.topics if t.name not in present]
        if missing:
            admin.create_topics(missing)
        _produce(settings, bootstrap, state.topics)
        for group, offsets in state.groups.items():
            admin.alter_group_offsets(group, {TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
                                              for (topic, partition), offset in offsets.items()})
    finally:
        admin.close()


def _produce(settings: CoreSettings, bootstrap: str, topics: Iterable[CarriedTopic]) -> None:
    producer = KafkaProducer(**kafka_python_options(settings.kafka, bootstrap, "carry"), acks="all",
                             max_in_flight_requests_per_connection=1, max_request_size=_largest_record(settings),
                             linger_ms=5)
    try:
        for topic in topics:
            for record in topic.records:
                producer.send(topic.name, value=record.value, key=record.key, partition=record.partition,
                              headers=list(record.headers), timestamp_ms=record.timestamp_ms or None)
        producer.flush()
    finally:
        producer.close()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def save_state(state: BusState, path: Path) -> None:
    """Write `state` to `path` (gzip JSON lines: a header, then one line per record), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    header = {"cluster_id": state.cluster_id, "saved_at": state.saved_at,
              "topics": [{"name": t.name, "partitions": t.partitions, "configs": t.configs, "dropped": t.dropped}
                         for t in state.topics],
              "groups": {g: [[topic, p, o] for (topic, p), o in offsets.items()] for g, offsets in state.groups.items()}}
    with gzip.open(tmp, "wt", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
        for topic in state.topics:
            for r in topic.records:
                out.write(json.dumps({"t": topic.name, "p": r.partition, "o": r.offset, "k": _b64(r.key),
                                      "v": _b64(r.value), "h": [[k, _b64(v)] for k, v in r.headers],
                                      "ts": r.timestamp_ms}) + "\n")
    tmp.replace(path)


def load_state(path: Path) -> BusState:
    """The state `save_state` wrote to `path`."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        header = json.loads(next(lines))
        by_topic: dict[str, list[CarriedRecord]] = {t["name"]: [] for t in header["topics"]}
        for row in map(json.loads, lines):
            by_topic[row["t"]].append(CarriedRecord(row["p"], row["o"], _unb64(row["k"]), _unb64(row["v"]),
                                                    tuple((k, _unb64(v) or b"") for k, v in row["h"]), row["ts"]))
    topics = tuple(CarriedTopic(t["name"], t["partitions"], t["configs"], tuple(by_topic[t["name"]]), t["dropped"])
                   for t in header["topics"])
    groups = {g: {(topic, p): o for topic, p, o in rows} for g, rows in header["groups"].items()}
    return BusState(header["cluster_id"], topics, groups, header["saved_at"])
