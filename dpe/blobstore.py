"""Content-addressed blob store for images: events carry a `BlobRef`, never the pixels.

A blob's name is the sha256 of its bytes, stored under a two-level prefix shard
(``<root>/ab/cd/abcd…``). The root is a local folder (a path or ``file://`` URL) or any fsspec
URL (``memory://`` in tests, ``s3://`` and friends in production). Local writes go to a temp file
in the shard folder and are renamed into place, so a reader never sees half a blob; remote writes
are single-object puts. Putting the same bytes twice writes once and returns an equal ref.

Every image is validated before it is stored (`ImageLimits` is the configuration): not empty,
at most ``max_bytes``, an allowed format, at most ``max_pixels`` as declared by the header (checked
before any pixel is decoded, so decompression bombs cost nothing), not animated, and decodable in
full (Pillow's ``verify()`` plus a full decode, since verify alone misses truncated data).
Reads re-hash the bytes, so a blob damaged at rest is reported rather than served.

Example:
    >>> import io
    >>> from PIL import Image, UnidentifiedImageError
    >>> buf = io.BytesIO()
    >>> Image.new("RGB", (4, 3), "red").save(buf, format="PNG")
    >>> store = BlobStore("memory://doctest-blobs", ImageLimits())
    >>> ref = store.put_image(buf.getvalue())
    >>> (ref.media_type, ref.width, ref.height), store.exists(ref)
    (('image/png', 4, 3), True)
    >>> store.open_image(ref).size
    (4, 3)
    >>> store.put_image(b"")
    Traceback (most recent call last):
    ...
    dpe.blobstore.ImageRejected: empty: image is empty (0 bytes)
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from typing import Literal

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator

from dpe.events import SHA256_PATTERN, BlobRef
from dpe.section import Section

RejectReason = Literal["empty", "too_many_bytes", "too_many_pixels", "corrupt", "unsupported_format"]
"""Stable reason codes of `ImageRejected` (used in dead letters and rejection metrics)."""

_SHA256 = re.compile(SHA256_PATTERN)


class ImageLimits(Section):
    """What `BlobStore.put_image` accepts.

    ``formats`` are Pillow format names (``JPEG``, not ``JPG``). Pillow's own decompression-bomb
    limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 Mpx) still applies on top of ``max_pixels``.

    Example:
        >>> ImageLimits(max_bytes=1_000_000, formats=["png", "jpeg"]).formats
        ('JPEG', 'PNG')
    """

    max_bytes: int = Field(default=20_000_000, gt=0, description="Largest accepted encoded size in bytes.")
    max_pixels: int = Field(default=40_000_000, gt=0, description="Largest accepted width x height.")
    formats: tuple[str, ...] = Field(
        default=("GIF", "JPEG", "PNG", "WEBP"),
        min_length=1,
        description="Accepted Pillow format names; animated images are refused in any format.",
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        Image.init()
        names = tuple(sorted({name.upper() for name in value}))
        unknown = [name for name in names if name not in Image.OPEN or name not in Image.MIME]
        if unknown:
            raise ValueError(
                f"unknown image formats {unknown}: use Pillow format names with a MIME type, "
                f"e.g. {sorted(set(Image.OPEN) & set(Image.MIME))}"
            )
        return names


class ImageRejected(ValueError):
    """Bytes that `BlobStore.put_image` refused; ``reason_code`` is one of `RejectReason`."""

    def __init__(self, reason_code: RejectReason, message: str) -> None:
        super().__init__(reason_code, message)
        self.reason_code: RejectReason = reason_code
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason_code}: {self.message}"


class BlobError(Exception):
    """A stored blob cannot be served."""

    def __init__(self, sha256: str, message: str) -> None:
        super().__init__(sha256, message)
        self.sha256 = sha256
        self.message = message

    def __str__(self) -> str:
        return self.message


class BlobMissing(BlobError):
    """No blob is stored under this hash."""


class BlobCorrupt(BlobError):
    """The stored bytes no longer hash to the blob's name."""


def validate_image(data: bytes, limits: ImageLimits) -> BlobRef:
    """Check `data` against `limits` and describe it; raises `ImageRejected` with a reason code.

    Cheap checks run first (size, then the header's format and pixel count), so an oversized or
    bomb-like image is refused before any pixel is decoded.

    Example:
        >>> validate_image(b"\\x89PNG\\r\\n", ImageLimits()).sha256
        Traceback (most recent call last):
        ...
        dpe.blobstore.ImageRejected: corrupt: not a recognisable image (unknown format or damaged header)
    """
    if not data:
        raise ImageRejected("empty", "image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            "too_many_bytes", f"image is {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes"
        )
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both become rejections.
        # (The filter is process-wide; with the default limits our own max_pixels check refuses
        # every such image anyway, so a concurrent caller restoring the filter early is harmless.)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        fmt, width, height = _read_header(data, limits)
        _decode_fully(data, fmt)
    return BlobRef(
        sha256=hashlib.sha256(data).hexdigest(),
        media_type=Image.MIME[fmt],
        size_bytes=len(data),
        width=width,
        height=height,
    )


def _read_header(data: bytes, limits: ImageLimits) -> tuple[str, int, int]:
    """Identify the format and size from the header, verify the file's structure, check limits."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format or "", im.size
            if fmt not in limits.formats:
                allowed = ", ".join(limits.formats)
                raise ImageRejected("unsupported_format", f"format {fmt or '?'} is not allowed (allowed: {allowed})")
            if width < 1 or height < 1:
                raise ImageRejected("corrupt", f"image header declares an empty size {width}x{height}")
            if width * height > limits.max_pixels:
                raise ImageRejected(
                    "too_many_pixels",
                    f"image is {width}x{height} = {width * height:,} pixels, "
                    f"over the limit of {limits.max_pixels:,} pixels",
                )
            im.verify()
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected("corrupt", "not a recognisable image (unknown format or damaged header)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(
            "too_many_pixels", f"image header declares too many pixels (limit {limits.max_pixels:,}): {exc}"
        ) from exc
    except Exception as exc:  # Pillow reports bad input with many exception types.
        raise ImageRejected("corrupt", f"not a readable image ({exc})") from exc
    return fmt, width, height


def _decode_fully(data: bytes, fmt: str) -> None:
    """Decode every pixel (catches truncation that verify() misses) and refuse animations."""
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            if getattr(im, "is_animated", False):
                raise ImageRejected("unsupported_format", f"animated {fmt} is not supported (more than one frame)")
            im.load()
    except ImageRejected:
        raise
    except Exception as exc:  # Pillow reports bad input with many exception types.
        raise ImageRejected("corrupt", f"image data cannot be decoded ({exc})") from exc


class BlobStore:
    """Content-addressed image store on a local folder or any fsspec URL.

    Example:
        >>> import tempfile
        >>> store = BlobStore(tempfile.mkdtemp(), ImageLimits())
        >>> store.exists("0" * 64)
        False
    """

    def __init__(self, url: str, limits: ImageLimits) -> None:
        self.url = url
        self.limits = limits
        self._fs, self._root = url_to_fs(url)
        self._local = isinstance(self._fs, LocalFileSystem)
        if self._local:
            os.makedirs(self._root, exist_ok=True)

    def put_image(self, data: bytes) -> BlobRef:
        """Validate `data` (raises `ImageRejected`), store it once, and return its ref."""
        ref = validate_image(data, self.limits)
        path = self._path(ref.sha256)
        if not self._fs.exists(path):
            if self._local:
                _write_atomic(path, data)
            else:
                self._fs.pipe_file(path, data)
        return ref

    def get_bytes(self, ref_or_sha: BlobRef | str) -> bytes:
        """The blob's bytes, re-hashed; raises `BlobMissing` or `BlobCorrupt`."""
        sha = _sha_of(ref_or_sha)
        path = self._path(sha)
        try:
            data = self._fs.cat_file(path)
        except FileNotFoundError as exc:
            raise BlobMissing(sha, f"blob {sha} is not in the store at {self.url}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise BlobCorrupt(
                sha, f"blob {sha} at {self.url} is corrupt: its {len(data):,} stored bytes hash to {actual}"
            )
        return data

    def open_image(self, ref_or_sha: BlobRef | str) -> Image.Image:
        """The blob as a fully loaded Pillow image (hash checked, as in `get_bytes`)."""
        im = Image.open(io.BytesIO(self.get_bytes(ref_or_sha)))
        im.load()
        return im

    def exists(self, ref_or_sha: BlobRef | str) -> bool:
        """Whether a blob with this hash is stored (its content is not re-checked)."""
        return bool(self._fs.exists(self._path(_sha_of(ref_or_sha))))

    def check_writable(self) -> None:
        """Write and remove a probe file at the store's root; raises OSError if that fails."""
        probe = f"{self._root.rstrip('/')}/.probe-{os.getpid()}"
        self._fs.pipe_file(probe, b"probe")
        self._fs.rm_file(probe)

    def _path(self, sha: str) -> str:
        return f"{self._root.rstrip('/')}/{sha[:2]}/{sha[2:4]}/{sha}"


def _sha_of(ref_or_sha: BlobRef | str) -> str:
    """The hash of a ref, or a hash string checked to be 64 lowercase hex digits (never a path)."""
    sha = ref_or_sha.sha256 if isinstance(ref_or_sha, BlobRef) else ref_or_sha
    if not _SHA256.match(sha):
        raise ValueError(f"not a sha256 hex digest: {sha[:80]!r}")
    return sha


def _write_atomic(path: str, data: bytes) -> None:
    """Write a local file via a synced temp file in the same folder and an atomic rename."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
