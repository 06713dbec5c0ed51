"""Writing a table key once per batch, with the batch's last event for that key.

Batches come from `stream.take_events`, where Faust has no current event, so `table[key] = value`
cannot pick a changelog partition. `store` writes the value and sends it to the changelog partition
of the given event, which is the partition the key belongs to.

A write counts once the broker has it: callers await the futures `store` returns (`written`) before
their batch ends. Faust acknowledges a batch's events when the agent asks for the next batch and
commits acknowledged offsets after flushing its producer, but that flush gives up after 0.1 s
without progress and can return with changelog writes still buffered. A kill -9 right after such a
commit lost the write for good: the restarted worker recovered the state before it and never read
the events again (seen in a chaos soak as one divergence missing from a capability's count).

Example:
    >>> import asyncio
    >>> asyncio.run(written([]))
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Iterable

from faust.types import CollectionT, EventT


def store(table: CollectionT, key: Any, value: Any, event: EventT) -> Awaitable[Any]:
    """Set `table[key] = value` as if while processing `event`: store it and log it to its partition;
    the returned future completes when the broker has the changelog record."""
    table.data[key] = value
    return table.send_changelog(event.message.partition, key, value)


async def written(writes: Iterable[Awaitable[Any]]) -> None:
    """Wait until the broker has every changelog record of `writes` (a failed send raises)."""
    await asyncio.gather(*writes)
