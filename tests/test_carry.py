"""Carrying a bus's state into a fresh embedded broker: what crosses over, in order, with group offsets moved.

Both buses are real Tansu brokers (the session's and a fresh one per test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from dpe.broker import EmbeddedBroker
from dpe.bus.admin import cluster_id
from dpe.bus.carry import load_state, read_state, save_state, write_state
from dpe.settings import Settings


def produce(bootstrap: str, topic: str, rows: list[tuple[int, bytes, bytes | None]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_in_flight_requests_per_connection=1)
    for partition, key, value in rows:
        producer.send(topic, key=key, value=value, partition=partition, headers=[("h", key)], timestamp_ms=1_000)
    producer.flush()
    producer.close()


def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.alter_group_offsets(group, {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
    admin.close()


def read_all(bootstrap: str, topic: str, partitions: int) -> dict[int, list[tuple[bytes, bytes | None]]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out: dict[int, list[tuple[bytes, bytes | None]]] = {p: [] for p in range(partitions)}
    while batch := consumer.poll(timeout_ms=1500):
        for tp, records in batch.items():
            out[tp.partition].extend((r.key, r.value) for r in records)
    consumer.close()
    return out


@pytest.fixture
def fresh_broker(tmp_path: Path):
    with EmbeddedBroker(log_path=tmp_path / "fresh.log") as broker:
        yield broker


def test_the_unconsumed_tail_and_each_keys_latest_cross_over_with_group_offsets_moved(
    settings: Settings, broker: EmbeddedBroker, fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    prefix = settings.kafka.topic_prefix
    outcomes, quotas = f"{prefix}eval.outcomes", f"{prefix}quotas"
    changelog = f"{prefix}weakness-states-changelog"
    KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers).create_topics([NewTopic(changelog, 2, 1)])
    produce(broker.bootstrap_servers, outcomes, [(0, b"o%d" % i, b"v%d" % i) for i in range(10)])
    produce(broker.bootstrap_servers, quotas, [(0, b"plan", b"p%d" % i) for i in range(5)])
    produce(broker.bootstrap_servers, changelog,
            [(0, b"a", b"a1"), (0, b"b", b"b1"), (0, b"a", b"a2"), (1, b"c", b"c1"), (1, b"c", None)])
    commit(broker.bootstrap_servers, f"{prefix}stream", {TopicPartition(outcomes, 0): 7})
    commit(broker.bootstrap_servers, f"{prefix}slow", {TopicPartition(outcomes, 0): 6})

    state = read_state(settings, broker.bootstrap_servers, max_tail=100)
    save_state(state, tmp_path / "state.jsonl.gz")
    write_state(settings, fresh_broker.bootstrap_servers, load_state(tmp_path / "state.jsonl.gz"))

    assert cluster_id(settings, fresh_broker.bootstrap_servers) != state.cluster_id == broker.cluster_id
    assert read_all(fresh_broker.bootstrap_servers, outcomes, 4)[0] == [(b"o6", b"v6"), (b"o7", b"v7"), (b"o8", b"v8"),
                                                                       (b"o9", b"v9")], "from the slowest group on"
    assert read_all(fresh_broker.bootstrap_servers, quotas, 1)[0] == [(b"plan", b"p4")], "nobody consumes: latest kept"
    assert read_all(fresh_broker.bootstrap_servers, changelog, 2) == {0: [(b"b", b"b1"), (b"a", b"a2")], 1: []}, \
        "a table's latest value per key, a deleted key gone"
    admin = KafkaAdminClient(bootstrap_servers=fresh_broker.bootstrap_servers)
    moved = {g: admin.list_group_offsets(g)[g][TopicPartition(outcomes, 0)].offset for g in ("stream", "slow")
             for g in [f"{prefix}{g}"]}
    admin.close()
    assert moved == {f"{prefix}stream": 1, f"{prefix}slow": 0}, "each group resumes at the same record"


def test_an_unconsumed_tail_longer_than_max_tail_keeps_the_newest_and_counts_the_rest(
    settings: Settings, broker: EmbeddedBroker
) -> None:
    rejected = f"{settings.kafka.topic_prefix}samples.rejected"
    produce(broker.bootstrap_servers, rejected, [(1, b"r%d" % i, b"x") for i in range(30)])

    state = read_state(settings, broker.bootstrap_servers, max_tail=8)

    [topic] = [t for t in state.topics if t.name == rejected]
    assert [r.key for r in topic.records] == [b"r%d" % i for i in range(22, 30)]
    assert topic.dropped == 22 and state.dropped == 22
    assert all(r.headers == (("h", r.key),) and r.timestamp_ms == 1_000 for r in topic.records)


def test_a_run_bus_rolls_saves_and_resumes_its_records(settings: Settings, tmp_path: Path) -> None:
    """`RunBus` owns an embedded broker: a roll moves the records to a fresh broker (epoch 1, bus.json
    says where), a stop saves them, a resume brings them back on yet another broker."""
    import json

    from dpe.spiral.bus import RunBus

    own = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": None})})
    quotas = f"{settings.kafka.topic_prefix}quotas"
    bus = RunBus(own, tmp_path / "run", memory_mb=10_000, max_tail=100).start(resume=False)
    try:
        KafkaAdminClient(bootstrap_servers=bus.bootstrap).create_topics([NewTopic(quotas, 1, 1)])
        produce(bus.bootstrap, quotas, [(0, b"plan", b"p1"), (0, b"plan", b"p2")])
        first = bus.bootstrap
        assert not bus.due(), "far below its bound"
        roll = bus.roll()
        assert (roll.epoch, roll.carried) == (1, 1) and bus.bootstrap != first
        assert json.loads((tmp_path / "run" / "bus.json").read_text())["bootstrap_servers"] == bus.bootstrap
        assert read_all(bus.bootstrap, quotas, 1)[0] == [(b"plan", b"p2")]
        produce(bus.bootstrap, quotas, [(0, b"plan", b"p3")])
    finally:
        bus.stop()

    resumed = RunBus(own, tmp_path / "run", memory_mb=10_000, max_tail=100).start(resume=True)
    try:
        assert read_all(resumed.bootstrap, quotas, 1)[0] == [(b"plan", b"p3")]
        assert json.loads((tmp_path / "run" / "bus.json").read_text())["epoch"] == 2, "epochs go on counting"
    finally:
        resumed.stop()
