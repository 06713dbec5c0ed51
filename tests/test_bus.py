"""The bus against the real embedded broker: round trips, dead letters, lag, commits."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from aiokafka import AIOKafkaProducer

from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.bus.codec import HEADER_EVENT_ID, HEADER_SCHEMA_VERSION
from dpe.bus.sync import Publisher, Subscriber
from dpe.events import Checkpoint, DeadLetter, EvalOutcome
from dpe.topics import topic_for


def outcome(i: int, **changes) -> EvalOutcome:
    fields = dict(policy_version=1, suite="synthetic", item_id=f"item-{i}", capability="counting",
                  answer_type="number", expected="3", predicted="\\boxed{4}", correct=False, score=0.0)
    return EvalOutcome(**(fields | changes))


async def drain(sub: AsyncSubscriber, want: int, timeout_s: float = 15.0) -> list:
    got: list = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(got) < want and asyncio.get_running_loop().time() < deadline:
        got.extend(await sub.fetch(timeout_ms=100))
    return got


async def raw_send(settings, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, max_request_size=8 << 20)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value=value, key=b"counting")
    finally:
        await producer.stop()


async def test_round_trip_keeps_order_headers_and_key(settings):
    async with AsyncPublisher(settings, producer_name="test") as pub:
        for i in range(50):
            await pub.publish(outcome(i))
        await pub.flush()
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="g1", service="test", publisher=pub) as sub:
            got = await drain(sub, 50)
    assert [d.event.item_id for d in got] == [f"item-{i}" for i in range(50)]
    first = got[0]
    headers = dict(first.record.headers)
    assert headers[HEADER_EVENT_ID].decode() == first.event.event_id
    assert headers[HEADER_SCHEMA_VERSION] == b"1"
    assert first.record.key == b"counting"
    assert all(isinstance(d.event, EvalOutcome) for d in got)


BAD_VALUES = {
    "MalformedJSON": b"{this is not json",
    "SchemaViolation": json.dumps({"policy_version": "seven", "suite": "s"}).encode(),
    "UnsupportedSchemaVersion": outcome(0).model_copy(update={"schema_version": 99}).model_dump_json().encode(),
    "OversizedEvent": b"{" + b" " * (2 << 20) + b"}",
}


async def test_bad_records_go_to_dead_letter_with_reason_and_valid_ones_survive(settings):
    topic = topic_for(EvalOutcome, settings.kafka.topic_prefix)
    missing_lineage = outcome(1).model_dump(mode="json")
    del missing_lineage["policy_version"]
    nan_score = outcome(2).model_dump(mode="json") | {"score": float("nan")}
    values = [outcome(100).model_dump_json().encode(), *BAD_VALUES.values(), json.dumps(missing_lineage).encode(),
              json.dumps(nan_score, allow_nan=True).encode(), outcome(101).model_dump_json().encode()]
    await raw_send(settings, topic, values)

    async with AsyncPublisher(settings) as pub:
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="g", service="weakness", publisher=pub) as sub:
            valid = await drain(sub, 2)
        async with AsyncSubscriber(settings, [DeadLetter], group_id="dl", service="test", publisher=pub) as dl:
            letters = [d.event for d in await drain(dl, 6)]

    assert [d.event.item_id for d in valid] == ["item-100", "item-101"]
    assert [letter.error_class for letter in letters] == [*BAD_VALUES, "SchemaViolation", "SchemaViolation"]
    by_offset = {letter.origin_offset: letter for letter in letters}
    assert set(by_offset) == {1, 2, 3, 4, 5, 6}
    for offset, value in enumerate(values[1:-1], start=1):
        letter = by_offset[offset]
        assert letter.origin_topic == topic and letter.origin_partition is not None
        assert base64.b64decode(letter.payload_b64) == value, "the original payload must be kept untouched"
        assert letter.stage in ("decode", "validate")
    assert "policy_version" in letters[4].error_message and "required" in letters[4].error_message.lower()
    assert "score" in letters[5].error_message
    assert "99" in letters[2].error_message and "newer" in letters[2].error_message


async def test_handler_failure_is_dead_lettered_and_loop_continues(settings):
    seen: list[str] = []

    async def handle(delivery):
        if delivery.event.item_id == "item-1":
            raise LookupError("image missing from the blob store")
        seen.append(delivery.event.item_id)

    async with AsyncPublisher(settings) as pub:
        for i in range(3):
            await pub.publish(outcome(i))
        await pub.flush()
        stop = asyncio.Event()
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="h", service="svc", publisher=pub) as sub:
            task = asyncio.create_task(sub.run(handle, stop))
            for _ in range(150):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await task
        async with AsyncSubscriber(settings, [DeadLetter], group_id="dl", service="test", publisher=pub) as dl:
            letters = [d.event for d in await drain(dl, 1)]
    assert seen == ["item-0", "item-2"]
    assert len(letters) == 1
    assert letters[0].stage == "svc.handle" and letters[0].error_class == "LookupError"
    assert "blob store" in letters[0].error_message


async def test_committed_offsets_resume_where_the_group_left_off(settings):
    async with AsyncPublisher(settings) as pub:
        for i in range(10):
            await pub.publish(outcome(i))
        await pub.flush()
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="resume", service="t", publisher=pub) as sub:
            first = await drain(sub, 10)
            await sub.commit()
        for i in range(10, 15):
            await pub.publish(outcome(i))
        await pub.flush()
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="resume", service="t", publisher=pub) as sub:
            second = await drain(sub, 5)
            lag = await sub.lag()
    assert len(first) == 10
    assert [d.event.item_id for d in second] == [f"item-{i}" for i in range(10, 15)]
    assert sum(lag.values()) == 0


async def test_lag_counts_unread_messages_from_the_high_water_mark(settings):
    async with AsyncPublisher(settings) as pub:
        for i in range(40):
            await pub.publish(outcome(i))
        await pub.flush()
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="lag", service="t", publisher=pub) as sub:
            got = await sub.fetch(max_records=15, timeout_ms=3000)
            while not got:
                got = await sub.fetch(max_records=15, timeout_ms=500)
            lag = await sub.lag()
    assert sum(lag.values()) == 40 - len(got)


def test_sync_client_round_trip_and_dead_letter(settings):
    topic = topic_for(Checkpoint, settings.kafka.topic_prefix)
    with Publisher(settings) as pub:
        pub.publish(Checkpoint(policy_version=1, uri="/c/1")).get(timeout=10)
        pub._producer.send(topic, value=b"[1, 2, 3]", key=b"policy").get(timeout=10)
        pub.publish(Checkpoint(policy_version=2, parent_version=1, uri="/c/2")).get(timeout=10)
        with Subscriber(settings, [Checkpoint], group_id="s", service="sync", publisher=pub) as sub:
            got = []
            for _ in range(100):
                got.extend(sub.fetch(timeout_ms=100))
                if len(got) == 2:
                    break
        with Subscriber(settings, [DeadLetter], group_id="d", service="sync", publisher=pub) as dl:
            letters = []
            for _ in range(100):
                letters.extend(dl.fetch(timeout_ms=100))
                if letters:
                    break
    assert [d.event.policy_version for d in got] == [1, 2]
    assert letters[0].event.error_class == "MalformedJSON" and letters[0].event.origin_offset == 1


async def test_publisher_refuses_oversized_events(settings):
    from dpe.bus.codec import InvalidEvent

    huge = Checkpoint(policy_version=1, uri="/c", sample_ids=[f"s{i:08d}" for i in range(200_000)])
    async with AsyncPublisher(settings) as pub:
        with pytest.raises(InvalidEvent, match="OversizedEvent"):
            await pub.publish(huge)
