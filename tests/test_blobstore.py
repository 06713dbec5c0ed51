"""Tests for the content-addressed image store: storage, integrity, and every rejection reason."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import struct
import uuid
import zlib
from pathlib import Path

import fsspec
import pytest
from PIL import Image, ImageFile, PngImagePlugin
from pydantic import ValidationError

from dpe.blobstore import BlobCorrupt, BlobMissing, BlobStore, ImageLimits, ImageRejected, validate_image
from dpe.events import BlobRef


def encode(fmt: str, size: tuple[int, int] = (48, 32), seed: int = 0, **save: object) -> bytes:
    """A noisy RGB image (so it does not compress to nothing) encoded in `fmt`."""
    rnd = random.Random(seed)
    im = Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bilevel_png(width: int, height: int, rows: int) -> bytes:
    """A 1-bit greyscale PNG of `width` x `height` whose image data holds `rows` all-black rows.

    With ``rows == height`` it is a valid image that inflates to width*height/8 bytes from a few KB
    of zlib data: a real decompression bomb, built row by row without ever holding the pixels.
    """
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(rows)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def reject_reason(data: bytes, limits: ImageLimits | None = None) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        validate_image(data, limits or ImageLimits())
    return info.value


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "blobs"), ImageLimits())


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if Pillow starts verifying or decoding a PNG's pixel data."""

    class PixelsTouched(BaseException):
        """Escapes the store's handling of decoder errors, which catches Exception."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise PixelsTouched("pixel data was read before the header check refused the image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", refuse)


# --- storage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                            ("GIF", "image/gif")])
def test_round_trip(store: BlobStore, fmt: str, media_type: str) -> None:
    data = encode(fmt)
    ref = store.put_image(data)
    assert ref == BlobRef(sha256=hashlib.sha256(data).hexdigest(), media_type=media_type, size_bytes=len(data),
                          width=48, height=32)
    assert store.exists(ref) and store.exists(ref.sha256)
    assert store.get_bytes(ref) == data == store.get_bytes(ref.sha256)
    image = store.open_image(ref)
    assert (image.format, image.size) == (fmt, (48, 32))


def test_layout_is_sharded_by_hash_prefix(tmp_path: Path) -> None:
    store = BlobStore(f"file://{tmp_path}", ImageLimits())
    ref = store.put_image(encode("PNG"))
    sha = ref.sha256
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == [
        f"{sha[:2]}/{sha[2:4]}/{sha}"
    ]


def test_put_is_idempotent(store: BlobStore, tmp_path: Path) -> None:
    data = encode("PNG")
    first = store.put_image(data)
    blob = next(p for p in (tmp_path / "blobs").rglob(first.sha256))
    before = os.stat(blob)
    second = store.put_image(data)
    after = os.stat(blob)
    assert first == second
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns), "second put rewrote the blob"
    assert len([p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]) == 1


def test_failed_local_write_leaves_nothing_behind(store: BlobStore, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    data = encode("PNG")
    with pytest.raises(OSError, match="disk gone"):
        store.put_image(data)
    assert not store.exists(hashlib.sha256(data).hexdigest())
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


def test_blob_corrupted_on_disk_is_detected(store: BlobStore, tmp_path: Path) -> None:
    ref = store.put_image(encode("PNG"))
    blob = next(p for p in (tmp_path / "blobs").rglob(ref.sha256))
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    for read in (store.get_bytes, store.open_image):
        with pytest.raises(BlobCorrupt, match=f"blob {ref.sha256} .* is corrupt") as info:
            read(ref)
        assert info.value.sha256 == ref.sha256


def test_missing_blob(store: BlobStore) -> None:
    sha = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(sha)
    with pytest.raises(BlobMissing, match=f"blob {sha} is not in the store"):
        store.get_bytes(sha)
    with pytest.raises(BlobMissing):
        store.open_image(sha)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABCDEF" * 11, "a" * 63, ""])
def test_only_hashes_name_blobs(store: BlobStore, bad: str) -> None:
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        store.get_bytes(bad)
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        store.exists(bad)


def test_memory_backend() -> None:
    root = f"/dpe-test-{uuid.uuid4().hex}/blobs"
    store = BlobStore(f"memory:/{root}", ImageLimits())
    data = encode("JPEG")
    ref = store.put_image(data)
    assert store.put_image(data) == ref
    assert store.get_bytes(ref) == data
    assert store.open_image(ref).size == (48, 32)

    fs = fsspec.filesystem("memory")
    stored = fs.find(root)
    assert [p.removeprefix(f"{root}/") for p in stored] == [f"{ref.sha256[:2]}/{ref.sha256[2:4]}/{ref.sha256}"]
    fs.pipe_file(stored[0], data[:-1] + b"\0")
    with pytest.raises(BlobCorrupt):
        store.get_bytes(ref)
    fs.rm(stored[0])
    with pytest.raises(BlobMissing):
        store.get_bytes(ref)


def test_rejected_image_is_not_stored(store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(ImageRejected):
        store.put_image(encode("BMP"))
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


# --- rejections ----------------------------------------------------------------------------------


def test_empty() -> None:
    err = reject_reason(b"")
    assert err.reason_code == "empty"
    assert str(err) == "empty: image is empty (0 bytes)"


def test_too_many_bytes() -> None:
    data = encode("PNG")
    err = reject_reason(data, ImageLimits(max_bytes=1000))
    assert err.reason_code == "too_many_bytes"
    assert f"{len(data):,} bytes" in err.message and "limit of 1,000 bytes" in err.message


def test_too_many_bytes_at_default_limit_is_checked_before_parsing(no_decoding: None) -> None:
    err = reject_reason(encode("PNG", size=(4, 4)) + b"\0" * 20_000_000)
    assert err.reason_code == "too_many_bytes"
    assert "limit of 20,000,000 bytes" in err.message


def test_header_claiming_ten_gigapixels_is_rejected_unread(no_decoding: None) -> None:
    bomb = bilevel_png(100_000, 100_000, rows=1)
    err = reject_reason(bomb)
    assert err.reason_code == "too_many_pixels"
    assert "10000000000 pixels" in err.message and "limit 40,000,000" in err.message


def test_real_decompression_bomb_over_pillows_limit(no_decoding: None) -> None:
    bomb = bilevel_png(10_000, 10_000, rows=10_000)  # ~12 KB inflating to 12.5 MB of 100 Mpx
    assert len(bomb) < 20_000
    err = reject_reason(bomb)
    assert err.reason_code == "too_many_pixels"
    assert "100000000 pixels" in err.message


def test_real_decompression_bomb_under_pillows_limit(no_decoding: None) -> None:
    bomb = bilevel_png(7_000, 7_000, rows=7_000)  # 49 Mpx: between our default limit and Pillow's
    err = reject_reason(bomb)
    assert err.reason_code == "too_many_pixels"
    assert err.message == "image is 7000x7000 = 49,000,000 pixels, over the limit of 40,000,000 pixels"


def test_pixel_limit_is_configurable() -> None:
    err = reject_reason(encode("PNG"), ImageLimits(max_pixels=1000))
    assert err.reason_code == "too_many_pixels"
    assert "48x32 = 1,536 pixels" in err.message and "limit of 1,000 pixels" in err.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_image_is_corrupt(fmt: str) -> None:
    data = encode(fmt, size=(64, 64))
    err = reject_reason(data[: len(data) * 2 // 3])
    assert err.reason_code == "corrupt"


def test_truncated_jpeg_passes_verify_but_not_full_decode() -> None:
    truncated = encode("JPEG", size=(64, 64))[:1500]
    Image.open(io.BytesIO(truncated)).verify()  # Pillow's verify alone does not notice
    err = reject_reason(truncated)
    assert err.reason_code == "corrupt" and "truncated" in err.message


def test_png_with_bad_checksum_is_corrupt() -> None:
    data = bytearray(encode("PNG"))
    data[40] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    assert reject_reason(bytes(data)).reason_code == "corrupt"


def test_random_bytes_are_corrupt() -> None:
    err = reject_reason(random.Random(1).randbytes(4096))
    assert err.reason_code == "corrupt"
    assert err.message == "not a recognisable image (unknown format or damaged header)"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_format_not_allowed(fmt: str) -> None:
    err = reject_reason(encode(fmt))
    assert err.reason_code == "unsupported_format"
    assert err.message == f"format {fmt} is not allowed (allowed: GIF, JPEG, PNG, WEBP)"


def test_allowed_formats_are_configurable() -> None:
    ref = validate_image(encode("BMP"), ImageLimits(formats=["bmp"]))
    assert ref.media_type == "image/bmp"
    assert reject_reason(encode("PNG"), ImageLimits(formats=["BMP"])).reason_code == "unsupported_format"


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_are_refused(fmt: str) -> None:
    frame = Image.new("RGB", (16, 16), "blue")
    buf = io.BytesIO()
    frame.save(buf, format=fmt, save_all=True, append_images=[Image.new("RGB", (16, 16), "red")])
    err = reject_reason(buf.getvalue())
    assert err.reason_code == "unsupported_format" and "animated" in err.message


def test_rejection_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(reject_reason(b"")))
    assert (err.reason_code, err.message) == ("empty", "image is empty (0 bytes)")


# --- configuration -------------------------------------------------------------------------------


def test_limits_defaults_and_validation() -> None:
    limits = ImageLimits()
    assert (limits.max_bytes, limits.max_pixels, limits.formats) == (20_000_000, 40_000_000,
                                                                       ("GIF", "JPEG", "PNG", "WEBP"))
    assert ImageLimits.model_validate({"formats": ["webp", "PNG", "png"]}).formats == ("PNG", "WEBP")
    with pytest.raises(ValidationError, match="unknown image formats \\['JPG'\\]"):
        ImageLimits(formats=["JPG"])
    with pytest.raises(ValidationError):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValidationError):
        ImageLimits(max_pixel=5)
