"""The retriever: finds images related to an item among recently seen ones, by metadata or by embedding.

Search backends are pluggable (`SearchBackend`): `MetadataSearch` matches words drawn from the
items' metadata and text (scene kind, colours, shapes, words, caption words); `EmbeddingSearch`
ranks by cosine similarity of a small colour-layout embedding of the pixels. Both keep a bounded
pool of the most recent images and return blob references only, never paths.

Example:
    >>> from PIL import Image
    >>> from dpe.events import BlobRef, UnlabeledItem
    >>> def item(sha, kind):
    ...     ref = BlobRef(sha256=sha * 64, media_type="image/png", size_bytes=1, width=8, height=8)
    ...     return UnlabeledItem(item_id=sha * 64, image=ref, source="s", metadata={"kind": kind})
    >>> search = MetadataSearch(pool=10)
    >>> for sha, kind in [("a", "chart"), ("b", "text"), ("c", "chart")]:
    ...     search.add(item(sha, kind), Image.new("RGB", (8, 8)))
    >>> [ref.sha256[0] for ref in search.search(item("d", "chart"), Image.new("RGB", (8, 8)), k=2)]
    ['c', 'a']
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dpe.events import BlobRef, UnlabeledItem

_WORD = re.compile(r"[a-z][a-z0-9_]{1,30}")
_MAX_TOKENS = 64


class SearchBackend(Protocol):
    """Indexes images as they are seen and finds related ones."""

    name: str

    def add(self, item: UnlabeledItem, image: Image.Image) -> None: ...

    def search(self, item: UnlabeledItem, image: Image.Image, k: int) -> list[BlobRef]: ...


def metadata_tokens(item: UnlabeledItem) -> frozenset[str]:
    """Lower-case words from an item's metadata values (not its keys) and text (bounded; data only, never interpreted).

    Example:
        >>> from dpe.events import BlobRef
        >>> ref = BlobRef(sha256="0" * 64, media_type="image/png", size_bytes=1, width=1, height=1)
        >>> sorted(metadata_tokens(UnlabeledItem(item_id="i", image=ref, source="s", text="A red Bus",
        ...                                      metadata={"objects": [{"color": "red"}]})))
        ['bus', 'red']
    """
    words: set[str] = set()
    for text in _strings(item.metadata, depth=0):
        words.update(_WORD.findall(text.lower()))
        if len(words) >= _MAX_TOKENS:
            break
    if item.text:
        words.update(_WORD.findall(item.text[:2000].lower()))
    return frozenset(sorted(words)[:_MAX_TOKENS])


def _strings(value: Any, depth: int) -> Iterator[str]:
    if depth > 4:
        return
    if isinstance(value, str):
        yield value[:200]
    elif isinstance(value, dict):
        for inner in list(value.values())[:50]:
            yield from _strings(inner, depth + 1)
    elif isinstance(value, list):
        for inner in value[:50]:
            yield from _strings(inner, depth + 1)


class _Pool:
    """The most recent `size` entries by item id."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[str, tuple[BlobRef, Any]] = OrderedDict()

    def put(self, item_id: str, ref: BlobRef, key: Any) -> None:
        self.entries[item_id] = (ref, key)
        self.entries.move_to_end(item_id)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class MetadataSearch:
    """Ranks pooled images by shared metadata words (Jaccard), most recent first on ties."""

    name = "metadata"

    def __init__(self, pool: int = 256):
        self._pool = _Pool(pool)

    def add(self, item: UnlabeledItem, image: Image.Image) -> None:
        self._pool.put(item.item_id, item.image, metadata_tokens(item))

    def search(self, item: UnlabeledItem, image: Image.Image, k: int) -> list[BlobRef]:
        query = metadata_tokens(item)
        scored = []
        for age, (item_id, (ref, tokens)) in enumerate(reversed(self._pool.entries.items())):
            if item_id == item.item_id or ref.sha256 == item.image.sha256:
                continue
            union = len(query | tokens)
            score = len(query & tokens) / union if union else 0.0
            if score > 0:
                scored.append((-score, age, ref))
        return [ref for _, _, ref in sorted(scored, key=lambda row: row[:2])[:k]]


def embed(image: Image.Image, side: int = 8) -> np.ndarray:
    """A unit-length colour-layout embedding: the image at `side` x `side`, centred.

    Example:
        >>> embed(Image.new("RGB", (32, 32), "red")).shape
        (192,)
    """
    pixels = np.asarray(image.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
    pixels -= pixels.mean()
    norm = float(np.linalg.norm(pixels))
    return pixels / norm if norm > 0 else pixels


class EmbeddingSearch:
    """Ranks pooled images by cosine similarity of `embed`."""

    name = "embedding"

    def __init__(self, pool: int = 256):
        self._pool = _Pool(pool)

    def add(self, item: UnlabeledItem, image: Image.Image) -> None:
        self._pool.put(item.item_id, item.image, embed(image))

    def search(self, item: UnlabeledItem, image: Image.Image, k: int) -> list[BlobRef]:
        others = [(ref, vector) for item_id, (ref, vector) in self._pool.entries.items()
                  if item_id != item.item_id and ref.sha256 != item.image.sha256]
        if not others:
            return []
        scores = np.stack([vector for _, vector in others]) @ embed(image)
        return [others[i][0] for i in np.argsort(-scores, kind="stable")[:k]]


SEARCH_BACKENDS: dict[str, type[MetadataSearch] | type[EmbeddingSearch]] = {
    "metadata": MetadataSearch,
    "embedding": EmbeddingSearch,
}
"""Search backends by the name used in `RoleBackends.retriever`."""
