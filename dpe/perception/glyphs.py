"""Glyph matching: a classic OCR for the world's text and formulas, on numpy and Pillow alone.

The world draws text in one font (Pillow's default scalable font) at integer pen positions, so an
image of text is, up to noise and clutter, a sum of glyph bitmaps that Pillow can render again.
`GlyphText` reads a line that way, sharing no code or model with the neural reader in `ocr`:

1. *Binarise*: darkness against the median background, scaled so that the ink reads 1 (`_alpha`);
   strong, non-isolated ink is split into connected components by run-length labelling.
2. *Find the line*: the components around the row holding most ink. Their commonest bottoms are
   baseline candidates, and the line's height names the font sizes it can have (the x-height,
   digit or ascender height of glyphs rendered at each size), each with its vertical origin.
3. *Segment and match at once*: for every candidate size and origin, every glyph of
   ``A-Za-z0-9+-=?`` is correlated with the image at every pen position (its gain is the drop in
   squared error when it is drawn there), and a dynamic programme over pen positions, stepping by
   each glyph's advance, picks the best chain. Touching characters need no cut: the advances
   segment the line, which is what a per-component matcher cannot do.
4. *Verify*: the chosen chain is rendered again and compared with the image. A poor overall or
   per-glyph fit, unexplained ink, or a glyph barely better than another of the same width raises
   `NotPerceived("unreadable")`; an image without ink raises `NotPerceived("no_content")`.

Rescaled images (a zoom) break the exact advances, so the reader mostly abstains on them.

Example:
    >>> from PIL import Image, ImageDraw, ImageFont
    >>> image = Image.new("RGB", (64, 64), (245, 245, 235))
    >>> ImageDraw.Draw(image).text((6, 20), "7+5=?", fill=(30, 40, 120), font=ImageFont.load_default(16))
    >>> GlyphText().read(image)
    '7+5=?'
    >>> GlyphText().read(Image.new("RGB", (64, 64), "white"))
    Traceback (most recent call last):
    ...
    dpe.perception.NotPerceived: no_content: no ink
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dpe.perception import NotPerceived

CHARSET = string.ascii_letters + string.digits + "+-=?"
"""The glyphs matched; a space is a pen advance with no glyph."""

_STRONG = 0.7  # alpha above which a pixel is surely ink (clutter strokes are lighter)
_MIN_CONTRAST = 40.0  # grey levels of ink darkness below which an image holds no ink
_MIN_SNR = 5.0  # ink darkness over the noise's standard deviation
_MIN_SIZE = 6
_MAX_SIZE = 64  # font sizes above this are not matched: a taller "line" is a picture, not text
_MAX_RUNS = 20_000  # ink runs above this are texture or noise, not a line of text
_GLYPH_PRIOR = 0.2  # each glyph must explain this share of its own energy to be drawn
_SPACE_PRIOR = 0.5  # a space costs this share of the mean glyph energy
_SAFE_GEMM = 262_144  # OpenBLAS runs a product single-threaded below this many multiply-adds
_MAX_FIT_DEFICIT = 0.05  # how far the line's correlation may fall below what the noise alone allows
_MIN_GLYPH_NCC = 0.8
_MIN_MARGIN = 0.03
_MAX_UNEXPLAINED = 0.1
_MAX_SPURIOUS = 0.05


@dataclass(frozen=True)
class _Font:
    """Glyph bitmaps of `CHARSET` at one size, cropped to the rows any glyph inks."""

    size: int
    stack: np.ndarray  # (glyphs, height, width) alpha in [0, 1]; pen at column `pad`, row 0 = `row0`
    flat: np.ndarray  # (height * width, glyphs), for correlating windows with every glyph at once
    energy: np.ndarray  # sum of squared alpha per glyph
    advance: np.ndarray  # pen advance per glyph
    groups: tuple[tuple[int, np.ndarray], ...]  # (advance, glyph indices with that advance)
    row0: int
    pad: int
    space: int

    @property
    def height(self) -> int:
        return self.stack.shape[1]

    @property
    def width(self) -> int:
        return self.stack.shape[2]


@dataclass(frozen=True)
class _Box:
    """A connected component of strong ink: inclusive rows and columns, pixel count."""

    top: int
    bottom: int
    left: int
    right: int
    count: int


@dataclass(frozen=True)
class _Reading:
    """A decoded chain: its text, squared-error gain, size, origin and per-glyph margins."""

    text: str
    score: float
    size: int
    y0: int
    x0: int
    margins: tuple[float, ...]


class GlyphText:
    """Reads one line of text by matching Pillow's default font glyphs; see the module docstring."""

    def read(self, image: Image.Image) -> str:
        """The text in `image`, or `NotPerceived` ('no_content' without ink, 'unreadable' when unsure)."""
        measured = _alpha(image)
        if measured is None:
            raise NotPerceived("no_content", "no ink")
        alpha, noise = measured
        line = _text_line(_components(alpha > _STRONG))
        if not line:
            raise NotPerceived("no_content", "no ink")
        reading = _best_reading(alpha, line)
        if reading is None or not reading.text.strip():
            raise NotPerceived("unreadable", "no glyph fits")
        _verify(alpha, noise, line, reading)
        return reading.text.strip()


def _alpha(image: Image.Image) -> tuple[np.ndarray, float] | None:
    """Ink coverage per pixel (background 0, ink 1) and the noise's deviation, or None without ink."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    background = float(np.median(gray))
    dark = background - gray if background >= 128 else gray - background
    noise = 1.4826 * float(np.median(np.abs(dark)))
    high = float(np.percentile(dark, 99.5))
    core = dark[dark > 0.5 * high]
    ink = float(np.percentile(core, 85)) if core.size else 0.0
    if ink < max(_MIN_CONTRAST, _MIN_SNR * noise):
        return None
    return dark / ink, noise / ink


def _components(mask: np.ndarray) -> list[_Box]:
    """8-connected components of `mask` (isolated pixels dropped) by run-length labelling."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    ends = np.nonzero(steps == -1)[1] - 1
    if len(rows) > _MAX_RUNS:
        raise NotPerceived("unreadable", f"{len(rows)} ink runs: texture, not a line of text")
    runs = list(zip(rows.tolist(), starts.tolist(), ends.tolist()))
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above = (0, 0)  # run index range of the row above the current one
    row_start = 0
    for i, (y, x0, x1) in enumerate(runs):
        if i and y != runs[i - 1][0]:
            above = (row_start, i) if runs[i - 1][0] == y - 1 else (i, i)
            row_start = i
        for j in range(*above):
            if runs[j][1] <= x1 + 1 and runs[j][2] >= x0 - 1:
                parent[root(i)] = root(j)
    boxes: dict[int, list[int]] = {}
    for i, (y, x0, x1) in enumerate(runs):
        box = boxes.setdefault(root(i), [y, y, x0, x1, 0])
        box[1], box[2], box[3], box[4] = y, min(box[2], x0), max(box[3], x1), box[4] + x1 - x0 + 1
    return [_Box(*box) for box in boxes.values() if box[4] >= 2]


def _text_line(boxes: list[_Box]) -> list[_Box]:
    """The components of the line through the row that most ink crosses."""
    if not boxes:
        return []
    low = min(box.top for box in boxes)
    weight = np.zeros(max(box.bottom for box in boxes) - low + 1)
    for box in boxes:
        weight[box.top - low:box.bottom - low + 1] += box.count
    row = low + int(weight.argmax())
    crossing = [box for box in boxes if box.top <= row <= box.bottom]
    top, bottom = min(box.top for box in crossing), max(box.bottom for box in crossing)
    slack = (bottom - top + 1) // 3
    return [box for box in boxes if box.top >= top - slack and box.bottom <= bottom + slack]


@lru_cache(maxsize=256)
def _font(size: int) -> _Font:
    """Render every glyph of `CHARSET` at `size` with the pen at (pad, 0)."""
    font = ImageFont.load_default(size=size)
    ascent, descent = font.getmetrics()
    boxes = [font.getbbox(char) for char in CHARSET]
    pad = max(0, -min(box[0] for box in boxes))
    width, height = pad + max(box[2] for box in boxes) + 1, ascent + descent + 2
    stack = np.zeros((len(CHARSET), height, width), np.float32)
    for index, char in enumerate(CHARSET):
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).text((pad, 0), char, fill=255, font=font)
        stack[index] = np.asarray(canvas, dtype=np.float32) / 255
    inked = np.nonzero(stack.max(axis=(0, 2)) > 0)[0]
    stack = np.ascontiguousarray(stack[:, inked[0]:inked[-1] + 1])
    advance = np.array([int(font.getlength(char)) for char in CHARSET])
    groups = tuple((int(a), np.nonzero(advance == a)[0]) for a in sorted(set(advance.tolist())))
    return _Font(
        size=size,
        stack=stack,
        flat=np.ascontiguousarray(stack.reshape(len(CHARSET), -1).T),
        energy=(stack**2).sum(axis=(1, 2)),
        advance=advance,
        groups=groups,
        row0=int(inked[0]),
        pad=pad,
        space=int(font.getlength(" ")),
    )


@lru_cache(maxsize=256)
def _line_metrics(size: int) -> tuple[int, tuple[int, ...]]:
    """Baseline row at `size` and the strong-ink heights above it of 'x', '0', 'l' and 't'."""
    font = ImageFont.load_default(size=size)
    tops, base = [], 0
    for char in "x0lt":
        canvas = Image.new("L", (2 * size + 4, 2 * size + 4), 0)
        ImageDraw.Draw(canvas).text((2, 0), char, fill=255, font=font)
        rows = np.asarray(canvas, dtype=np.float32).max(axis=1) / 255
        inked = np.nonzero(rows > min(_STRONG, 0.9 * rows.max()))[0]
        tops.append(int(inked[0]))
        base = int(inked[-1]) if char == "x" else base
    return base, tuple(base - top + 1 for top in tops)


def _hypotheses(line: list[_Box]) -> dict[int, list[int]]:
    """Font sizes the line's height allows, each with the vertical origins to try."""
    top = min(box.top for box in line)
    tall = [box for box in line if box.bottom - box.top + 1 >= 0.4 * (max(b.bottom for b in line) - top + 1)]
    bottoms = [box.bottom for box in tall]
    bases = sorted(set(bottoms), key=lambda b: (-bottoms.count(b), -b))[:2]
    found: dict[int, set[int]] = {}
    for base in bases:
        height = base - top + 1
        for size in range(_MIN_SIZE, min(_MAX_SIZE, int(2.5 * height) + 2) + 1):
            baseline, heights = _line_metrics(size)
            if min(abs(height - h) for h in heights) <= height // 20:  # a row of slack for large text
                y0 = base - baseline
                found.setdefault(size, set()).update((y0 - 1, y0, y0 + 1))
    return {size: sorted(origins) for size, origins in found.items()}


def _best_reading(alpha: np.ndarray, line: list[_Box]) -> _Reading | None:
    """The best chain over all size and origin hypotheses, by squared-error gain."""
    left, right = min(box.left for box in line), max(box.right for box in line)
    best: tuple[float, str, _Font, int, int, np.ndarray, list[tuple[int, int]]] | None = None
    for size, origins in _hypotheses(line).items():
        font = _font(size)
        margin = font.height + font.row0 + font.width + 2
        x_lo, x_hi = left - font.width + 1 + margin, right + 1 + margin
        gains = _gains(np.pad(alpha, margin), font, [y0 + margin for y0 in origins], x_lo, x_hi)
        nets = gains - _GLYPH_PRIOR * font.energy[None, :, None]
        index = int(np.maximum(nets.max(axis=1), 0).sum(axis=1).argmax())  # decode only the likeliest origin
        text, score, start, placed = _decode(nets[index], font)
        if best is None or score > best[0]:
            best = (score, text, font, origins[index], start + x_lo - margin, nets[index], placed)
    if best is None:
        return None
    score, text, font, y0, x0, net, placed = best
    margins = tuple(_margin(net[:, pen], font, glyph) for glyph, pen in placed)
    return _Reading(text, score, font.size, y0, x0, margins)


def _gains(padded: np.ndarray, font: _Font, origins: list[int], x_lo: int, x_hi: int) -> np.ndarray:
    """(origins, glyphs, pens): drop in squared error when each glyph is drawn at pen x_lo + i."""
    rows, cols = font.height, font.width
    bands = np.stack([padded[y + font.row0:y + font.row0 + rows, x_lo - font.pad:x_hi - font.pad + cols] for y in origins])
    windows = np.lib.stride_tricks.sliding_window_view(bands, cols, axis=2).transpose(0, 2, 1, 3)
    count = windows.shape[0] * windows.shape[1]
    windows = windows.reshape(count, rows * cols)
    chunk = max(1, _SAFE_GEMM // font.flat.size)  # many small products instead of one threaded one
    extra = -count % chunk
    if extra:
        windows = np.concatenate([windows, np.zeros((extra, rows * cols), np.float32)])
    correlation = (windows.reshape(-1, chunk, rows * cols) @ font.flat).reshape(-1, len(CHARSET))[:count]
    correlation = correlation.reshape(len(origins), -1, len(CHARSET)).transpose(0, 2, 1)
    return 2 * correlation - font.energy[None, :, None]


def _decode(net: np.ndarray, font: _Font) -> tuple[str, float, int, list[tuple[int, int]]]:
    """Best chain of glyphs and spaces for one origin: a dynamic programme over pen positions.

    Returns the text, its gain, the first pen position and the (glyph, pen) pairs drawn.
    """
    pens = net.shape[1]
    steps = [advance for advance, _ in font.groups]
    best_value, best_glyph = [], []
    for _, members in font.groups:
        pick = net[members].argmax(axis=0)
        best_value.append(net[members][pick, np.arange(pens)].tolist())
        best_glyph.append(members[pick].tolist())
    space_cost = _SPACE_PRIOR * float(font.energy.mean())
    end = pens + max(max(steps), font.space) + 1
    score, back = [0.0] * end, [-1] * end  # back: glyph index, -2 for a space, -1 for the chain start
    for x in range(1, end):
        value, glyph = 0.0, -1
        for k, step in enumerate(steps):
            pen = x - step
            if 0 <= pen < pens and score[pen] + best_value[k][pen] > value:
                value, glyph = score[pen] + best_value[k][pen], best_glyph[k][pen]
        if x >= font.space and back[x - font.space] >= 0 and score[x - font.space] - space_cost > value:
            value, glyph = score[x - font.space] - space_cost, -2
        score[x], back[x] = value, glyph
    x = int(np.argmax(score))
    total = score[x]
    chars, placed = [], []
    while back[x] != -1:
        glyph = back[x]
        x -= font.space if glyph == -2 else int(font.advance[glyph])
        chars.append(" " if glyph == -2 else CHARSET[glyph])
        if glyph != -2:
            placed.append((glyph, x))
    return "".join(reversed(chars)), total, x, placed[::-1]


def _margin(column: np.ndarray, font: _Font, glyph: int) -> float:
    """How much better `glyph` fits than the best other glyph of the same advance, per unit energy."""
    rivals = [i for i in np.nonzero(font.advance == font.advance[glyph])[0] if i != glyph]
    runner_up = float(column[rivals].max()) if rivals else -np.inf
    return (float(column[glyph]) - runner_up) / float(font.energy[glyph])


def _render(shape: tuple[int, int], reading: _Reading) -> np.ndarray:
    """The reading drawn as alpha on an image of `shape` (glyphs outside it are cut)."""
    font = _font(reading.size)
    margin = font.height + font.row0 + font.width + 2
    canvas = np.zeros((shape[0] + 2 * margin, shape[1] + 2 * margin), np.float32)
    pen = reading.x0
    top = margin + reading.y0 + font.row0
    for char in reading.text:
        if char == " ":
            pen += font.space
            continue
        glyph = CHARSET.index(char)
        left = margin + pen - font.pad
        canvas[top:top + font.height, left:left + font.width] += font.stack[glyph]
        pen += int(font.advance[glyph])
    return np.minimum(canvas[margin:margin + shape[0], margin:margin + shape[1]], 1.0)


def _verify(alpha: np.ndarray, noise: float, line: list[_Box], reading: _Reading) -> None:
    """Raise `NotPerceived('unreadable')` unless the rendered reading explains the line's ink well.

    The line must correlate with its rendering almost as well as pixel noise of deviation `noise`
    allows; blur (a rescaled image), clutter or a wrong glyph all lower the correlation further.
    """
    if min(reading.margins) < _MIN_MARGIN:
        raise NotPerceived("unreadable", "a glyph is barely better than another")
    model = _render(alpha.shape, reading)
    drawn_rows, drawn_cols = np.nonzero(model > 0.05)
    top = max(0, min([box.top for box in line] + drawn_rows.tolist()) - 2)
    bottom = max([box.bottom for box in line] + drawn_rows.tolist()) + 3
    left = max(0, min([box.left for box in line] + drawn_cols.tolist()) - 2)
    right = max([box.right for box in line] + drawn_cols.tolist()) + 3
    seen, drawn = alpha[top:bottom, left:right], model[top:bottom, left:right]
    expected = float(drawn.std() / np.sqrt(drawn.var() + noise**2))
    if _ncc(seen, drawn) < expected - _MAX_FIT_DEFICIT:
        raise NotPerceived("unreadable", "the line fits poorly")
    strong = seen > _STRONG
    if (strong & (drawn < 0.1)).sum() > _MAX_UNEXPLAINED * max(1, strong.sum()):
        raise NotPerceived("unreadable", "ink left unexplained")
    solid = drawn > 0.7
    if (solid & (seen < 0.3)).sum() > _MAX_SPURIOUS * max(1, solid.sum()):
        raise NotPerceived("unreadable", "glyphs drawn where there is no ink")
    if _worst_glyph_ncc(alpha, model, reading) < _MIN_GLYPH_NCC:
        raise NotPerceived("unreadable", "a glyph fits poorly")


def _worst_glyph_ncc(alpha: np.ndarray, model: np.ndarray, reading: _Reading) -> float:
    font = _font(reading.size)
    top = max(0, reading.y0 + font.row0)
    worst, pen = 1.0, reading.x0
    for char in reading.text:
        if char == " ":
            pen += font.space
            continue
        left = max(0, pen - font.pad)
        box = (slice(top, reading.y0 + font.row0 + font.height), slice(left, pen - font.pad + font.width))
        worst = min(worst, _ncc(alpha[box], model[box]))
        pen += int(font.advance[CHARSET.index(char)])
    return worst


def _ncc(first: np.ndarray, second: np.ndarray) -> float:
    """Normalised correlation of two equal-shaped arrays (0 when either is flat)."""
    a, b = first - first.mean(), second - second.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / norm if norm > 0 else 0.0
