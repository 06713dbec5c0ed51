"""Micro-rounds: read a task's events from hand-assigned partitions until a round is full or due.

A round closes after `RoundSettings.max_samples` admitted events or `max_seconds` after its first
one. It covers a contiguous offset range per partition, from where the last checkpoint stopped to
the current read position, including the records that were not trained on: duplicates (already
trained or twice in the round), those the task skips (stale samples), records dead-lettered by the
bus (decode) or here (missing or corrupt image, ungradable answer). Nothing is committed to Kafka:
the positions go into the checkpoint, which is what makes the effect exactly-once.

Example:
    >>> from aiokafka import TopicPartition
    >>> tp = TopicPartition("dpe.samples.accepted", 0)
    >>> Round(start={tp: 3}, end={tp: 7}).trained_on()
    [OffsetRange(topic='dpe.samples.accepted', partition=0, start=3, end=7)]
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from dpe.blobstore import BlobStore
from dpe.bus.aio import AsyncSubscriber
from dpe.bus.delivery import Delivery, Skipped
from dpe.events import OffsetRange
from dpe.recent import RecentIds
from monitoring.metrics import TRAINER_LAG, TRAINER_SAMPLE_OUTCOMES, TRAINER_SAMPLES
from trainer.engine import Prompted
from trainer.settings import TrainerSettings
from trainer.task import TrainingTask


@dataclass
class Round:
    """A micro-round being read: the offsets it covers, its admitted samples (rows for GRPO) and their ids, and what
    it skipped."""

    start: dict[TopicPartition, int]
    end: dict[TopicPartition, int]
    samples: list[Prompted] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    first_sample_at: float | None = None
    consume_seconds: float = 0.0

    def trained_on(self) -> list[OffsetRange]:
        """The non-empty offset ranges [start, end) the round read, per partition."""
        return [
            OffsetRange(topic=tp.topic, partition=tp.partition, start=self.start.get(tp, 0), end=end)
            for tp, end in sorted(self.end.items())
            if end > self.start.get(tp, 0)
        ]

    def sample_ids(self) -> list[str]:
        return list(self.ids)


def positions_by_topic(positions: dict[TopicPartition, int]) -> dict[str, dict[int, int]]:
    """Positions as topic -> partition -> offset (the checkpoint's form).

    Example:
        >>> positions_by_topic({TopicPartition("t", 1): 5})
        {'t': {1: 5}}
    """
    out: dict[str, dict[int, int]] = defaultdict(dict)
    for tp, offset in positions.items():
        out[tp.topic][tp.partition] = offset
    return dict(out)


def positions_from_topics(positions: dict[str, dict[int, int]]) -> dict[TopicPartition, int]:
    """The inverse of `positions_by_topic`."""
    return {
        TopicPartition(topic, partition): offset
        for topic, parts in positions.items()
        for partition, offset in parts.items()
    }


class RoundCollector:
    """Reads a task's rounds from an `AsyncSubscriber` assigned by hand (``subscribe=False``) and seeked."""

    def __init__(self, subscriber: AsyncSubscriber, blobs: BlobStore, settings: TrainerSettings, recent: RecentIds,
                 task: TrainingTask):
        self.subscriber = subscriber
        self.task = task
        self.blobs = blobs
        self.settings = settings
        self.recent = recent
        self.pending = Round(start={}, end={})
        for outcome in TRAINER_SAMPLE_OUTCOMES:  # exported at 0 from the start, not only after a first event
            TRAINER_SAMPLES.labels(outcome)

    async def start(self) -> None:
        """Open the first round at the subscriber's current positions (after `assign_all`)."""
        positions = await self._positions()
        self.pending = Round(start=dict(positions), end=dict(positions))

    async def collect(self, policy_version: int, stop: asyncio.Event) -> Round:
        """Read until the pending round is full or due, `max_seconds` pass without a sample, or `stop`.

        Returns the pending round; it stays pending (and keeps growing on the next call) until
        `committed` is called, so records skipped in an empty round are covered by the next checkpoint.
        """
        rounds = self.settings.rounds
        pending = self.pending
        opened = time.monotonic()
        while not stop.is_set() and len(pending.samples) < rounds.max_samples:
            now = time.monotonic()
            since = pending.first_sample_at if pending.first_sample_at is not None else opened
            if now - since >= rounds.max_seconds:
                break
            started = time.perf_counter()
            deliveries = await self.subscriber.fetch(rounds.max_samples - len(pending.samples), rounds.fetch_timeout_ms)
            for delivery in deliveries:
                await self._admit(delivery, policy_version)
            pending.end = await self._positions()
            if deliveries:
                pending.consume_seconds += time.perf_counter() - started
        TRAINER_LAG.set(sum((await self.subscriber.lag()).values()))
        return pending

    def pause(self) -> None:
        """Stop fetching while a round trains and checkpoints: no broker traffic competes for the CPU."""
        consumer = self.subscriber.consumer
        consumer.pause(*consumer.assignment())

    def resume(self) -> None:
        consumer = self.subscriber.consumer
        consumer.resume(*consumer.assignment())

    def committed(self) -> None:
        """The pending round is in a checkpoint: remember its ids and open the next round where it ended."""
        for sample_id in self.pending.sample_ids():
            self.recent.add(sample_id)
        self.pending = Round(start=dict(self.pending.end), end=dict(self.pending.end))

    async def _admit(self, delivery: Delivery, policy_version: int) -> None:
        pending = self.pending
        item_id = self.task.item_id(delivery.event)
        if item_id in self.recent or item_id in pending.ids:
            self._skip("duplicate", item_id)
            return
        try:
            sample = await asyncio.to_thread(self.task.admit, delivery.event, self.blobs, policy_version)
        except Skipped as skipped:
            self._skip(skipped.reason, item_id)
            return
        except Exception as error:  # noqa: BLE001 - any unusable event is dead-lettered, the round goes on
            await self.subscriber.dead_letter(delivery, error, "admit")
            self._skip("dead_lettered", item_id)
            return
        pending.samples.append(sample)
        pending.ids.append(item_id)
        if pending.first_sample_at is None:
            pending.first_sample_at = time.monotonic()

    def _skip(self, reason: str, sample_id: str) -> None:
        self.pending.skipped[reason].append(sample_id)
        TRAINER_SAMPLES.labels(reason).inc()

    async def _positions(self) -> dict[TopicPartition, int]:
        consumer = self.subscriber.consumer
        return {tp: await consumer.position(tp) for tp in sorted(consumer.assignment())}
