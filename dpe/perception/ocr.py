"""RapidOCR: a neural reader for the world's text and formulas (PP-OCR models, bundled with the pip package).

`RapidText` reads one line of text without RapidOCR's detector: the images hold a single short line
on a plain background, so the line is located from the pixels directly (`_line_box`: the row band
and column span of dark ink, padded), and only that crop goes through the PP-OCRv4 recogniser,
single-threaded and at the crop's own aspect ratio. This is several times faster than detection at
the library's default 736-pixel scale and reads these images at least as well. A reading whose mean
character confidence is low raises `NotPerceived("unreadable")`; an image without ink or a crop the
recogniser finds empty raises `NotPerceived("no_content")`. Full-width forms are folded (NFKC), so
'？' reads '?'; other characters (such as '×') are kept as the model gives them.

The engine loads lazily, once per instance; `read` is safe to call from several threads.

Example:
    >>> from PIL import Image, ImageDraw, ImageFont
    >>> image = Image.new("RGB", (64, 64), (245, 245, 235))
    >>> ImageDraw.Draw(image).text((6, 20), "7+5=?", fill=(30, 40, 120), font=ImageFont.load_default(16))
    >>> RapidText().read(image)
    '7+5=?'
"""

from __future__ import annotations

import threading
import unicodedata
from typing import Any

import numpy as np
from PIL import Image

from dpe.perception import NotPerceived

MIN_CONFIDENCE = 0.8
"""Mean character confidence below which a reading is refused."""

_MIN_CONTRAST = 40.0  # grey levels of ink darkness below which an image holds no ink
_CORE = 0.5  # pixels darker than this share of the darkest set the ink level
_STRONG = 0.6  # a pixel is surely ink above this share of the ink level
_MIN_ALPHANUMERICS = 2  # a lone letter is what the recogniser makes of a triangle ('A') or a cross ('+')
_CONFIRM_BELOW = 4  # shorter readings must be confirmed by RapidOCR's text detector
_PAD = 0.3  # padding around the line, as a share of its height


class RapidText:
    """Reads one line of text with RapidOCR's recogniser; see the module docstring."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._lock = threading.Lock()

    def read(self, image: Image.Image) -> str:
        """The text in `image`, or `NotPerceived` ('no_content' without text, 'unreadable' when unsure)."""
        ink = _ink(np.asarray(image.convert("L"), dtype=np.float32))
        if ink is None:
            raise NotPerceived("no_content", "no ink")
        left, top, right, bottom = _line_box(ink)
        engine = self._engine_once()
        crop = _as_bgr(255 - ink[top:bottom, left:right])  # dark ink on white, whatever the colours were
        result, _ = engine(crop, use_det=False, use_cls=False, use_rec=True)
        text, confidence = (result[0][0], float(result[0][1])) if result else ("", 0.0)
        text = unicodedata.normalize("NFKC", text).strip()
        if not text:
            raise NotPerceived("no_content", "the recogniser read nothing")
        if confidence < MIN_CONFIDENCE:
            raise NotPerceived("unreadable", f"confidence {confidence:.2f} for {text!r}")
        alphanumerics = sum(char.isascii() and char.isalnum() for char in text)
        if alphanumerics < _MIN_ALPHANUMERICS:
            raise NotPerceived("unreadable", f"{text!r} is too short to trust")
        if alphanumerics < _CONFIRM_BELOW and not _detected(engine, ink, (left, top, right, bottom)):
            raise NotPerceived("no_content", f"the detector finds no text where the recogniser read {text!r}")
        return text

    def _engine_once(self) -> Any:
        with self._lock:
            if self._engine is None:
                from rapidocr_onnxruntime import RapidOCR

                self._engine = RapidOCR(
                    intra_op_num_threads=1,
                    inter_op_num_threads=1,
                    min_side_len=0,  # no upscaling to multiples of 32, which distorts small crops
                    rec_img_shape=[3, 48, 48],  # pad the crop to its own width, not to 320 pixels
                    det_limit_side_len=128,  # detect at twice a 64-pixel image's size (default 736)
                    det_box_thresh=0.3,
                )
            return self._engine


def _detected(engine: Any, ink: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Whether RapidOCR's text detector finds text in the line's box, the rest of the image blanked."""
    left, top, right, bottom = box
    isolated = np.zeros_like(ink)
    isolated[top:bottom, left:right] = ink[top:bottom, left:right]
    boxes, _ = engine(_as_bgr(255 - isolated), use_det=True, use_cls=False, use_rec=False)
    return bool(boxes)


def _as_bgr(gray: np.ndarray) -> np.ndarray:
    """A grey image as the engine's three-channel array."""
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _ink(gray: np.ndarray) -> np.ndarray | None:
    """Ink darkness per pixel as uint8 (0 background, 255 full ink), or None when there is no ink.

    Normalising away the background tint and ink colour lets the recogniser see black on white.
    """
    background = float(np.median(gray))
    dark = background - gray if background >= 128 else gray - background
    darkest = float(np.percentile(dark, 99.5))
    if darkest < _MIN_CONTRAST:
        return None
    level = float(np.percentile(dark[dark > _CORE * darkest], 85))
    return np.clip(255 * dark / level, 0, 255).astype(np.uint8)


def _line_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) around the line with most ink, padded (the whole image if none)."""
    height, width = ink.shape
    strong = ink > 255 * _STRONG
    rows = strong.sum(axis=1)
    band = _densest_run(np.where(rows >= 2, rows, 0), gap=2)  # one-pixel rows are mostly clutter
    if band is None:
        return 0, 0, width, height
    top, bottom = band
    span = _densest_run(strong[top:bottom + 1].sum(axis=0), gap=max(2, int(0.8 * (bottom - top + 1))))
    left, right = span if span is not None else (0, width - 1)
    pad = max(2, round(_PAD * (bottom - top + 1)))
    return max(0, left - pad), max(0, top - pad), min(width, right + pad + 1), min(height, bottom + pad + 1)


def _densest_run(profile: np.ndarray, gap: int) -> tuple[int, int] | None:
    """First and last index of the run of non-zero entries (gaps up to `gap` bridged) with most mass."""
    inked = np.nonzero(profile)[0]
    if inked.size == 0:
        return None
    runs = np.split(inked, np.nonzero(np.diff(inked) > gap + 1)[0] + 1)
    run = max(runs, key=lambda indices: profile[indices[0]:indices[-1] + 1].sum())
    return int(run[0]), int(run[-1])
