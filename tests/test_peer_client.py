"""A peer Kafka client (confluent-kafka, librdkafka) reads what dpe writes and writes what dpe reads."""

from __future__ import annotations

import asyncio
import json

from confluent_kafka import Consumer, Producer

from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.bus.codec import HEADER_EVENT_TYPE
from dpe.events import EvalOutcome, UnlabeledItem
from dpe.topics import topic_for
from tests.test_bus import drain, outcome


async def test_peer_reads_what_dpe_writes(settings):
    async with AsyncPublisher(settings) as pub:
        for i in range(5):
            await pub.publish(outcome(i))
        await pub.flush()
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "peer",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([topic_for(EvalOutcome, settings.kafka.topic_prefix)])
    got = []
    try:
        for _ in range(200):
            message = await asyncio.to_thread(consumer.poll, 0.1)
            if message is not None and message.error() is None:
                got.append(message)
            if len(got) == 5:
                break
    finally:
        consumer.close()
    assert sorted(json.loads(m.value())["item_id"] for m in got) == [f"item-{i}" for i in range(5)]
    assert all(m.key() == b"counting" for m in got)
    assert all(dict(m.headers())[HEADER_EVENT_TYPE] == b"EvalOutcome" for m in got)


async def test_dpe_reads_what_a_peer_writes(settings):
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    topic = topic_for(UnlabeledItem, settings.kafka.topic_prefix)
    foreign = {"item_id": "peer-1", "source": "s3://bucket/a.png", "producer": "java-ingest",
               "image": {"sha256": "b" * 64, "media_type": "image/png", "size_bytes": 5, "width": 2, "height": 2}}
    producer.produce(topic, key=b"peer-1", value=json.dumps(foreign).encode())
    producer.produce(topic, key=b"peer-2", value=b"\x00\x01 binary junk")
    producer.flush(10)
    async with AsyncPublisher(settings) as pub:
        async with AsyncSubscriber(settings, [UnlabeledItem], group_id="dpe", service="t", publisher=pub) as sub:
            got = await drain(sub, 1)
    assert len(got) == 1
    item = got[0].event
    assert item.item_id == "peer-1" and item.producer == "java-ingest"
    assert item.schema_version == 1, "a peer may omit envelope fields that have defaults"
