"""`RecentIds`: the newest ids seen, in bounded memory, for de-duplication.

Example:
    >>> ids = RecentIds(capacity=2, ids=["a", "b"])
    >>> ids.add("c"), ids.add("c"), ("a" in ids, ids.ids())
    (True, False, (False, ['b', 'c']))
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class RecentIds:
    """The `capacity` most recently added ids, in order (oldest first), with fast membership."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        for item_id in ids:
            self.add(item_id)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, item_id: str) -> bool:
        """Remember `item_id` as the newest; whether it was not remembered before."""
        new = item_id not in self._ids
        self._ids[item_id] = None
        self._ids.move_to_end(item_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return new

    def ids(self) -> list[str]:
        return list(self._ids)
