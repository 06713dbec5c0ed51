"""Shapes and bar charts read from pixels with connected regions (NumPy and SciPy only).

Objects: the world's colours are saturated and its backgrounds, clutter, gridlines and ink are
grey or dark, so a lightly smoothed chroma map (max minus min channel) seeds one region per object.
Each region is refined by projecting its pixels onto the line from the local background to its own
colour (`alpha`, with pixels far off that line, such as grey clutter, left out), named by the
nearest palette colour, and classified by matching its `alpha` map with the ideal shapes fitted to
its bounding box. Thin regions (text strokes) and regions whose colour is off the palette (ink) are
not objects.

Charts: the two dark axes form the longest horizontal and vertical dark runs; the arm the bars stand
on is the baseline. The image is turned so that the baseline is at the bottom and the value axis on
the left, the gridlines' spacing is the unit that best explains the rows' greyness, and each bar's
value is its height (with sub-pixel edges) in units. Bars are listed from the value axis outward,
which is left to right in an upright chart, so rotations and flips do not reorder them.

Example:
    >>> from dpe.world import generate_scene, render_scene
    >>> scene = generate_scene("shapes", 2, seed=4)
    >>> [(o.shape, o.color) for o in read_objects(render_scene(scene))] == [
    ...     (o.shape, o.color) for o in sorted(scene.objects, key=lambda o: (o.y, o.x))]
    True
    >>> chart = generate_scene("chart", 3, seed=4)
    >>> read_chart(render_scene(chart)) == chart.chart
    True
    >>> read_chart(render_scene(scene)) is None
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from dpe.perception import NotPerceived
from dpe.world.palette import COLORS, INK_COLORS
from dpe.world.scene import Bar, Chart, SceneObject

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)
_KNOWN_COLORS = np.vstack([_PALETTE, np.array(INK_COLORS, dtype=np.float32)])
"""The palette's colours, then the ink colours of text."""
_SEED_CHROMA = 50.0
"""Smoothed chroma above which a pixel may belong to an object or a bar (palette chroma is 90 or more)."""
_MIN_BLOB = 10
"""Coloured blobs of fewer pixels (at 64 x 64; the area scales with the image) are noise, not objects."""
_EIGHT = np.ones((3, 3), dtype=bool)
_SPLIT_LEVELS = 32
"""Most cut levels tried when splitting a blob into touching objects (finer steps on small blobs, 0.25 px)."""
_PROMINENCE = 0.25
"""How far (pixels at 64 x 64) an object's interior rises above its joint to a touching object of its colour."""
_MAX_COLOR_DISTANCE = 60.0
"""A region further than this (RGB distance) from every palette colour is not an object (ink, noise)."""
_CLEAR_COLOR_DISTANCE = 25.0
"""A region that matches no shape is an object (an ambiguous one) only when its colour is this close to the palette."""
_MAX_RESIDUAL = 45.0
"""Pixels further than this from the background-to-colour line belong to something else (clutter)."""
_MIN_THICKNESS = 0.2
"""Regions thinner than this share of their extent (deepest interior point) are strokes, not shapes."""
_MAX_SINGLE_ERROR = 0.15
_MAX_SHAPE_ERROR = 0.3
"""Mean |alpha - template| above which a region matches no shape."""
_SUPERSAMPLE = 4
_MIN_BAR_AREA = 6
"""Bars' blobs may be smaller than objects' (a bar of one unit, shrunk): fewer pixels (at 64 x 64) are noise."""
_MIN_BAR_FILL = 0.6
"""A bar's blob fills at least this share of its bounding box."""
_EDGE_TOLERANCE = 1.5
"""Pixels by which the ends of bars standing on one baseline may differ."""
_MIN_AXIS_DARKNESS = 40.0
"""Mean darkness (grey levels below the background) of an axis line beside the bars."""
_MIN_CHART_SHARE = 0.3
"""A chart's value axis spans at least this share of the image (text strokes do not)."""
_MIN_UNIT = 2.0
"""The narrowest gridline spacing considered, in pixels."""
_MAX_LINE_GAP = 2
"""Rows of noise by which a line's darkness may dip below half before the line is taken to end."""
_AXIS_GAP = 0.3
"""The value axis lies within this share of a bar's width (plus two pixels) of the first bar."""
_CROSS_ARM = 0.37
"""Half-width of a cross's arms as a share of its half-extent."""
_TRIANGLE_CENTRE_SHIFT = 2 / 1.8 - 1
"""A triangle's centre lies this share of its half-extent from the middle of its box towards its base."""
_SQUARE_HALF = 0.85
"""A square's half-side as a share of its radius."""


@dataclass(frozen=True)
class _Region:
    """A candidate object: where its window lies in the image, its alpha map there and its colour."""

    top: int
    left: int
    mask: np.ndarray
    alpha: np.ndarray
    color: np.ndarray


@dataclass(frozen=True)
class _Fit:
    """An ideal shape fitted to a region: its template name, centre and half-extents (pixel-edge coordinates)."""

    name: str
    cx: float
    cy: float
    hx: float
    hy: float


def read_objects(image: Image.Image) -> list[SceneObject]:
    """The shapes in the image (shape, colour name, centre x/y, radius `size`), sorted by (y, x).

    Raises NotPerceived("no_content") when none, NotPerceived("ambiguous") when a region cannot be
    classified confidently.
    """
    rgb = _pixels(image)
    smooth = ndimage.uniform_filter(rgb, size=(3, 3, 1))
    chroma = smooth.max(axis=2) - smooth.min(axis=2)
    seeds = _seeds(smooth, chroma, _min_area(rgb.shape, _MIN_BLOB))
    found = _read_seeds(rgb, smooth, seeds)
    poor = [index for index, (_, error) in found.items() if error > _MAX_SINGLE_ERROR]
    if poor and _split_seeds(seeds, poor):
        found = _read_seeds(rgb, smooth, seeds)
    objects = [(obj, error) for obj, error in found.values() if obj is not None]
    if not objects:
        raise NotPerceived("no_content", "no coloured shape in the image")
    for obj, error in objects:
        if error > _MAX_SHAPE_ERROR:
            raise NotPerceived("ambiguous", f"the {obj.color} region near ({obj.x}, {obj.y}) matches no shape")
    return sorted((obj for obj, _ in objects), key=lambda obj: (obj.y, obj.x))


def _read_seeds(
    rgb: np.ndarray, smooth: np.ndarray, seeds: np.ndarray
) -> dict[int, tuple[SceneObject | None, float]]:
    """The palette-coloured region grown from each seed, by seed label: the object it shows and the error of its
    shape's fit, or (None, inf) when it is too thin to be one object (touching objects to split, or a stroke).

    A region that matches no shape counts only when its colour is clearly a palette colour: a blot of text is not.
    """
    territory = seeds[tuple(ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True))]
    found: dict[int, tuple[SceneObject | None, float]] = {}
    for index, window in enumerate(ndimage.find_objects(seeds), start=1):
        region = None if window is None else _region(rgb, smooth, seeds, territory, index, window)
        if region is None or not _is_palette_color(region.color):
            continue
        obj, error = _classify(region) if _is_solid(region) else (None, math.inf)
        if error <= _MAX_SHAPE_ERROR or _is_clear_color(region.color):
            found[index] = obj, error
    return found


def _split_seeds(seeds: np.ndarray, indices: list[int]) -> bool:
    """Split the seeds `indices` (in place) into the touching objects they join; whether any was split."""
    prominence = _PROMINENCE * max(1.0, min(seeds.shape) / 64)
    min_area = _min_area(seeds.shape, _MIN_BLOB)
    windows = ndimage.find_objects(seeds)
    split = False
    for index in indices:
        window = windows[index - 1]
        parts = _split(seeds[window] == index, min_area, prominence)
        for part in parts[1:]:
            seeds[window][part] = seeds.max() + 1
        split |= len(parts) > 1
    return split


def _pixels(image: Image.Image) -> np.ndarray:
    """The image as a float32 height x width x 3 RGB array."""
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _seeds(smooth: np.ndarray, chroma: np.ndarray, min_area: int) -> np.ndarray:
    """Label the coloured regions, one label per object.

    A pixel belongs to a palette colour when its smoothed colour lies on the line from the background to it (a blend
    of the two, up to noise, with the chroma such a blend has) at least half of the way, so a blurred edge keeps its
    object's colour while grey clutter and the blurred gap between two neighbouring objects belong to nothing. Blobs
    that join touching objects of different colours are split by colour; blobs of text ink are dropped.
    """
    background = _background(smooth, chroma)
    directions = _PALETTE - background
    offset = smooth - background
    alphas = offset @ directions.T / (directions**2).sum(axis=1)
    residuals = (offset**2).sum(axis=2)[..., None] - alphas**2 * (directions**2).sum(axis=1)
    nearest = np.where(alphas > 0.25, residuals, np.inf).argmin(axis=2)
    alpha = np.take_along_axis(alphas, nearest[..., None], axis=2)[..., 0]
    residual = np.take_along_axis(residuals, nearest[..., None], axis=2)[..., 0]
    line_chroma = _PALETTE.max(axis=1) - _PALETTE.min(axis=1)
    belongs = (alpha >= 0.5) & (residual < _MAX_RESIDUAL**2) & (chroma >= 0.5 * alpha * line_chroma[nearest])
    seeds = np.zeros(belongs.shape, dtype=np.int32)
    labels, _ = ndimage.label(belongs, structure=_EIGHT)
    for label, window in enumerate(ndimage.find_objects(labels), start=1):
        for part in _split_colors(labels[window] == label, nearest[window], min_area):
            if np.count_nonzero(part) >= min_area and not _is_ink(offset[window][part].mean(axis=0), background):
                seeds[window][part] = seeds.max() + 1
    return seeds


def _is_ink(offset: np.ndarray, background: np.ndarray) -> bool:
    """Whether a blob's mean offset from the background lies nearer the line to an ink colour than to any palette
    colour's: a blob of blends of one colour with the background has its mean on that colour's line."""
    directions = _KNOWN_COLORS - background
    along = directions @ offset / (directions**2).sum(axis=1)
    residuals = np.linalg.norm(offset - along[:, None] * directions, axis=1)
    return int(np.argmin(np.where(along > 0, residuals, np.inf))) >= len(_PALETTE)


def _background(smooth: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """The background colour: the median of the lighter half of the grey pixels (white when there are none)."""
    grey = smooth[chroma < _SEED_CHROMA / 2]
    if len(grey) == 0:
        return np.full(3, 255.0, dtype=np.float32)
    lightness = grey.mean(axis=1)
    return np.median(grey[lightness >= np.median(lightness)], axis=0)


def _min_area(shape: tuple[int, ...], area: int) -> int:
    """The fewest pixels of a coloured blob, `area` at 64 x 64, in an image of this shape."""
    return max(area, round(area * (min(shape[:2]) / 64) ** 2))


def _split_colors(blob: np.ndarray, nearest: np.ndarray, min_area: int) -> list[np.ndarray]:
    """The one-colour parts of a blob: one per colour with a solid core in it (a few stray pixels of another colour,
    or the thin blend along a dark line, have none), each with the pixels nearest to its core."""
    cores = {color: ndimage.binary_erosion(blob & (nearest == color)) for color in np.unique(nearest[blob])}
    cores = {color: core for color, core in cores.items() if np.count_nonzero(core) >= max(3, min_area // 2)}
    if len(cores) <= 1:
        return [blob]
    anchors = np.logical_or.reduce(list(cores.values()))
    closest = ndimage.distance_transform_edt(~anchors, return_distances=False, return_indices=True)
    owner = nearest[tuple(closest)]
    parts = []
    for color in cores:
        pieces, found = ndimage.label(blob & (owner == color), structure=_EIGHT)
        parts += [pieces == piece for piece in range(1, found + 1)]
    return parts


def _split(blob: np.ndarray, min_area: int, prominence: float) -> list[np.ndarray]:
    """The objects in a blob of one colour: itself when one shape explains it, else the watershed parts of touching
    objects.

    Each object is a hill of the blob's distance map that stands `prominence` pixels above the pass to the next; the
    first cut (from the lowest pass up) whose every part is explained by one shape wins.
    """
    if _shape_error(blob.astype(np.float32)) <= _MAX_SINGLE_ERROR:
        return [blob]
    depth = ndimage.distance_transform_edt(np.pad(ndimage.binary_fill_holes(blob), 1))[1:-1, 1:-1] * blob
    top = depth.max() - prominence
    for level in np.arange(1.0, top, max(0.25, (top - 1.0) / _SPLIT_LEVELS)):
        hills, found = ndimage.label(depth > level, structure=_EIGHT)
        if found < 2:
            continue
        peaks = np.asarray(ndimage.maximum(depth, hills, np.arange(1, found + 1)))
        tall = np.flatnonzero(peaks >= level + prominence) + 1
        if len(tall) < 2:
            continue
        flooded = _flood(np.searchsorted(tall, hills, side="right") * np.isin(hills, tall), depth, level)
        parts = [flooded == number for number in range(1, len(tall) + 1)]
        if all(_shape_error(_crop(part).astype(np.float32)) <= _MAX_SINGLE_ERROR for part in parts):
            return parts
    return [blob]


def _crop(mask: np.ndarray) -> np.ndarray:
    """A mask cut to its bounding box."""
    return mask[ndimage.find_objects(mask.astype(np.int8))[0]]


def _shape_error(alpha: np.ndarray) -> float:
    """How badly the best-fitting ideal shape explains an alpha map (see `_best_fit`)."""
    return _best_fit(alpha)[1]


def _flood(labels: np.ndarray, depth: np.ndarray, level: float) -> np.ndarray:
    """Grow labelled hills down a distance map level by level (a watershed by immersion) until they fill the blob."""
    labels = labels.astype(np.int32)
    for flood in np.arange(level, -0.5, -0.5):
        allowed = depth > flood
        while True:
            grown = ndimage.grey_dilation(labels, footprint=_EIGHT)
            new = allowed & (labels == 0) & (grown > 0)
            if not new.any():
                break
            labels[new] = grown[new]
    return labels


def _region(
    rgb: np.ndarray, smooth: np.ndarray, seeds: np.ndarray, territory: np.ndarray, index: int, window: tuple[slice, ...]
) -> _Region | None:
    """Refine seed `index` within its territory: its colour, local background and the pixels between them."""
    pad = 4
    top, left = max(0, window[0].start - pad), max(0, window[1].start - pad)
    bottom, right = min(rgb.shape[0], window[0].stop + pad), min(rgb.shape[1], window[1].stop + pad)
    box = (slice(top, bottom), slice(left, right))
    own = territory[box] == index
    chroma = smooth[box].max(axis=2) - smooth[box].min(axis=2)
    seed = seeds[box] == index
    color = rgb[box][seed & (chroma >= np.median(chroma[seed]))].mean(axis=0)
    background = _local_background(smooth[box], chroma)
    direction = color - background
    norm2 = float(direction @ direction)
    if norm2 < _MAX_COLOR_DISTANCE**2:
        return None
    offset = smooth[box] - background
    alpha = offset @ direction / norm2
    on_line = own & (np.linalg.norm(offset - alpha[..., None] * direction, axis=2) < _MAX_RESIDUAL)
    pieces, _ = ndimage.label((alpha > 0.5) & on_line)
    touched = np.unique(pieces[seed])
    mask = ndimage.binary_fill_holes(np.isin(pieces, touched[touched > 0]))
    if not mask.any():
        return None
    near = ndimage.binary_dilation(mask, iterations=2) & on_line
    interior = ndimage.binary_erosion(mask)
    color = rgb[box][interior if np.count_nonzero(interior) >= 4 else mask].mean(axis=0)
    raw_alpha = (rgb[box] - background) @ direction / norm2
    return _Region(top=top, left=left, mask=mask, alpha=np.clip(raw_alpha, -0.5, 1.5) * near, color=color)


def _local_background(smooth: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """The median colour of a window's grey pixels away from colour (white when there are none)."""
    free = ~ndimage.binary_dilation(chroma >= _SEED_CHROMA / 2, iterations=1)
    if np.count_nonzero(free) < 5:
        return np.full(3, 255.0, dtype=np.float32)
    return np.median(smooth[free], axis=0)


def _nearest_color(color: np.ndarray) -> tuple[str, float]:
    """The palette name nearest to an RGB colour, and its distance."""
    distances = np.linalg.norm(_PALETTE - color, axis=1)
    best = int(np.argmin(distances))
    return _PALETTE_NAMES[best], float(distances[best])


def _is_palette_color(color: np.ndarray) -> bool:
    """Whether a colour is near a palette colour, and nearer to it than to any ink colour."""
    distances = np.linalg.norm(_KNOWN_COLORS - color, axis=1)
    return int(np.argmin(distances)) < len(_PALETTE) and float(distances.min()) <= _MAX_COLOR_DISTANCE


def _is_clear_color(color: np.ndarray) -> bool:
    """Whether a colour is clearly a palette colour (as a bar's, averaged over many pixels, is)."""
    return _is_palette_color(color) and _nearest_color(color)[1] <= _CLEAR_COLOR_DISTANCE


def _is_solid(region: _Region) -> bool:
    """Whether a region is thick for its size, as a shape is (a stroke of text is not)."""
    rows, cols = np.nonzero(region.mask)
    extent = max(np.ptp(rows), np.ptp(cols)) + 1
    depth = ndimage.distance_transform_edt(np.pad(region.mask, 1)).max()
    return depth >= _MIN_THICKNESS * extent


def _classify(region: _Region) -> tuple[SceneObject, float]:
    """The object a region shows (the ideal shape that best explains its alpha map) and the error of that fit."""
    best, error = _best_fit(region.alpha)
    shape, _, apex = best.name.partition("-")
    x, y, radius = best.cx, best.cy, max(best.hx, best.hy) - 0.5
    if shape == "triangle":
        shift = _TRIANGLE_CENTRE_SHIFT
        x += {"left": shift * best.hx, "right": -shift * best.hx}.get(apex, 0.0)
        y += {"up": shift * best.hy, "down": -shift * best.hy}.get(apex, 0.0)
    elif shape == "square":
        radius /= _SQUARE_HALF
    obj = SceneObject(
        shape=shape,
        color=_nearest_color(region.color)[0],
        x=round(region.left + x - 0.5),
        y=round(region.top + y - 0.5),
        size=max(2, round(radius)),
    )
    return obj, error


def _best_fit(alpha: np.ndarray) -> tuple[_Fit, float]:
    """The ideal shape that best explains an alpha map, and its error (mean squared error over mean squared alpha).

    Each shape is fitted by moments: its centre and half-extents are those that give the map's centroid and
    variances. A triangle's apex points where the map is skewed.
    """
    mass = max(float(alpha.sum()), 1e-6)
    rows, cols = alpha.sum(axis=1) / mass, alpha.sum(axis=0) / mass
    ys, xs = np.arange(alpha.shape[0]) + 0.5, np.arange(alpha.shape[1]) + 0.5
    my, mx = float(rows @ ys), float(cols @ xs)
    vy, vx = max(float(rows @ (ys - my) ** 2), 0.25), max(float(cols @ (xs - mx) ** 2), 0.25)
    skew_y, skew_x = float(rows @ (ys - my) ** 3), float(cols @ (xs - mx) ** 3)
    if abs(skew_y) >= abs(skew_x):
        triangle = "triangle-up" if skew_y < 0 else "triangle-down"
    else:
        triangle = "triangle-left" if skew_x < 0 else "triangle-right"
    steps = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    sample_ys, sample_xs = (ys[:, None] - 0.5 + steps).ravel(), (xs[:, None] - 0.5 + steps).ravel()
    energy = max(float((alpha**2).mean()), 1e-6)
    scored = []
    for name in ("circle", "square", "diamond", "cross", triangle):
        eu, ev, vu, vv = _moments(name)
        hx, hy = (vx / vu) ** 0.5, (vy / vv) ** 0.5
        fit = _Fit(name=name, cx=mx - eu * hx, cy=my - ev * hy, hx=hx, hy=hy)
        inside = _inside(name, ((sample_xs - fit.cx) / hx)[None, :], ((sample_ys - fit.cy) / hy)[:, None])
        coverage = inside.reshape(alpha.shape[0], _SUPERSAMPLE, alpha.shape[1], _SUPERSAMPLE).mean(axis=(1, 3))
        scored.append((float(((alpha - coverage) ** 2).mean()) / energy, fit))
    error, fit = min(scored, key=lambda pair: pair[0])
    return fit, error


def _inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether normalised points (u, v in [-1, 1] across the bounding box) fall inside an ideal shape."""
    shape, _, apex = name.partition("-")
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "cross":
        box = (np.abs(u) <= 1) & (np.abs(v) <= 1)
        return box & ((np.abs(u) <= _CROSS_ARM) | (np.abs(v) <= _CROSS_ARM))
    along, across = {"up": (v, u), "down": (-v, u), "left": (u, v), "right": (-u, v)}[apex]
    return (np.abs(along) <= 1) & (np.abs(across) <= (along + 1) / 2)


@lru_cache(maxsize=None)
def _moments(name: str) -> tuple[float, float, float, float]:
    """Mean and variance of u and v over an ideal shape (its bounding box spans [-1, 1] on both axes)."""
    grid = (np.arange(200) + 0.5) / 100 - 1
    inside = _inside(name, grid[None, :], grid[:, None])
    u, v = np.broadcast_to(grid[None, :], inside.shape)[inside], np.broadcast_to(grid[:, None], inside.shape)[inside]
    return float(u.mean()), float(v.mean()), float(u.var()), float(v.var())


def read_chart(image: Image.Image) -> Chart | None:
    """The bar chart in the image (bars with colour and integer value, max_value), or None when there is none.

    Bars are listed from the value axis outward (left to right in an upright chart). Raises NotPerceived("ambiguous")
    when a chart is found but its bars cannot be read consistently.
    """
    upright = _upright(_pixels(image))
    return None if upright is None else _read_upright(upright)


@dataclass(frozen=True)
class _BarBlob:
    """A bar's blob: its bounding box (inclusive pixel rows and columns) and its colour."""

    y0: int
    y1: int
    x0: int
    x1: int
    color: np.ndarray


def _bar_blobs(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[_BarBlob]]:
    """The background colour, the coloured-region labels and the rectangular palette-coloured blobs (bar candidates)."""
    smooth = ndimage.uniform_filter(rgb, size=(3, 3, 1))
    chroma = smooth.max(axis=2) - smooth.min(axis=2)
    seeds = _seeds(smooth, chroma, _min_area(rgb.shape, _MIN_BAR_AREA))
    blobs = []
    for index, window in enumerate(ndimage.find_objects(seeds), start=1):
        mask = ndimage.binary_opening(seeds[window] == index, structure=np.ones((2, 2))) if window else None
        if mask is None or not mask.any():
            continue
        rows, cols = np.nonzero(mask)
        interior = ndimage.binary_erosion(mask)
        color = np.median(rgb[window][interior if np.count_nonzero(interior) >= 3 else mask], axis=0)
        if np.count_nonzero(mask) >= _MIN_BAR_FILL * (np.ptp(rows) + 1) * (np.ptp(cols) + 1) and _is_palette_color(color):
            top, left = window[0].start, window[1].start
            blobs.append(_BarBlob(top + rows.min(), top + rows.max(), left + cols.min(), left + cols.max(), color))
    return _background(smooth, chroma), seeds, blobs


def _upright(rgb: np.ndarray) -> np.ndarray | None:
    """The image turned (rotated, then mirrored if need be) so that its chart's bars stand on a baseline at the bottom
    with the value axis on the left; None when no bars stand on a dark line.

    The baseline is the side of the bars where their ends line up (the darkest such side when several do); the value
    axis is the darker of the two sides across it.
    """
    background, _, blobs = _bar_blobs(rgb)
    if not blobs:
        return None
    darkness = _line_darkness(rgb, background)
    edges = {
        "bottom": [blob.y1 for blob in blobs],
        "top": [blob.y0 for blob in blobs],
        "left": [blob.x0 for blob in blobs],
        "right": [blob.x1 for blob in blobs],
    }
    spreads = {side: np.ptp(values) for side, values in edges.items()}
    aligned = [side for side in edges if spreads[side] <= min(spreads.values()) + _EDGE_TOLERANCE]
    baseline = max(aligned, key=lambda side: _line_beside(darkness, blobs, side, 3))
    if _line_beside(darkness, blobs, baseline, 3) < _MIN_AXIS_DARKNESS:
        return None
    across = [blob.x1 - blob.x0 + 1 if baseline in ("top", "bottom") else blob.y1 - blob.y0 + 1 for blob in blobs]
    reach = _axis_reach(across)
    sides = ("left", "right") if baseline in ("top", "bottom") else ("top", "bottom")
    axis = max(sides, key=lambda side: _line_beside(darkness, blobs, side, reach))
    turns = {"bottom": 0, "left": 1, "top": 2, "right": 3}[baseline]
    for _ in range(turns):
        axis = _TURNED_SIDE[axis]
    upright = np.rot90(rgb, turns)
    return np.ascontiguousarray(upright[:, ::-1] if axis == "right" else upright)


_TURNED_SIDE = {"left": "bottom", "bottom": "right", "right": "top", "top": "left"}
"""Where each side of an image goes when it is turned a quarter counter-clockwise."""


def _axis_reach(widths: list[int]) -> int:
    """How far (pixels) from the first bar the value axis may lie, for bars of these widths."""
    return 2 + math.ceil(_AXIS_GAP * float(np.median(widths)))


def _line_darkness(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """How much darker than the background each pixel is, less its chroma: high on grey lines only."""
    return background.mean() - rgb.mean(axis=2) - (rgb.max(axis=2) - rgb.min(axis=2))


def _line_beside(darkness: np.ndarray, blobs: list[_BarBlob], side: str, reach: int) -> float:
    """The darkest line parallel to one side of the blobs' box, from just inside it (where the blobs' blurred edges may
    hold the line) to `reach` pixels out, as its mean darkness."""
    y0, y1 = min(blob.y0 for blob in blobs), max(blob.y1 for blob in blobs)
    x0, x1 = min(blob.x0 for blob in blobs), max(blob.x1 for blob in blobs)
    height, width = darkness.shape
    if side in ("top", "bottom"):
        rows = range(y1 - 1, min(height, y1 + 1 + reach)) if side == "bottom" else range(max(0, y0 - reach), y0 + 2)
        means = [float(darkness[row, x0:x1 + 1].mean()) for row in rows]
    else:
        cols = range(x1 - 1, min(width, x1 + 1 + reach)) if side == "right" else range(max(0, x0 - reach), x0 + 2)
        means = [float(darkness[y0:y1 + 1, col].mean()) for col in cols]
    return max(means, default=0.0)


def _read_upright(rgb: np.ndarray) -> Chart | None:
    """Read an upright chart: baseline and value axis, the unit between gridlines, and each bar's height in units."""
    background, seeds, blobs = _bar_blobs(rgb)
    darkness = _line_darkness(rgb, background)
    blobs = sorted(blobs, key=lambda blob: blob.x0)
    baseline = _baseline(darkness, blobs)
    if baseline is None:
        return None
    blobs = [blob for blob in blobs if abs(blob.y1 + 1 - baseline) <= _EDGE_TOLERANCE + 1]
    axis = _value_axis(darkness, blobs, baseline) if blobs else None
    if axis is None:
        return None
    column, rough_top = axis
    profile = _gridline_profile(rgb, background, seeds, column, _baseline_end(darkness, blobs, baseline))
    top = _line_centre(profile, rough_top + 0.5) - 0.5
    if baseline - top < _MIN_CHART_SHARE * min(rgb.shape[:2]):
        return None
    max_value = _max_value(profile, top, baseline)
    unit = (baseline - top) / max_value
    bars = []
    for blob in blobs:
        value = round((baseline - _bar_top(rgb, background, blob, column)) / unit)
        if not 1 <= value <= max_value:
            raise NotPerceived("ambiguous", f"a bar reads {value} on a chart of 0..{max_value}")
        bars.append(Bar(color=_nearest_color(blob.color)[0], value=value))
    if len({bar.color for bar in bars}) != len(bars):
        raise NotPerceived("ambiguous", "two bars have the same colour")
    return Chart(bars=bars, max_value=max_value)


def _baseline(darkness: np.ndarray, blobs: list[_BarBlob]) -> float | None:
    """The top edge of the line the bars stand on (rows, continuous), or None when there is no dark line there.

    Each bar's columns are measured against the bar's own darkness, so a dark bar does not pass for the line.
    """
    lowest = max(blob.y1 for blob in blobs)
    rows = slice(max(0, lowest - 1), min(darkness.shape[0], lowest + 5))
    profile = np.mean([darkness[rows, _inner(blob)].mean(axis=1) - np.median(darkness[blob.y0:blob.y1, _inner(blob)])
                       for blob in blobs], axis=0)
    peak = int(np.argmax(profile))
    near = np.clip(profile[max(0, peak - 1):peak + 2], 0, None)
    if near.sum() < _MIN_AXIS_DARKNESS:
        return None
    return rows.start + max(0, peak - 1) + float(near @ np.arange(len(near))) / float(near.sum())


def _inner(blob: _BarBlob) -> slice:
    """A bar's columns without its blurred sides."""
    return slice(blob.x0 + 1, blob.x1) if blob.x1 - blob.x0 >= 3 else slice(blob.x0, blob.x1 + 1)


def _value_axis(darkness: np.ndarray, blobs: list[_BarBlob], baseline: float) -> tuple[int, float] | None:
    """The value axis near the first bar: its column and the top end of its line (rows, continuous)."""
    first = blobs[0]
    left = max(0, first.x0 - _axis_reach([blob.x1 - blob.x0 + 1 for blob in blobs]))
    bottom = math.floor(baseline) - 1
    highest = min(blob.y0 for blob in blobs)
    if bottom - highest < 2:
        return None
    strength = darkness[highest:bottom, left:first.x0 + 2].mean(axis=0)
    column = left + int(np.argmax(strength))
    if strength.max() < _MIN_AXIS_DARKNESS:
        return None
    line = ndimage.uniform_filter1d(darkness[:bottom, column], 3)
    half = 0.5 * float(np.median(line[highest:bottom]))
    row = highest
    for candidate in range(highest - 1, -1, -1):
        if line[candidate] >= half:
            row = candidate
        elif row - candidate > _MAX_LINE_GAP:
            break
    return column, _crossing(line, row, half)


def _gridline_profile(
    rgb: np.ndarray, background: np.ndarray, seeds: np.ndarray, column: int, right: int
) -> np.ndarray:
    """Each row's median darkness over the chart's columns clear of bars (NaN where too few are clear)."""
    clear = ~ndimage.binary_dilation(seeds[:, column + 1:right + 1] > 0)
    darkness = np.where(clear, background.mean() - rgb[:, column + 1:right + 1].mean(axis=2), np.nan)
    enough = clear.sum(axis=1) >= 2
    profile = np.full(rgb.shape[0], np.nan)
    profile[enough] = np.nanmedian(darkness[enough], axis=1)
    return profile


def _baseline_end(darkness: np.ndarray, blobs: list[_BarBlob], baseline: float) -> int:
    """The last column of the baseline, right of the last bar."""
    line = ndimage.uniform_filter1d(darkness[min(darkness.shape[0] - 1, round(baseline))], 3)
    column = blobs[-1].x1
    half = 0.5 * float(np.median(line[blobs[0].x0:column + 1]))
    while column + 1 < len(line) and line[column + 1] >= half:
        column += 1
    return column


def _line_centre(profile: np.ndarray, near: float) -> float:
    """The centre (rows, continuous) of the darkest line of a row profile within two rows of `near`."""
    rows = np.arange(max(0, round(near) - 3), min(len(profile), round(near) + 2))
    values = np.nan_to_num(profile[rows], nan=-np.inf)
    if len(rows) == 0 or not np.isfinite(values.max()):
        return near
    peak = int(np.argmax(values))
    around = rows[max(0, peak - 1):peak + 2]
    weights = np.clip(np.nan_to_num(profile[around]), 0, None)
    return float(weights @ (around + 0.5)) / float(weights.sum()) if weights.sum() > 0 else near


def _max_value(profile: np.ndarray, top: float, baseline: float) -> int:
    """The number of gridlines from the baseline up to the axis top: the even spacing whose ideal gridlines correlate
    best with the rows' darkness between the two."""
    rows = np.arange(max(0, math.floor(top) - 1), min(len(profile), math.floor(baseline) - 1))
    rows = rows[np.isfinite(profile[rows])]
    if len(rows) < 3:
        return 1
    observed = profile[rows] - profile[rows].mean()
    span = baseline - top
    best, best_score = 1, -math.inf
    for count in range(1, max(1, int(span / _MIN_UNIT)) + 1):
        lines = baseline + 0.5 - span / count * np.arange(1, count + 1)
        ideal = np.clip(1 - np.abs(rows[:, None] + 0.5 - lines[None, :]), 0, None).sum(axis=1)
        ideal -= ideal.mean()
        score = float(observed @ ideal) / max(float(np.linalg.norm(observed) * np.linalg.norm(ideal)), 1e-9)
        if score > best_score:
            best, best_score = count, score
    return best


def _bar_top(rgb: np.ndarray, background: np.ndarray, blob: _BarBlob, axis_column: int) -> float:
    """The top edge of a bar (rows, continuous): where the share of its colour, across its columns clear of the value
    axis, crosses one half."""
    columns = _inner(blob)
    columns = slice(max(columns.start, axis_column + 2), max(columns.stop, axis_column + 3))
    direction = blob.color - background
    coverage = ((rgb[:blob.y1 + 1, columns] - background) @ direction / float(direction @ direction)).mean(axis=1)
    row = (blob.y0 + blob.y1) // 2
    while row > 0 and coverage[row - 1] >= 0.5:
        row -= 1
    return _crossing(coverage, row, 0.5)


def _crossing(profile: np.ndarray, row: int, level: float) -> float:
    """Where (rows, continuous) a profile rises through `level` between row - 1 (below it) and `row` (at or above)."""
    above = profile[row - 1] if row > 0 else 0.0
    share = (level - above) / (profile[row] - above) if profile[row] > above else 0.5
    return row - 0.5 + float(np.clip(share, 0.0, 1.0))
