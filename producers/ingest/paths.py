"""Confining untrusted manifest locations to allowed roots, and reading them with a size bound.

A manifest entry is a local path (relative to the manifest's folder, or absolute) or an fsspec URL
(``s3://bucket/key``, ``memory://...``). Local paths are resolved with every symlink and ``..``
followed (`os.path.realpath`) and must land inside one of the local roots; URLs must use the
protocol of a URL root and lie under its path, and may not contain ``..`` segments or chained
protocols (``a::b``). Anything else raises `PathOutsideRoots`.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> roots = Roots.of([root])
    >>> confine("a/../b.png", root, roots) == str(root.resolve() / "b.png")
    True
    >>> confine("../escape.png", root, roots)
    Traceback (most recent call last):
    ...
    producers.ingest.paths.PathOutsideRoots: ../escape.png resolves outside the allowed roots
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import fsspec

from dpe.blobstore import ImageRejected


class PathOutsideRoots(ValueError):
    """A manifest location that is not inside any allowed root."""


@dataclass(frozen=True)
class Roots:
    """Allowed roots: resolved local folders and normalised URL prefixes (``proto://path``)."""

    local: tuple[Path, ...]
    urls: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, roots: Iterable[str | Path]) -> "Roots":
        """Roots from folder paths and URL prefixes (``file://`` URLs count as folders)."""
        local: list[Path] = []
        urls: list[tuple[str, str]] = []
        for root in roots:
            text = str(root)
            protocol, rest = _split_url(text)
            if protocol is None or protocol == "file":
                local.append(Path(os.path.realpath(rest)))
            else:
                urls.append((protocol, _normalise_url_path(rest, text).rstrip("/")))
        return cls(tuple(local), tuple(urls))

    def __add__(self, other: "Roots") -> "Roots":
        return Roots(self.local + other.local, self.urls + other.urls)


def _split_url(text: str) -> tuple[str | None, str]:
    if "://" not in text:
        return None, text
    protocol, rest = text.split("://", 1)
    return protocol.lower(), rest


def _normalise_url_path(rest: str, original: str) -> str:
    if any(segment == ".." for segment in rest.split("/")):
        raise PathOutsideRoots(f"{original} has a '..' segment")
    return posixpath.normpath(rest) if rest else rest


def confine(entry: str, base: Path, roots: Roots) -> str:
    """The location to read for `entry` (a resolved local path or a normalised URL), or `PathOutsideRoots`."""
    if "\x00" in entry or "::" in entry:
        raise PathOutsideRoots(f"{entry[:200]!r} is not a plain path or URL")
    protocol, rest = _split_url(entry)
    if protocol is not None and protocol != "file":
        path = _normalise_url_path(rest, entry)
        for root_protocol, root_path in roots.urls:
            if protocol == root_protocol and (path == root_path or path.startswith(root_path + "/")):
                return f"{protocol}://{path}"
        raise PathOutsideRoots(f"{entry} is not under an allowed URL root")
    path = Path(rest)
    resolved = Path(os.path.realpath(path if path.is_absolute() else base / path))
    if any(resolved == root or resolved.is_relative_to(root) for root in roots.local):
        return str(resolved)
    raise PathOutsideRoots(f"{entry} resolves outside the allowed roots")


def read_bounded(location: str, max_bytes: int) -> bytes:
    """The bytes at a confined location, refusing more than `max_bytes` without reading them all.

    Local files are opened without following a symlink in the last component (a link swapped in
    after `confine` fails instead of being followed) and without blocking: anything but a regular
    file (a named pipe, which would block the read for ever, a device, a folder) is refused. Raises
    `ImageRejected("too_many_bytes")`, `FileNotFoundError` or another `OSError`.
    """
    if "://" in location:
        with fsspec.open(location, "rb") as handle:
            data = handle.read(max_bytes + 1)
    else:
        fd = os.open(location, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise OSError(f"{location} is not a regular file")
            if status.st_size > max_bytes:
                raise ImageRejected(
                    "too_many_bytes", f"file is {status.st_size:,} bytes, over the limit of {max_bytes:,} bytes"
                )
            data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageRejected("too_many_bytes", f"more than {max_bytes:,} bytes, the limit")
    return data
