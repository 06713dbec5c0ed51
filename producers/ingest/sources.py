"""Where images to ingest come from: a folder, a JSONL manifest, the synthetic world, a watched folder.

Every source yields `Entry` (a location to read, with untrusted text and metadata) or `Refused`
(an input that cannot be ingested, with its reason code). Sources never read image bytes
themselves; `Entry.read` does, bounded in size, so that the ingest loop decides when.

A manifest line is a JSON object: ``{"image": "<path or URL>", "text": "...", "metadata": {...}}``;
only ``image`` is required and other keys are ignored. Relative paths are relative to the
manifest's folder. Text and metadata are untrusted data: they are carried as they are, never
interpreted.

Example:
    >>> [e.reason for e in manifest_entries(['{"image": "/etc/passwd"}', "not json"], Path("/tmp"),
    ...                                     Roots.of(["/tmp"]), max_bytes=1000)]
    ['path_outside_roots', 'bad_manifest_line']
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dpe.world import render_scene, synthetic_source, unlabeled_scene
from producers.ingest.paths import PathOutsideRoots, Roots, confine, read_bounded

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
"""Files a folder source picks up (by suffix, case-insensitive); the blob store checks the real format."""


@dataclass(frozen=True)
class Entry:
    """An input to ingest: its source label, how to read its bytes, and its untrusted text and metadata."""

    source: str
    read: Callable[[], bytes]
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """An input that cannot be ingested, with its reason code and a human-readable detail."""

    source: str
    reason: str
    detail: str


Input = Entry | Refused


class ManifestLine(BaseModel):
    """One manifest line. Unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(min_length=1, max_length=4096, description="Local path or fsspec URL of the image.")
    text: str | None = Field(default=None, max_length=20_000)
    metadata: dict[str, Any] = Field(default_factory=dict)


def located_entry(entry: str, base: Path, roots: Roots, max_bytes: int, **extra: Any) -> Input:
    """An `Entry` for a path or URL confined to `roots`, or `Refused` with ``path_outside_roots``."""
    try:
        location = confine(entry, base, roots)
    except PathOutsideRoots as exc:
        return Refused(entry[:2000], "path_outside_roots", str(exc))
    return Entry(source=entry[:2000], read=partial(read_bounded, location, max_bytes), **extra)


def folder_entries(folder: Path, roots: Roots, max_bytes: int) -> Iterator[Input]:
    """Every image file under `folder` (recursive, sorted, hidden files skipped), labelled by absolute path.

    A relative `folder` is relative to the working directory. `folder` itself is an allowed root; a
    symlink that leads out of it and out of `roots` is refused.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.png").write_bytes(b"checked later, by the blob store")
        >>> [Path(entry.source) == folder / "a.png" for entry in folder_entries(folder, Roots.of([]), 100)]
        [True]
    """
    folder = folder.absolute()
    base = Path(os.path.realpath(folder))
    allowed = Roots.of([base]) + roots
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.is_file() or path.is_symlink():
            yield located_entry(str(path), base, allowed, max_bytes)


def manifest_entries(
    lines: Iterable[str], base: Path, roots: Roots, max_bytes: int, max_line_bytes: int = 1_000_000
) -> Iterator[Input]:
    """One input per non-blank manifest line; an unreadable line is `Refused` with ``bad_manifest_line``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label = f"manifest line {number}"
        if len(line.encode("utf-8", errors="replace")) > max_line_bytes:
            yield Refused(label, "bad_manifest_line", f"line is longer than {max_line_bytes:,} bytes")
            continue
        try:
            parsed = ManifestLine.model_validate(json.loads(line))
        except (ValueError, RecursionError) as exc:
            detail = exc.errors(include_url=False)[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            yield Refused(label, "bad_manifest_line", f"not a manifest entry: {detail[:300]}")
            continue
        yield located_entry(parsed.image, base, roots, max_bytes, text=parsed.text, metadata=parsed.metadata)


def synthetic_entries(count: int | None, seed: int = 0, start: int = 0, image_size: int = 64,
                      answer_key: bool = False) -> Iterator[Input]:
    """Scenes of the synthetic world as PNG images (endless when `count` is None), pixels only.

    With `answer_key` each entry also carries its scene as metadata: the world's answer key, which only
    the benchmarks' metadata-reading fast path (`consumers.agents.programmatic`) may be given.

    Example:
        >>> entry = next(synthetic_entries(1))
        >>> entry.source, entry.metadata
        ('synthetic:0/0', {})
        >>> next(synthetic_entries(1, answer_key=True)).metadata["kind"] in ("shapes", "text", "chart", "formula")
        True
    """
    index = start
    while count is None or index < start + count:
        scene = unlabeled_scene(index, seed, image_size=image_size)
        metadata = scene.to_metadata() if answer_key else {}
        yield Entry(source=synthetic_source(index, seed), read=partial(_png_bytes, scene), metadata=metadata)
        index += 1


def _png_bytes(scene: Any) -> bytes:
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG")
    return buffer.getvalue()


class FolderWatcher:
    """Finds files in a folder that are new and settled (same size and mtime for `settle_polls` polls).

    A file is offered once per (size, mtime); content already published is dropped later by the
    content-hash index, so renames and copies cost nothing.
    """

    def __init__(self, folder: Path, roots: Roots, max_bytes: int, settle_polls: int = 1):
        self.folder = folder
        self.roots = roots
        self.max_bytes = max_bytes
        self.settle_polls = settle_polls
        self._seen: dict[Path, tuple[int, int, int]] = {}
        self._offered: set[tuple[Path, int, int]] = set()

    def poll(self) -> list[Input]:
        """Inputs for the files that settled since the last poll."""
        ready: list[Input] = []
        current: dict[Path, tuple[int, int, int]] = {}
        for entry in folder_entries(self.folder, self.roots, self.max_bytes):
            path = Path(entry.source)
            try:
                stat = path.lstat()
            except OSError:
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            previous = self._seen.get(path)
            polls = previous[2] + 1 if previous and previous[:2] == signature else 0
            current[path] = (*signature, polls)
            if polls >= self.settle_polls and (path, *signature) not in self._offered:
                self._offered.add((path, *signature))
                ready.append(entry)
        self._seen = current
        return ready
