"""Ingest: validate, store and deduplicate images, and publish them as `UnlabeledItem` events.

For each input: read its bytes (bounded), hash them, skip content already published (the local
`PublishedIndex` plus everything seen in this run), validate and store the image in the blob
store (`BlobStore.put_image`: format, bytes, pixels, full decode), then publish an `UnlabeledItem`
whose `item_id` is the content hash. Hashes enter the index only once the broker acknowledged them,
so a crash re-publishes at most the unacknowledged tail (harmless: same id, same partition).

Every input ends as one `Outcome` with a reason code: ``published`` or why it was skipped
(``duplicate``, the blob store's ``empty``/``too_many_bytes``/``too_many_pixels``/``corrupt``/
``unsupported_format``, ``path_outside_roots``, ``bad_manifest_line``, ``not_found``,
``unreadable``, ``invalid_item``, ``event_too_large``). Nothing stops the run.

Example:
    >>> async def run(settings):                                          # doctest: +SKIP
    ...     async with AsyncPublisher(settings, producer_name="ingest") as publisher:
    ...         ingestor = Ingestor.from_settings(settings, publisher)
    ...         report = await ingestor.ingest(synthetic_entries(10))
    ...     return report.counts
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pydantic import ValidationError

from dpe.blobstore import BlobStore, ImageRejected
from dpe.broker import resolve_bootstrap
from dpe.bus.admin import slowest_committed
from dpe.bus.aio import AsyncPublisher
from dpe.bus.codec import InvalidEvent
from dpe.events import UnlabeledItem
from dpe.world import Scene
from monitoring.metrics import INGEST_ITEMS
from producers.ingest.backlog import Backlog
from producers.ingest.index import PublishedIndex
from producers.ingest.paths import PathOutsideRoots
from producers.ingest.settings import IngestConfig
from producers.ingest.sources import Entry, Input, Refused

log = logging.getLogger(__name__)

PUBLISHED = "published"
DUPLICATE = "duplicate"
"""Content published before: it is on the bus already, so the input is not counted as refused."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one input."""

    source: str
    reason: str
    item_id: str | None = None
    detail: str = ""

    @property
    def published(self) -> bool:
        return self.reason == PUBLISHED


@dataclass
class IngestReport:
    """Counts of outcomes by reason code, and the first `keep` refused inputs with why.

    Example:
        >>> report = IngestReport()
        >>> for outcome in (Outcome("a.png", PUBLISHED), Outcome("b.png", DUPLICATE), Outcome("c.png", "corrupt")):
        ...     report.record(outcome)
        >>> report.published, report.skipped, report.on_bus, [o.source for o in report.refusals]
        (1, 2, 2, ['c.png'])
    """

    counts: Counter[str] = field(default_factory=Counter)
    refusals: list[Outcome] = field(default_factory=list)
    keep: int = 20

    def record(self, outcome: Outcome) -> None:
        """Count one outcome; keep it if it is one of the first `keep` refusals."""
        self.counts[outcome.reason] += 1
        if outcome.reason not in (PUBLISHED, DUPLICATE) and len(self.refusals) < self.keep:
            self.refusals.append(outcome)

    @property
    def published(self) -> int:
        return self.counts[PUBLISHED]

    @property
    def skipped(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason != PUBLISHED)

    @property
    def on_bus(self) -> int:
        """Inputs whose content is on the bus now: published by this run or before it."""
        return self.published + self.counts[DUPLICATE]

    @property
    def refused(self) -> int:
        """Inputs that cannot be ingested (neither published nor duplicates)."""
        return sum(self.counts.values()) - self.on_bus


def without_answer_key(metadata: dict[str, Any]) -> dict[str, Any]:
    """An input's annotations without a scene's fields (the synthetic world's answer key): the agents get the
    pixels, hints such as ``capabilities`` and untrusted notes, never the answer.

    Example:
        >>> without_answer_key({"kind": "shapes", "objects": [], "capabilities": ["counting"], "note": "x"})
        {'capabilities': ['counting'], 'note': 'x'}
    """
    return {key: value for key, value in metadata.items() if key not in Scene.model_fields}


def index_path(settings: IngestConfig):
    """Where the published-hash index lives: `ingest.index_file` or ``<home>/ingest/published.txt``."""
    return settings.ingest.index_file or settings.home / "ingest" / "published.txt"


class Ingestor:
    """Turns inputs into published `UnlabeledItem` events, one `Outcome` each."""

    def __init__(self, publisher: AsyncPublisher, store: BlobStore, index: PublishedIndex, ack_every: int = 256,
                 backlog: Backlog | None = None, max_backlog: int | None = None, answer_key: bool = False):
        self.publisher = publisher
        self.answer_key = answer_key
        self.store = store
        self.index = index
        self.ack_every = ack_every
        self.backlog = backlog
        self.max_backlog = max_backlog
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._pending_hashes: set[str] = set()

    @classmethod
    def from_settings(cls, settings: IngestConfig, publisher: AsyncPublisher,
                      stop: asyncio.Event | None = None) -> "Ingestor":
        """The ingestor `settings` describe; `stop` (SIGTERM) also ends a wait for the backlog to drain."""
        store = BlobStore(settings.blob.url, settings.blob.limits)
        topic, bootstrap = publisher.topic(UnlabeledItem), resolve_bootstrap(settings)
        backlog = Backlog(partial(slowest_committed, settings, bootstrap, topic), stop)
        return cls(publisher, store, PublishedIndex(index_path(settings)), settings.ingest.ack_every, backlog,
                   settings.ingest.max_backlog, settings.ingest.answer_key)

    async def ingest(
        self, inputs: Iterable[Input] | AsyncIterable[Input], on_outcome: Callable[[Outcome], None] | None = None
    ) -> IngestReport:
        """Ingest every input, wait for the broker's acks, and report the outcomes."""
        report = IngestReport()
        async for entry in _aiter(inputs):
            outcome = await self.ingest_one(entry)
            report.record(outcome)
            INGEST_ITEMS.labels("published" if outcome.published else "skipped", outcome.reason).inc()
            if on_outcome is not None:
                on_outcome(outcome)
        await self.acknowledge()
        return report

    async def ingest_one(self, entry: Input) -> Outcome:
        """One input to one outcome; publishing is queued (see `acknowledge`)."""
        if isinstance(entry, Refused):
            return Outcome(entry.source, entry.reason, detail=entry.detail)
        try:
            data = await asyncio.to_thread(entry.read)
        except ImageRejected as exc:
            return Outcome(entry.source, exc.reason_code, detail=exc.message)
        except PathOutsideRoots as exc:
            return Outcome(entry.source, "path_outside_roots", detail=str(exc))
        except FileNotFoundError as exc:
            return Outcome(entry.source, "not_found", detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - a filesystem's own errors (an unknown protocol...) refuse the input
            return Outcome(entry.source, "unreadable", detail=f"{type(exc).__name__}: {exc}")
        sha = hashlib.sha256(data).hexdigest()
        if sha in self.index or sha in self._pending_hashes:
            return Outcome(entry.source, DUPLICATE, sha)
        try:
            ref = await asyncio.to_thread(self.store.put_image, data)
        except ImageRejected as exc:
            return Outcome(entry.source, exc.reason_code, detail=exc.message)
        return await self._publish(entry, ref)

    async def _publish(self, entry: Entry, ref) -> Outcome:
        try:
            item = UnlabeledItem(item_id=ref.sha256, image=ref, source=entry.source[:2000], text=entry.text,
                                 metadata=entry.metadata if self.answer_key else without_answer_key(entry.metadata),
                                 producer="ingest")
            future = await self.publisher.publish(item)
        except ValidationError as exc:
            return Outcome(entry.source, "invalid_item", ref.sha256, detail=exc.errors(include_url=False)[0]["msg"])
        except InvalidEvent as exc:
            return Outcome(entry.source, "event_too_large", ref.sha256, detail=exc.message)
        self._pending.append((ref.sha256, future))
        self._pending_hashes.add(ref.sha256)
        if len(self._pending) >= self.ack_every:
            await self.acknowledge()
        return Outcome(entry.source, PUBLISHED, ref.sha256)

    async def acknowledge(self) -> None:
        """Wait for the broker to acknowledge every queued event, then record their hashes in the index."""
        pending, self._pending = self._pending, []
        await self.publisher.flush()
        acked = []
        for sha, future in pending:
            try:
                metadata = await future
                acked.append(sha)
                if self.backlog is not None:
                    self.backlog.acknowledged(metadata.partition, metadata.offset)
            except Exception as exc:  # noqa: BLE001 - an unacknowledged event is retried by the next run
                log.warning("publishing %s was not acknowledged (%s); it stays out of the index", sha, exc)
        self._pending_hashes.difference_update(sha for sha, _ in pending)
        self.index.add_many(acked)
        if self.backlog is not None and self.max_backlog is not None:
            await self.backlog.wait_below(self.max_backlog)


async def paced(inputs: Iterable[Input], rate: float) -> AsyncIterator[Input]:
    """Yield `inputs` at most `rate` per second (0: as fast as possible)."""
    started = time.monotonic()
    for position, entry in enumerate(inputs):
        if rate > 0:
            delay = started + position / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        yield entry


async def _aiter(inputs: Iterable[Input] | AsyncIterable[Input]) -> AsyncIterator[Input]:
    if isinstance(inputs, AsyncIterable):
        async for entry in inputs:
            yield entry
    else:
        for entry in inputs:
            yield entry
