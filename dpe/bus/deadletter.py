"""Dead letters: what could not be parsed or processed, with its origin and the reason.

The original value travels untouched (base64), so nothing is lost: it can be fixed and replayed. A
letter that would not fit the dead-letter topic (a value of several MB, huge headers) travels
truncated instead: its origin, the size and SHA-256 of the value and its first bytes, with long
texts and headers clipped. So a dead letter always fits, and the record that needs one can never be
the one that stops a consumer.

Example:
    >>> from types import SimpleNamespace
    >>> record = SimpleNamespace(topic="dpe.eval.outcomes", partition=0, offset=7, key=b"counting",
    ...                          value=b"x" * 10_000, headers=[])
    >>> letter = dead_letter_for(record, ValueError("too big"), "decode", "test", max_event_bytes=1024)
    >>> letter.truncated, letter.payload_bytes, len(base64.b64decode(letter.payload_b64)) < 4096
    (True, 10000, True)
    >>> dead_letter_for(record, ValueError("too big"), "decode", "test", max_event_bytes=1 << 20).truncated
    False
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Protocol

from dpe.bus.codec import InvalidEvent
from dpe.events import DeadLetter
from dpe.topics import MODEL_TOPIC

MAX_ERROR_CHARS = 8000
PREFIX_BYTES = 64 << 10
"""Most bytes of the value a truncated letter keeps."""
CLIPPED_CHARS = 1000
"""Most characters of the key, the error message and each header name and value in a truncated letter."""
MAX_HEADERS = 16
"""Most headers a truncated letter keeps."""


class RecordLike(Protocol):
    """What aiokafka's and kafka-python's consumer records have in common."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


def _text(raw: bytes | None) -> str | None:
    return raw.decode("utf-8", errors="replace") if raw is not None else None


def dead_letter_limit(max_event_bytes: int) -> int:
    """The largest dead letter, in bytes of JSON: the dead-letter topic's limit.

    >>> dead_letter_limit(1 << 20)
    4194304
    """
    return MODEL_TOPIC[DeadLetter].max_bytes(max_event_bytes)


def dead_letter_for(record: RecordLike, error: Exception, stage: str, producer: str, max_event_bytes: int) -> DeadLetter:
    """A DeadLetter event for `record`, which failed at `stage` with `error`; truncated if it would not
    fit the dead-letter topic of a bus with `max_event_bytes` (so publishing it never fails on size).

    `InvalidEvent` errors keep their own stage and error class; any other exception is named by
    its class.
    """
    if isinstance(error, InvalidEvent):
        error_class, message, stage = error.error_class, error.message, error.stage
    else:
        error_class, message = type(error).__name__, str(error) or repr(error)
    value = record.value or b""
    letter = DeadLetter(
        producer=producer,
        origin_topic=record.topic,
        origin_partition=record.partition,
        origin_offset=record.offset,
        origin_key=_text(record.key),
        stage=stage,
        error_class=error_class,
        error_message=message[:MAX_ERROR_CHARS],
        payload_b64=base64.b64encode(value).decode(),
        payload_bytes=len(value),
        payload_sha256=hashlib.sha256(value).hexdigest(),
        headers={name: _text(raw) or "" for name, raw in (record.headers or [])},
    )
    limit = dead_letter_limit(max_event_bytes)
    return letter if _size(letter) <= limit else _truncated(letter, value, limit)


def _size(letter: DeadLetter) -> int:
    return len(letter.model_dump_json().encode())


def _clip_chars(limit: int) -> int:
    """Characters kept of each clipped text in a truncated letter of at most `limit` bytes.

    A truncated letter has at most 2 + 2 * MAX_HEADERS clipped texts, and JSON takes at most 6 bytes
    for a character (``\\u001f``): with at most limit // 512 characters each they take under half the
    limit, which leaves the rest for the envelope (ASCII names, ids and numbers) even at the smallest
    `max_event_bytes` (1 KiB: a 4 KiB letter).

    >>> _clip_chars(4096), _clip_chars(4 << 20)
    (8, 1000)
    """
    return min(CLIPPED_CHARS, limit // 512)


def _truncated(letter: DeadLetter, value: bytes, limit: int) -> DeadLetter:
    """`letter` cut to at most `limit` bytes: clipped texts and headers, and as much of the start of
    `value` as fits (at most PREFIX_BYTES)."""
    chars = _clip_chars(limit)
    headers = list(letter.headers.items())[:MAX_HEADERS]
    bare = letter.model_copy(update={
        "origin_key": None if letter.origin_key is None else letter.origin_key[:chars],
        "error_message": letter.error_message[:chars],
        "headers": {name[:chars]: raw[:chars] for name, raw in headers},
        "payload_b64": "",
        "truncated": True,
    })
    room = max(0, limit - _size(bare))
    prefix = value[: min(PREFIX_BYTES, room // 4 * 3)]
    return bare.model_copy(update={"payload_b64": base64.b64encode(prefix).decode()})
