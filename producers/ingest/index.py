"""The local index of content hashes already published, so that re-ingesting publishes nothing new.

One sha256 per line, appended after the broker acknowledged the event. Losing or damaging the
file is harmless: unreadable lines are ignored, and a hash missing from the index is simply
published again, which downstream consumers absorb because `UnlabeledItem.item_id` is the content
hash (same id, same partition, same samples).

Example:
    >>> import tempfile, pathlib
    >>> index = PublishedIndex(pathlib.Path(tempfile.mkdtemp()) / "published.txt")
    >>> index.add_many(["a" * 64])
    >>> "a" * 64 in PublishedIndex(index.path)
    True
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_SHA256_LINE = re.compile(r"^[0-9a-f]{64}$")


class PublishedIndex:
    """A set of published content hashes backed by an append-only text file."""

    def __init__(self, path: Path):
        self.path = path
        self._hashes: set[str] = set()
        try:
            with open(path, encoding="ascii", errors="replace") as handle:
                self._hashes = {line.strip() for line in handle if _SHA256_LINE.match(line.strip())}
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("ingest index %s is unreadable (%s); already published images will be published again",
                        path, exc)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def add_many(self, hashes: Iterable[str]) -> None:
        """Remember `hashes` (in memory, and appended to the file; a failed write only costs re-publishing)."""
        new = [sha for sha in hashes if sha not in self._hashes]
        self._hashes.update(new)
        if not new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="ascii") as handle:
                handle.write("".join(f"{sha}\n" for sha in new))
        except OSError as exc:
            log.warning("cannot append to ingest index %s (%s); these images may be published again", self.path, exc)
