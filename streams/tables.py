"""Writing a table key once per batch, with the batch's last event for that key.

Batches come from `stream.take_events`, where Faust has no current event, so `table[key] = value`
cannot pick a changelog partition. `store` writes the value and sends it to the changelog partition
of the given event, which is the partition the key belongs to.
"""

from __future__ import annotations

from typing import Any

from faust.types import CollectionT, EventT


def store(table: CollectionT, key: Any, value: Any, event: EventT) -> None:
    """Set `table[key] = value` as if while processing `event`: store it and log it to its partition."""
    table.data[key] = value
    table.send_changelog(event.message.partition, key, value)
