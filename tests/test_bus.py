"""The bus against the real embedded broker: round trips, dead letters, lag, commits."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.bus.codec import HEADER_EVENT_ID, HEADER_SCHEMA_VERSION, encode
from dpe.bus.deadletter import PREFIX_BYTES, dead_letter_for, dead_letter_limit
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


async def run_until(sub: AsyncSubscriber, handle, done, timeout_s: float = 20.0) -> None:
    """Run the subscriber's loop until `done()` (or the timeout), then stop it; its errors propagate."""
    stop = asyncio.Event()
    task = asyncio.create_task(sub.run(handle, stop))
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not done() and not task.done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    stop.set()
    await task


async def test_an_oversized_record_is_dead_lettered_truncated_and_never_stops_the_loop(settings):
    topic = topic_for(EvalOutcome, settings.kafka.topic_prefix)
    big = b'{"policy_version": 1, "padding": "' + b"x" * (6 << 20) + b'"}'
    await raw_send(settings, topic, [outcome(0).model_dump_json().encode(), big, outcome(2).model_dump_json().encode()])
    seen: list[str] = []

    async def handle(delivery):
        seen.append(delivery.event.item_id)

    async with AsyncPublisher(settings) as pub:
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="big", service="svc", publisher=pub) as sub:
            await run_until(sub, handle, lambda: len(seen) == 2)
        async with AsyncSubscriber(settings, [DeadLetter], group_id="dl", service="test", publisher=pub) as dl:
            (letter,) = [d.event for d in await drain(dl, 1)]
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="big", service="svc", publisher=pub) as sub:
            await run_until(sub, handle, lambda: False, timeout_s=3)  # the restart: nothing left, nothing fails
            committed = await sub.consumer.committed(TopicPartition(topic, letter.origin_partition))
    assert seen == ["item-0", "item-2"], "the records before and after the big one are all delivered"
    assert committed == 3, "the committed offset is past every record, handled or dead-lettered"
    assert (letter.origin_topic, letter.origin_offset, letter.origin_key) == (topic, 1, "counting")
    assert letter.error_class == "OversizedEvent" and letter.stage == "decode"
    assert letter.truncated and letter.payload_bytes == len(big)
    assert letter.payload_sha256 == hashlib.sha256(big).hexdigest()
    prefix = base64.b64decode(letter.payload_b64)
    assert 0 < len(prefix) <= PREFIX_BYTES and big.startswith(prefix)


HUGE_HEADERS = [(f"h{i}-" + "\x01" * 5000, b"\x02" * 100_000) for i in range(40)]


@pytest.mark.parametrize("max_event_bytes", [1024, 1 << 20])
def test_a_dead_letter_always_fits_the_dead_letter_topic(max_event_bytes):
    """Whatever the record (value, key, headers) and however small the events, its letter can be sent."""
    record = SimpleNamespace(topic="dpe.eval.outcomes", partition=0, offset=9, key=b"\x03" * 100_000,
                             value=b"v" * (6 << 20), headers=HUGE_HEADERS)
    letter = dead_letter_for(record, ValueError("\x04" * 20_000), "decode", "test", max_event_bytes)
    limit = dead_letter_limit(max_event_bytes)
    assert len(encode(letter, limit)) <= limit
    assert letter.truncated and letter.payload_bytes == 6 << 20 and (letter.origin_topic, letter.origin_offset) == (
        "dpe.eval.outcomes", 9)
    assert base64.b64decode(letter.payload_b64) == record.value[:len(base64.b64decode(letter.payload_b64))]


def test_a_dead_letter_that_fits_keeps_everything_untouched():
    record = SimpleNamespace(topic="t", partition=1, offset=2, key=b"k", value=b"{oops", headers=[("h", b"v")])
    letter = dead_letter_for(record, ValueError("bad"), "decode", "test", 1 << 20)
    assert not letter.truncated and base64.b64decode(letter.payload_b64) == b"{oops"
    assert (letter.payload_bytes, letter.payload_sha256) == (5, hashlib.sha256(b"{oops").hexdigest())
    assert (letter.origin_key, letter.headers, letter.error_message) == ("k", {"h": "v"}, "bad")


STRICT_CASES = {
    "a string for a boolean": ({"correct": "yes"}, ("correct", "boolean")),
    "a string for an integer": ({"policy_version": "3"}, ("policy_version", "integer")),
    "a float for an integer": ({"policy_version": 3.0}, ("policy_version", "integer")),
    "a string for a number": ({"score": "0.5"}, ("score", "number")),
    "a version out of range": ({"policy_version": 10**12}, ("policy_version", "not below 1000000000")),
}


async def test_lenient_types_and_out_of_range_numbers_are_dead_lettered_at_decode(settings):
    topic = topic_for(EvalOutcome, settings.kafka.topic_prefix)
    valid = json.loads(outcome(0).model_dump_json())
    bad = [json.dumps(valid | changes).encode() for changes, _ in STRICT_CASES.values()]
    await raw_send(settings, topic, [outcome(100).model_dump_json().encode(), *bad,
                                     outcome(101).model_dump_json().encode()])
    async with AsyncPublisher(settings) as pub:
        async with AsyncSubscriber(settings, [EvalOutcome], group_id="g", service="svc", publisher=pub) as sub:
            delivered = await drain(sub, 2)
        async with AsyncSubscriber(settings, [DeadLetter], group_id="dl", service="test", publisher=pub) as dl:
            letters = {d.event.origin_offset: d.event for d in await drain(dl, len(bad))}
    assert [d.event.item_id for d in delivered] == ["item-100", "item-101"]
    for offset, (case, (_, words)) in enumerate(STRICT_CASES.items(), start=1):
        letter = letters[offset]
        assert letter.error_class == "SchemaViolation" and letter.stage == "validate", case
        assert all(word in letter.error_message for word in words), (case, letter.error_message)
