"""A read-only view of topics that every agent worker follows in full: quota plans, accepted samples, checkpoints.

The follower reads every partition of its topics from the beginning (no consumer group) and hands
each fetched batch to one small handler per event type, in log order. `synced(after_ms)` waits
until the view is complete as of a moment: every partition answered a fetch sent after that
moment and everything up to that answer's high-water mark has been handled. (High-water marks
come from fetch responses, not `end_offsets`, which the embedded broker gets wrong.)

Records that do not decode are logged and skipped here; dead-lettering them is the job of the
topic's owning consumer group, so N workers do not file N copies. A topic that no consumer group
owns (the quota plans: every agent worker follows them, none consumes them in a group) is named
in `dead_letters`: its undecodable records are dead-lettered by every follower, one letter each.

Example:
    >>> follower = Follower(settings, publisher, {QuotaPlan: on_plans})   # doctest: +SKIP
    >>> await follower.start(); await follower.synced(now_ms())            # doctest: +SKIP
    >>> plans = await read_topic(settings, QuotaPlan)                     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.bus.delivery import Rejection, split_records, topic_specs
from dpe.config import CoreSettings
from dpe.events import Event

log = logging.getLogger(__name__)

Handler = Callable[[Sequence[Event]], Awaitable[None]]


def now_ms() -> int:
    """Wall-clock milliseconds, the clock of the consumer's fetch timestamps."""
    return int(time.time() * 1000)


class Follower:
    """Reads its topics in full and keeps handlers up to date; see the module docstring."""

    def __init__(self, settings: CoreSettings, publisher: AsyncPublisher, handlers: Mapping[type[Event], Handler], *,
                 service: str = "follower", dead_letters: Collection[type[Event]] = ()):
        self.settings = settings
        self.handlers = dict(handlers)
        self.dead_letters = frozenset(dead_letters)
        self.sub = AsyncSubscriber(settings, list(handlers), group_id=None, service=service,
                                   publisher=publisher, subscribe=False)
        self._specs = topic_specs(self.sub.topics, settings.kafka.topic_prefix)
        self._guard_ms = settings.kafka.fetch_max_wait_ms + 100
        self._synced_ms = 0
        self._stopped = False
        self._tick = asyncio.Event()

    async def start(self) -> "Follower":
        await self.sub.start()
        await self.sub.assign_all()
        return self

    async def stop(self) -> None:
        await self.sub.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the handlers up to date until `stop` is set."""
        try:
            while not stop.is_set():
                await self.poll()
        finally:
            self._stopped = True
            self._tick.set()

    async def poll(self, timeout_ms: int = 100) -> None:
        """One fetch: hand its events to the handlers, then note whether the view is complete."""
        data = await self.sub.consumer.getmany(timeout_ms=timeout_ms, max_records=2000)
        records = [record for batch in data.values() for record in batch]
        deliveries, rejections = split_records(records, self._specs, self.settings.kafka.max_event_bytes)
        for rejection in rejections:
            await self._refuse(rejection)
        by_type: dict[type[Event], list[Event]] = defaultdict(list)
        for delivery in deliveries:
            by_type[type(delivery.event)].append(delivery.event)
        for model, events in by_type.items():
            await self.handlers[model](events)
        await self._note_progress()

    async def _refuse(self, rejection: Rejection) -> None:
        """Dead-letter an undecodable record of a topic in `dead_letters`; log and skip any other."""
        record = rejection.record
        if self._specs[record.topic].model in self.dead_letters:
            await self.sub.dead_letter(record, rejection.error, "decode")
        else:
            log.warning("skipping undecodable record %s[%s]@%s: %s", record.topic, record.partition, record.offset,
                        rejection.error)

    async def _note_progress(self) -> None:
        consumer = self.sub.consumer
        stamps = []
        for tp in consumer.assignment():
            highwater, stamp = consumer.highwater(tp), consumer.last_poll_timestamp(tp)
            if highwater is None or stamp is None or await consumer.position(tp) < highwater:
                break
            stamps.append(stamp)
        else:
            if stamps:
                self._synced_ms = min(stamps)
        self._tick.set()
        self._tick = asyncio.Event()

    async def synced(self, after_ms: int) -> None:
        """Wait until everything written before `after_ms` has been handled (needs `run` going)."""
        target = after_ms + self._guard_ms
        while self._synced_ms < target:
            if self._stopped:
                raise RuntimeError("the follower stopped before it caught up")
            await self._tick.wait()


async def read_topic(settings: CoreSettings, model: type[Event], timeout_s: float = 60.0) -> list[Event]:
    """Every event of `model`'s topic written before the call, all partitions, no consumer group."""
    events: list[Event] = []

    async def collect(batch: Sequence[Event]) -> None:
        events.extend(batch)

    started = now_ms()
    async with AsyncPublisher(settings, producer_name="reader") as publisher:
        follower = await Follower(settings, publisher, {model: collect}).start()
        stop = asyncio.Event()
        task = asyncio.create_task(follower.run(stop))
        try:
            await asyncio.wait_for(follower.synced(started), timeout_s)
        finally:
            stop.set()
            await task
            await follower.stop()
    return events
