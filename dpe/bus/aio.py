"""Async publisher and subscriber on aiokafka.

The publisher takes events, finds their topic from the registry and validates size; the subscriber
yields batches of validated deliveries, routes everything that cannot be decoded to the
dead-letter topic with its origin and reason, and keeps going. Offsets are committed only when the
caller says so (at-least-once).

Example:
    >>> async def follow(settings):                          # doctest: +SKIP
    ...     async with AsyncPublisher(settings) as pub, AsyncSubscriber(
    ...         settings, [EvalOutcome], group_id="stream", service="weakness", publisher=pub
    ...     ) as sub:
    ...         async for batch in sub.batches():
    ...             ...
    ...             await sub.commit()
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from dpe.broker import resolve_bootstrap
from dpe.bus.codec import encode, headers_for
from dpe.bus.deadletter import RecordLike, dead_letter_for
from dpe.bus.delivery import LAG_REPORT_INTERVAL_S, Delivery, Rejection, record_lag, split_records, topic_specs
from dpe.bus.options import aiokafka_options, consumer_tuning, producer_tuning
from dpe.config import CoreSettings
from dpe.events import Event
from dpe.topics import MODEL_TOPIC, topic_for
from monitoring.metrics import DEADLETTERS, HANDLE_SECONDS, consumed_counter, published_counter


class TransientError(RuntimeError):
    """Raised by a handler for a failure worth retrying: the batch is not committed, not dead-lettered."""


class AsyncPublisher:
    """Publishes events to their registry topic with envelope headers."""

    def __init__(self, settings: CoreSettings, *, producer_name: str = "dpe", bootstrap: str | None = None):
        self.settings = settings
        kafka = settings.kafka
        self._producer = AIOKafkaProducer(
            **aiokafka_options(kafka, bootstrap or resolve_bootstrap(settings), role=producer_name),
            **producer_tuning(kafka),
            max_batch_size=kafka.max_batch_bytes,
            enable_idempotence=False,
        )

    async def start(self) -> "AsyncPublisher":
        await self._producer.start()
        return self

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> "AsyncPublisher":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def topic(self, model: type[Event]) -> str:
        return topic_for(model, self.settings.kafka.topic_prefix)

    async def publish(self, event: Event) -> asyncio.Future:
        """Queue `event` for sending; await the returned future for the broker's acknowledgement."""
        topic = self.topic(type(event))
        value = encode(event, MODEL_TOPIC[type(event)].max_bytes(self.settings.kafka.max_event_bytes))
        future = await self._producer.send(topic, value=value, key=event.key().encode(), headers=headers_for(event))
        published_counter(topic).inc()
        return future

    async def publish_and_wait(self, event: Event) -> None:
        await (await self.publish(event))

    async def flush(self) -> None:
        await self._producer.flush()


class AsyncSubscriber:
    """Consumes validated events of some topics; dead-letters what it cannot decode or handle."""

    def __init__(
        self,
        settings: CoreSettings,
        models: Sequence[type[Event]],
        *,
        group_id: str | None,
        service: str,
        publisher: AsyncPublisher,
        bootstrap: str | None = None,
        auto_offset_reset: str = "earliest",
        subscribe: bool = True,
        read_only: bool = False,
        co_partitioned: bool = False,
    ):
        """`co_partitioned`: the topics are keyed alike on as many partitions, and a group member must own the same
        partition numbers of each (Kafka's range assignment; the default round robin would split them)."""
        self.settings = settings
        self.subscribe = subscribe
        self.read_only = read_only
        self._lag_reported_at = 0.0
        self.service = service
        self.group_id = group_id
        self.publisher = publisher
        prefix = settings.kafka.topic_prefix
        self.topics = [topic_for(model, prefix) for model in models]
        self._specs = topic_specs(self.topics, prefix)
        tuning = consumer_tuning(settings.kafka) | {"auto_offset_reset": auto_offset_reset}
        self.consumer = AIOKafkaConsumer(
            **aiokafka_options(settings.kafka, bootstrap or resolve_bootstrap(settings)),
            **tuning,
            group_id=group_id,
            partition_assignment_strategy=(RangePartitionAssignor if co_partitioned else RoundRobinPartitionAssignor,),
        )

    async def start(self) -> "AsyncSubscriber":
        """Start the consumer; with `subscribe`, join the group for all topics (else assign by hand)."""
        await self.consumer.start()
        if self.subscribe:
            self.consumer.subscribe(self.topics)
        return self

    async def stop(self) -> None:
        await self.consumer.stop()

    async def __aenter__(self) -> "AsyncSubscriber":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def assign_all(self, offsets: dict[TopicPartition, int] | None = None) -> list[TopicPartition]:
        """Assign every partition of the topics by hand, seeking to `offsets` where given."""
        partitions = []
        for topic in self.topics:
            found = await self._partitions_for(topic)
            partitions.extend(TopicPartition(topic, p) for p in sorted(found))
        self.consumer.assign(partitions)
        for tp, offset in (offsets or {}).items():
            self.consumer.seek(tp, offset)
        return partitions

    async def _partitions_for(self, topic: str) -> set[int]:
        for _ in range(50):
            found = self.consumer.partitions_for_topic(topic)
            if found:
                return found
            await self.consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic} has no partitions (does it exist? run `dpe topics create`)")

    async def fetch(self, max_records: int = 1000, timeout_ms: int = 200) -> list[Delivery]:
        """One batch of valid deliveries (possibly empty); rejects go to the dead-letter topic.

        A `read_only` subscriber (an observer such as the live view) skips rejects instead: the
        services that own the topic dead-letter them.
        """
        deliveries, _ = await self._fetch(max_records, timeout_ms)
        return deliveries

    async def batches(self, max_records: int = 1000, timeout_ms: int = 200) -> AsyncIterator[list[Delivery]]:
        """Endless batches of valid deliveries; empty batches come too, so callers can act on time."""
        while True:
            yield await self.fetch(max_records, timeout_ms)

    async def until_end(self, max_records: int = 1000, timeout_ms: int = 500) -> AsyncIterator[list[Delivery]]:
        """Batches of valid deliveries until a fetch brings no record at all (nothing more within `timeout_ms`).

        A fetch whose records all fail to decode (a 6 MB record comes alone) yields an empty batch: it is not
        the end of the topic, and the valid records behind it are still read.
        """
        while True:
            deliveries, fetched = await self._fetch(max_records, timeout_ms)
            if not fetched:
                return
            yield deliveries

    async def _fetch(self, max_records: int, timeout_ms: int) -> tuple[list[Delivery], int]:
        """One batch of valid deliveries (rejects dead-lettered or, read-only, skipped), and how many records were
        fetched, valid or not."""
        data = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        records = [record for batch in data.values() for record in batch]
        deliveries, rejections = split_records(records, self._specs, self.settings.kafka.max_event_bytes)
        for rejection in rejections if not self.read_only else ():
            await self._send_dead_letter(rejection)
        for delivery in deliveries:
            consumed_counter(delivery.topic).inc()
        if time.monotonic() - self._lag_reported_at >= LAG_REPORT_INTERVAL_S:
            await self.lag()
        return deliveries, len(records)

    async def dead_letter(self, record: RecordLike | Delivery, error: Exception, stage: str) -> None:
        """Send a record that was valid but could not be processed to the dead-letter topic."""
        raw = record.record if isinstance(record, Delivery) else record
        await self._publish_dead_letter(raw, error, f"{self.service}.{stage}")

    async def _send_dead_letter(self, rejection: Rejection) -> None:
        await self._publish_dead_letter(rejection.record, rejection.error, "decode")

    async def _publish_dead_letter(self, record: RecordLike, error: Exception, stage: str) -> None:
        """Publish the dead letter of `record`, sized for the publisher's dead-letter topic."""
        max_event_bytes = self.publisher.settings.kafka.max_event_bytes
        letter = dead_letter_for(record, error, stage, self.service, max_event_bytes)
        await self.publisher.publish_and_wait(letter)
        DEADLETTERS.labels(letter.origin_topic, letter.stage, letter.error_class).inc()

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Commit the consumed positions, or `offsets` (call after the batch's effects are durable)."""
        if self.group_id is not None:
            await self.consumer.commit(offsets)

    async def lag(self) -> dict[TopicPartition, int]:
        """Messages behind the high-water mark of the last fetch, per assigned partition."""
        lags = {}
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                lags[tp] = max(0, highwater - await self.consumer.position(tp))
        record_lag(self.group_id, lags)
        self._lag_reported_at = time.monotonic()
        return lags

    async def run(
        self,
        handle: Callable[[Delivery], Awaitable[None]],
        stop: asyncio.Event,
        *,
        max_records: int = 1000,
    ) -> None:
        """Handle every delivery until `stop` is set; failures are dead-lettered, batches committed.

        A handler raising `TransientError` aborts the batch without committing (it is redelivered
        after a restart); any other exception dead-letters that one event and the loop goes on.
        """
        while not stop.is_set():
            deliveries = await self.fetch(max_records)
            started = time.perf_counter()
            for delivery in deliveries:
                try:
                    await handle(delivery)
                except TransientError:
                    raise
                except Exception as error:  # noqa: BLE001 - any handler failure must not stop the service
                    await self.dead_letter(delivery, error, "handle")
            await self.publisher.flush()
            await self.commit()
            if deliveries:
                HANDLE_SECONDS.labels(self.service).observe(time.perf_counter() - started)
