"""Near-duplicate detection: a perceptual hash and a colour layout for images, MinHash over shingles for questions.

A sample is a near-duplicate of an accepted one when its image is perceptually the same and its
question nearly the same: the same picture asked the same question. (A new question about the
same image, or a template question about another image, is not a duplicate.) "Perceptually the
same" means both:

- a 256-bit pHash (sign of the 16 x 16 lowest DCT frequencies of a 32 x 32 grayscale thumbnail
  against their median) within `image_distance` bits: robust to resizing and JPEG re-encoding,
  where a difference hash of these small noisy images is not;
- a 4 x 4 colour layout within `colour_distance` (mean absolute difference per channel): pHash
  sees no colour, and charts that differ only in their bars' colours must not collide.

The index finds image candidates without a full scan: the hash is cut into `image_distance + 1`
bands, and two hashes within that distance agree exactly on at least one band (pigeonhole).

Example:
    >>> from PIL import Image, ImageDraw
    >>> image = Image.new("RGB", (64, 64), "white")
    >>> ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill="red")
    >>> index = NearDuplicateIndex()
    >>> index.add("s1", DedupKey.of(image, "How many circles are there?"))
    >>> index.find(DedupKey.of(image.resize((60, 60)), "How many circles are there?"))
    's1'
    >>> index.find(DedupKey.of(image, "What colour is the circle?")) is None
    True
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

_PERMUTATIONS = 64
_PRIME = (1 << 61) - 1
_rng = np.random.default_rng(20240611)
_A = _rng.integers(1, _PRIME, size=_PERMUTATIONS, dtype=np.uint64)
_B = _rng.integers(0, _PRIME, size=_PERMUTATIONS, dtype=np.uint64)


_THUMB = 32
_KEEP = 16
HASH_BITS = _KEEP * _KEEP
_DCT = np.cos(np.pi * (2 * np.arange(_THUMB)[None, :] + 1) * np.arange(_THUMB)[:, None] / (2 * _THUMB))


def phash(image: Image.Image) -> int:
    """A 256-bit perceptual hash: which of the 16 x 16 lowest DCT frequencies of a 32 x 32 thumbnail beat their median.

    Example:
        >>> from PIL import ImageDraw
        >>> image = Image.new("RGB", (64, 64), "white")
        >>> ImageDraw.Draw(image).rectangle((8, 8, 30, 50), fill="blue")
        >>> hamming(phash(image), phash(image.resize((50, 50)))) <= 16
        True
    """
    pixels = np.asarray(image.convert("L").resize((_THUMB, _THUMB), Image.BILINEAR), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:_KEEP, :_KEEP].ravel()
    median = np.partition(low[1:], HASH_BITS // 2 - 1)[HASH_BITS // 2 - 1]
    return int.from_bytes(np.packbits(low > median).tobytes(), "big")


def colour_layout(image: Image.Image, side: int = 4) -> np.ndarray:
    """The mean colour of each cell of a side x side grid (int16, shape side x side x 3)."""
    return np.asarray(image.convert("RGB").resize((side, side), Image.BOX), dtype=np.int16)


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return (a ^ b).bit_count()


def shingles(text: str, size: int = 4) -> set[int]:
    """Hashes of the character `size`-grams of the normalised text (lower case, single spaces, no punctuation).

    Example:
        >>> shingles("Hi!") == shingles("hi")
        True
    """
    normal = " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())
    if len(normal) <= size:
        return {zlib.crc32(normal.encode())}
    return {zlib.crc32(normal[i : i + size].encode()) for i in range(len(normal) - size + 1)}


def minhash(values: set[int]) -> np.ndarray:
    """The MinHash signature (64 values) of a set of 32-bit hashes."""
    column = np.fromiter(values, dtype=np.uint64, count=len(values))[:, None]
    with np.errstate(over="ignore"):
        return ((column * _A + _B) % np.uint64(_PRIME)).min(axis=0)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of the sets behind two signatures."""
    return float(np.mean(a == b))


@dataclass(frozen=True)
class DedupKey:
    """What near-duplicate detection compares: the image's pHash and colour layout, the question's MinHash."""

    image_hash: int
    colours: np.ndarray
    signature: np.ndarray

    @classmethod
    def of(cls, image: Image.Image, question: str) -> "DedupKey":
        return cls(phash(image), colour_layout(image), minhash(shingles(question)))


class NearDuplicateIndex:
    """Accepted samples' keys, searchable for near-duplicates."""

    def __init__(self, image_distance: int = 20, colour_distance: float = 6.0, text_similarity: float = 0.8):
        self.image_distance = image_distance
        self.colour_distance = colour_distance
        self.text_similarity = text_similarity
        bands = image_distance + 1
        edges = np.linspace(0, HASH_BITS, bands + 1).round().astype(int)
        self._bands = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
        self._buckets: list[dict[int, list[int]]] = [defaultdict(list) for _ in self._bands]
        self._keys: list[DedupKey] = []
        self._ids: list[str] = []
        self._known: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._known

    def _band_values(self, image_hash: int) -> list[int]:
        return [(image_hash >> (HASH_BITS - hi)) & ((1 << (hi - lo)) - 1) for lo, hi in self._bands]

    def add(self, sample_id: str, key: DedupKey) -> None:
        """Index an accepted sample (a sample id already indexed is ignored)."""
        if sample_id in self._known:
            return
        self._known.add(sample_id)
        position = len(self._ids)
        self._ids.append(sample_id)
        self._keys.append(key)
        for bucket, value in zip(self._buckets, self._band_values(key.image_hash)):
            bucket[value].append(position)

    def find(self, key: DedupKey) -> str | None:
        """The id of an indexed near-duplicate of `key`, or None."""
        seen: set[int] = set()
        for bucket, value in zip(self._buckets, self._band_values(key.image_hash)):
            for position in bucket.get(value, ()):
                if position in seen:
                    continue
                seen.add(position)
                other = self._keys[position]
                if (hamming(other.image_hash, key.image_hash) <= self.image_distance
                        and float(np.abs(other.colours - key.colours).mean()) <= self.colour_distance
                        and similarity(other.signature, key.signature) >= self.text_similarity):
                    return self._ids[position]
        return None
