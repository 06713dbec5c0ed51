"""A toolchain: a chart reader, a shape reader and a text reader, combined into one perceived scene.

`Toolchain.perceive` reads an image in a fixed order: a bar chart first (axes, gridlines and bars
are unmistakable), then shapes, then text (a formula when the reading parses as one). What it
returns is a `dpe.world.Scene` as a detector would describe the image: the content it saw, the
image's size and its background, and nothing a renderer knew (no seed, no noise, no clutter).
Readings are cached by the image's pixels, so the roles that look at one image share one reading.

The two toolchains (`TOOLCHAINS`) share no code and no model: their agreement is evidence.

Example:
    >>> from dpe.world import generate_scene, render_scene
    >>> scene = generate_scene("formula", 2, seed=5)
    >>> seen = TOOLCHAINS["regions"].perceive(render_scene(scene))
    >>> seen.kind, seen.formula.value() == scene.formula.value()
    ('formula', True)
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from PIL import Image

from dpe.perception import NotPerceived, contours, regions
from dpe.perception.formulas import parse_formula
from dpe.perception.glyphs import GlyphText
from dpe.perception.ocr import RapidText
from dpe.world import Scene
from dpe.world.scene import Chart, SceneObject, TextBlock

PERCEIVED_DIFFICULTY = 3
MAX_SIDE = 256
"""Shapes and charts are read with the image scaled to at most this side (positions are then in that frame); text is
read at full size. Detail beyond it adds time, not answers."""
MIN_SIDE = 8
"""Images with a side shorter than this are refused as showing nothing."""
"""The difficulty a perceived scene is written at: it decides which question forms the writer may use."""

_TEXT = re.compile(r"^[A-Za-z0-9+\-x=? ]{1,32}$")
_FORMULA = re.compile(r"\d")


class Toolchain:
    """One way of reading pixels: `perceive(image)` gives the perceived scene or raises `NotPerceived`."""

    def __init__(self, name: str, read_chart: Callable[[Image.Image], Chart | None],
                 read_objects: Callable[[Image.Image], list[SceneObject]], read_text: Callable[[Image.Image], str],
                 cache_size: int = 512):
        self.name = name
        self._read_chart = read_chart
        self._read_objects = read_objects
        self._read_text = read_text
        self._cache: OrderedDict[str, Scene | NotPerceived] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._reader: Callable[[Image.Image], Scene | NotPerceived] = self.read

    def read_elsewhere(self, reader: Callable[[Image.Image], Scene | NotPerceived] | None) -> None:
        """Read uncached images with `reader` from now on (a `dpe.perception.pool.PerceptionPool`'s), or in the
        calling thread again when None."""
        self._reader = reader or self.read

    def perceive(self, image: Image.Image) -> Scene:
        """The scene this toolchain sees in `image`; raises `NotPerceived` when it sees none it can describe."""
        image = image.convert("RGB")
        key = _pixels_key(image)
        with self._lock:
            known = self._cache.get(key)
        if known is None:
            known = self._reader(image)
            with self._lock:
                self._cache[key] = known
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(known, NotPerceived):
            raise NotPerceived(known.reason, known.detail)
        return known

    def read(self, image: Image.Image) -> Scene | NotPerceived:
        """The scene this toolchain sees in an RGB `image`, or why it sees none, as a value; uncached."""
        if min(image.size) < MIN_SIDE:
            return NotPerceived("no_content", f"a {image.width}x{image.height} image is too small to show anything")
        shown = _at_most(image, MAX_SIDE)
        frame = {"width": shown.width, "height": shown.height, "background": background_of(shown)}
        try:
            chart = self._read_chart(shown)
            if chart is not None:
                return _scene("chart", frame, chart=chart)
            try:
                return _scene("shapes", frame, objects=self._read_objects(shown)[:16])
            except NotPerceived as nothing:
                if nothing.reason != "no_content":
                    raise
            return self._text_scene(image, frame)
        except NotPerceived as refused:
            return refused
        except ValueError as invalid:
            return NotPerceived("ambiguous", f"the reading is not a consistent scene: {invalid}"[:300])

    def _text_scene(self, image: Image.Image, frame: dict) -> Scene:
        reading = self._read_text(image).strip()
        if not _TEXT.match(reading):
            raise NotPerceived("unreadable", f"read {reading[:40]!r}, which is no word or formula")
        block = TextBlock(text=reading, x=0, y=0, font_size=max(4, image.height // 4), color=(0, 0, 0))
        if _FORMULA.search(reading):
            return _scene("formula", frame, text=block, formula=parse_formula(reading))
        return _scene("text", frame, text=block)


def background_of(image: Image.Image) -> tuple[int, int, int]:
    """The median colour of the image's border pixels.

    Example:
        >>> background_of(Image.new("RGB", (16, 16), (245, 245, 235)))
        (245, 245, 235)
    """
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(value) for value in np.median(border, axis=0))


def _at_most(image: Image.Image, side: int) -> Image.Image:
    """The image scaled down (area-averaged) so that its longer side is at most `side`.

    Example:
        >>> _at_most(Image.new("RGB", (640, 480)), 256).size
        (256, 192)
    """
    scale = side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BOX)


def _pixels_key(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.size}".encode() + image.tobytes()).hexdigest()


def _scene(kind: str, frame: dict, **content: object) -> Scene:
    return Scene(seed=0, kind=kind, difficulty=PERCEIVED_DIFFICULTY, noise=0.0, **frame, **content)


def build_toolchains() -> dict[str, Toolchain]:
    """The two independent toolchains by name, each with an empty cache: SciPy regions with RapidOCR, OpenCV
    contours with glyph matching."""
    return {
        "regions": Toolchain("regions", regions.read_chart, regions.read_objects, RapidText().read),
        "contours": Toolchain("contours", contours.read_chart, contours.read_objects, GlyphText().read),
    }


TOOLCHAINS: dict[str, Toolchain] = build_toolchains()
"""The toolchains a process shares (one cache each), by name."""
