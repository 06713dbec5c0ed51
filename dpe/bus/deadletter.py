"""Dead letters: what could not be parsed or processed, with its origin and the reason.

The original value travels untouched (base64), so nothing is lost: it can be fixed and replayed.
"""

from __future__ import annotations

import base64
from typing import Any, Protocol

from dpe.bus.codec import InvalidEvent
from dpe.events import DeadLetter

MAX_ERROR_CHARS = 8000


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


def dead_letter_for(record: RecordLike, error: Exception, stage: str, producer: str) -> DeadLetter:
    """A DeadLetter event for `record`, which failed at `stage` with `error`.

    `InvalidEvent` errors keep their own stage and error class; any other exception is named by
    its class.
    """
    if isinstance(error, InvalidEvent):
        error_class, message, stage = error.error_class, error.message, error.stage
    else:
        error_class, message = type(error).__name__, str(error) or repr(error)
    return DeadLetter(
        producer=producer,
        origin_topic=record.topic,
        origin_partition=record.partition,
        origin_offset=record.offset,
        origin_key=_text(record.key),
        stage=stage,
        error_class=error_class,
        error_message=message[:MAX_ERROR_CHARS],
        payload_b64=base64.b64encode(record.value or b"").decode(),
        headers={name: _text(value) or "" for name, value in (record.headers or [])},
    )
