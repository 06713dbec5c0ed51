"""Backpressure: ingest waits while too many published items are still unconsumed.

An endless source (the synthetic world, a busy ``--watch`` folder) can publish far faster than the
agents turn items into samples; everything published but never used only fills the bus and the
blob store. With ``ingest.max_backlog`` set, the ingestor counts, per partition of the unlabeled
topic, the items it published (the acknowledged offsets) beyond the lowest offset any consumer
group committed there, and after each acknowledged batch waits until that backlog is at most
``max_backlog``, or until the ingestor is told to stop (its consumers may have stopped first).

Example:
    >>> backlog = Backlog(committed=lambda: {0: 90, 1: 10})
    >>> backlog.acknowledged(0, 99); backlog.acknowledged(1, 19); backlog.size()
    20
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Backlog:
    """Published but unconsumed items of one topic, from acknowledged offsets and committed offsets."""

    def __init__(self, committed: Callable[[], dict[int, int]], stop: asyncio.Event | None = None):
        self.committed = committed
        self.stop = stop
        """Set when the ingestor stops: a wait ends at once, whatever the backlog."""
        self.published: dict[int, int] = {}
        """Partition -> offset after the newest acknowledged item."""
        self._consumed: dict[int, int] = {}
        self.pauses = 0

    def acknowledged(self, partition: int, offset: int) -> None:
        """The broker acknowledged an item at `offset` of `partition`."""
        self.published[partition] = max(self.published.get(partition, 0), offset + 1)

    def size(self) -> int:
        """Items published beyond the slowest group's committed offset, over all partitions."""
        self._consumed = self.committed()
        return sum(max(0, end - self._consumed.get(partition, 0)) for partition, end in self.published.items())

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def wait_below(self, limit: int, poll_s: float = 1.0) -> float:
        """Wait until at most `limit` items are unconsumed, or `stop` is set; the seconds waited.

        >>> stop = asyncio.Event(); stop.set()
        >>> backlog = Backlog(committed=lambda: {}, stop=stop); backlog.acknowledged(0, 99)
        >>> asyncio.run(backlog.wait_below(10))
        0.0
        """
        waited = 0.0
        size = await asyncio.to_thread(self.size)
        if size > limit:
            self.pauses += 1
            log.log(logging.INFO if self.pauses == 1 else logging.DEBUG,
                    "ingest paused: %d published items wait for their consumers (ingest.max_backlog %d; "
                    "later pauses are logged at DEBUG)", size, limit)
        while size > limit and not self.stopped:
            await asyncio.sleep(poll_s)
            waited += poll_s
            size = await asyncio.to_thread(self.size)
        return waited
