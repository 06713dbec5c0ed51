"""Perception from pixels alone: what an image shows, read by tools, never by its metadata.

A perceiver turns an image into a *perceived* `dpe.world.Scene` (its objects, text, chart or
formula), the way a detector, a chart reader and an OCR engine would for a real image. The agents'
stand-ins write and answer questions about perceived scenes; they never see an item's metadata.

Two independent toolchains read the same image, so that agreement between them means something:

- ``regions``: connected regions with SciPy (`dpe.perception.regions`) and RapidOCR's PP-OCR
  models, which ship inside the pip package (`dpe.perception.ocr`);
- ``contours``: OpenCV contours and polygon fits (`dpe.perception.contours`) and a glyph matcher
  that segments characters and matches them with rendered glyphs (`dpe.perception.glyphs`).

A reader that cannot tell raises `NotPerceived` with a bounded reason.
"""

from __future__ import annotations

from typing import Literal

PerceptionReason = Literal["no_content", "ambiguous", "unreadable"]
"""Why an image could not be perceived: nothing found, conflicting readings, or unreadable content."""


class NotPerceived(ValueError):
    """The image could not be read; `reason` is bounded (`PerceptionReason`), `detail` says more."""

    def __init__(self, reason: PerceptionReason, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickled as (reason, detail), so that a reading from a worker process keeps both."""
        return type(self), (self.reason, self.detail)
