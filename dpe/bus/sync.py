"""Blocking publisher and subscriber on kafka-python, for scripts and tools.

Same contract as `dpe.bus.aio`: events in, validated deliveries out, undecodable records to the
dead-letter topic with the reason, commits only when asked.

Example:
    >>> with Publisher(settings) as pub:                       # doctest: +SKIP
    ...     pub.publish(checkpoint_event)
"""

from __future__ import annotations

import time
from typing import Sequence

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.future import Future

from dpe.broker import resolve_bootstrap
from dpe.bus.codec import encode, headers_for
from dpe.bus.deadletter import RecordLike, dead_letter_for
from dpe.bus.delivery import LAG_REPORT_INTERVAL_S, Delivery, record_lag, split_records, topic_specs
from dpe.bus.options import consumer_tuning, kafka_python_options, producer_tuning
from dpe.config import CoreSettings
from dpe.events import Event
from dpe.topics import MODEL_TOPIC, topic_for
from monitoring.metrics import DEADLETTERS, consumed_counter, published_counter


class Publisher:
    """Publishes events to their registry topic with envelope headers."""

    def __init__(self, settings: CoreSettings, *, producer_name: str = "dpe", bootstrap: str | None = None):
        self.settings = settings
        kafka = settings.kafka
        self._producer = KafkaProducer(
            **kafka_python_options(kafka, bootstrap or resolve_bootstrap(settings), role=producer_name),
            **producer_tuning(kafka),
            batch_size=kafka.max_batch_bytes,
        )

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()

    def publish(self, event: Event) -> Future:
        """Queue `event`; `.get(timeout)` on the result waits for the acknowledgement."""
        topic = topic_for(type(event), self.settings.kafka.topic_prefix)
        value = encode(event, MODEL_TOPIC[type(event)].max_bytes(self.settings.kafka.max_event_bytes))
        future = self._producer.send(topic, value=value, key=event.key().encode(), headers=headers_for(event))
        published_counter(topic).inc()
        return future

    def flush(self) -> None:
        self._producer.flush()


class Subscriber:
    """Consumes validated events of some topics; dead-letters what it cannot decode or handle."""

    def __init__(
        self,
        settings: CoreSettings,
        models: Sequence[type[Event]],
        *,
        group_id: str | None,
        service: str,
        publisher: Publisher,
        bootstrap: str | None = None,
        subscribe: bool = True,
    ):
        self.settings = settings
        self.service = service
        self.group_id = group_id
        self.publisher = publisher
        self._lag_reported_at = 0.0
        prefix = settings.kafka.topic_prefix
        self.topics = [topic_for(model, prefix) for model in models]
        self._specs = topic_specs(self.topics, prefix)
        self.consumer = KafkaConsumer(
            **kafka_python_options(settings.kafka, bootstrap or resolve_bootstrap(settings)),
            **consumer_tuning(settings.kafka),
            group_id=group_id,
        )
        if subscribe:
            self.consumer.subscribe(self.topics)

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close()

    def assign_all(self) -> list[TopicPartition]:
        """Assign every partition of the topics by hand (no group)."""
        partitions = [
            TopicPartition(topic, p) for topic in self.topics for p in sorted(self.consumer.partitions_for_topic(topic) or ())
        ]
        self.consumer.assign(partitions)
        return partitions

    def fetch(self, max_records: int = 1000, timeout_ms: int = 200) -> list[Delivery]:
        """One batch of valid deliveries (possibly empty); rejects go to the dead-letter topic."""
        data = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        records = [record for batch in data.values() for record in batch]
        deliveries, rejections = split_records(records, self._specs, self.settings.kafka.max_event_bytes)
        for rejection in rejections:
            self._publish_dead_letter(rejection.record, rejection.error, "decode")
        for delivery in deliveries:
            consumed_counter(delivery.topic).inc()
        if time.monotonic() - self._lag_reported_at >= LAG_REPORT_INTERVAL_S:
            self.lag()
        return deliveries

    def dead_letter(self, record: RecordLike | Delivery, error: Exception, stage: str) -> None:
        """Send a record that was valid but could not be processed to the dead-letter topic."""
        raw = record.record if isinstance(record, Delivery) else record
        self._publish_dead_letter(raw, error, f"{self.service}.{stage}")

    def _publish_dead_letter(self, record: RecordLike, error: Exception, stage: str) -> None:
        """Publish the dead letter of `record`, sized for this bus's dead-letter topic."""
        letter = dead_letter_for(record, error, stage, self.service, self.settings.kafka.max_event_bytes)
        self.publisher.publish(letter).get(timeout=30)
        DEADLETTERS.labels(letter.origin_topic, letter.stage, letter.error_class).inc()

    def commit(self) -> None:
        if self.group_id is not None:
            self.consumer.commit()

    def lag(self) -> dict[TopicPartition, int]:
        """Messages behind the high-water mark of the last fetch, per assigned partition."""
        lags = {
            tp: max(0, highwater - self.consumer.position(tp))
            for tp in self.consumer.assignment()
            if (highwater := self.consumer.highwater(tp)) is not None
        }
        record_lag(self.group_id, lags)
        self._lag_reported_at = time.monotonic()
        return lags
