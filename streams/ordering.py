"""Each evidence partition's records applied once and in log order, whatever Faust hands over.

Faust can hand a worker a partition's records with a hole: after a rebalance it seeks to the committed
offsets, and records fetched while that seek was under way are cleared from the stream queues when the
flow resumes, while the fetch position has already moved past them (see `streams.runtime`). Applied
as they come, the records after the hole would be counted and the hole's records either never (lost)
or only after a seek back, behind newer versions, where the scoring may take them for late evidence
and drop them. Either way the state would differ from a replay of the log.

`PartitionOrder` is the gate in front of the scoring. It knows the next offset of every partition
(from the consumer's resume point after an assignment: the committed offset, or the earliest one on a
partition never committed) and admits a record only at that offset. A record below it was applied
already (a re-delivery: skipped); one above it waits behind a hole: it is held back (not applied), and
the consumer is sought back to the hole, which brings the hole and everything after it again, in
order. Held-back records are acknowledged like any other, but the commit never passes the hole's first
record, which was never delivered (`streams.runtime.head_unacknowledged`), so nothing is lost to a
kill -9 either.

Example:
    >>> order = PartitionOrder(lambda: None)
    >>> [order.admit("tp", offset).value for offset in (5, 6, 6, 8)]
    ['apply', 'apply', 'redelivered', 'held_back']
    >>> order.holes
    {'tp': 7}
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Callable, Protocol


class Admission(str, Enum):
    """What the gate says about one record."""

    APPLY = "apply"
    REDELIVERED = "redelivered"
    HELD_BACK = "held_back"


class Rewinder(Protocol):
    """The consumer as the gate needs it (`streams.runtime`'s consumer)."""

    def resume_point(self, tp: Any) -> int | None: ...

    async def seek(self, partition: Any, offset: int) -> None: ...


REWIND_RETRY_S = 5.0
"""Seconds before a hole still open is sought again (a seek is not repeated for every held-back record)."""


class PartitionOrder:
    """The next offset of every partition, the holes, and the seeks back to them."""

    def __init__(self, consumer: Callable[[], Rewinder | None], clock: Callable[[], float] = time.monotonic):
        self.consumer = consumer
        self.clock = clock
        self.next: dict[Any, int] = {}
        self.holes: dict[Any, int] = {}
        self._sought: dict[Any, tuple[int, float]] = {}

    def admit(self, tp: Any, offset: int) -> Admission:
        """Whether to apply the record at `offset` of partition `tp` (a first record after an assignment is
        measured against the consumer's resume point; without one it is taken as the start)."""
        expected = self.next.get(tp)
        if expected is None:
            consumer = self.consumer()
            resume = consumer.resume_point(tp) if consumer is not None else None
            expected = offset if resume is None else resume
        if offset < expected:
            return Admission.REDELIVERED
        if offset > expected:
            self.holes[tp] = expected
            return Admission.HELD_BACK
        self.next[tp] = offset + 1
        self.holes.pop(tp, None)
        return Admission.APPLY

    async def rewind(self) -> None:
        """Seek every open hole's partition back to the hole (again only after `REWIND_RETRY_S`)."""
        consumer = self.consumer() if self.holes else None
        if consumer is None:
            return
        now = self.clock()
        for tp, offset in list(self.holes.items()):
            sought = self._sought.get(tp)
            if sought is not None and sought[0] == offset and now - sought[1] < REWIND_RETRY_S:
                continue
            self._sought[tp] = (offset, now)
            await consumer.seek(tp, offset)

    def forget(self) -> None:
        """Forget every position (partitions were revoked: the next assignment starts from resume points)."""
        self.next.clear()
        self.holes.clear()
        self._sought.clear()
