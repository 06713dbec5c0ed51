"""The ``contours`` toolchain: shapes and bar charts read from pixels with OpenCV contours and line morphology.

Shapes: pixels are labelled with the nearest palette colour in CIE Lab (ink colours and greys are labelled too, so
text and clutter are never objects) after a Gaussian blur sized to the measured noise. Each colour region is then
redrawn as a matched-filter membership map (projection of every pixel onto the line from the local background to the
region's colour), upsampled, thresholded and opened, and `cv2.findContours` outlines it. An outline is named by its
nearest template in a bank of shape descriptors (extent, solidity, fill of the enclosing circle, fill of
`cv2.minEnclosingTriangle`) made from drawn templates; a badly fitting outline is split at distance-transform cores.

Charts: long dark neutral lines come from a ridge filter and a long morphological opening. A baseline is a line with
bars on one side and a dark neutral value axis rising from one end; the image is turned upright (transpose and
flips), the axes are located to a fraction of a pixel, the number of gridlines is the comb that correlates best
with the gridline profile, and each bar's height is where its colour projection falls below one half.

Example:
    >>> from dpe.world.scene import generate_scene
    >>> from dpe.world.render import render_scene
    >>> scene = generate_scene("shapes", 2, seed=4)
    >>> [(o.shape, o.color) for o in read_objects(render_scene(scene))] == [
    ...     (o.shape, o.color) for o in sorted(scene.objects, key=lambda o: (o.y, o.x))]
    True
    >>> chart = generate_scene("chart", 2, seed=4).chart
    >>> read_chart(render_scene(generate_scene("chart", 2, seed=4))) == chart
    True
    >>> read_chart(render_scene(scene)) is None
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from dpe.perception import NotPerceived
from dpe.world.palette import COLORS, INK_COLORS, SHAPES
from dpe.world.scene import Bar, Chart, SceneObject

cv2.setNumThreads(1)

_MAX_SIDE = 256  # larger images are read at this size (INTER_AREA averages their noise away)
_BLUR_PER_NOISE = 0.07  # Gaussian sigma (px) of the labelling blur per unit of noise std
_MIN_AREA = 8.0  # px: smaller colour regions are specks
_MAX_REGIONS = 48  # colour regions above which an image is clutter, not shapes (world images have at most 11)
_SPLIT_LEVELS = 32  # most distance-transform levels tried when splitting touching objects
_MIN_INNER = 1.0  # px: regions thinner than this (text fringes, strokes) are not objects
_WORK_RADIUS = 12.0  # px: outlines are traced with objects upsampled to about this radius
_OPENING = 0.25  # of the working radius: opening diameter that cuts clutter strokes off an outline
_OVERLAP = 0.5  # share of an outline that must lie on its colour region
_SPLIT_ABOVE = 0.1  # descriptor distance above which an outline is tried as two touching objects
_AMBIGUOUS_ABOVE = 0.2  # descriptor distance above which an object-sized outline is no known shape
_LINE_INK = 60.0  # grey levels (3-row sum): darkness a chart line must have over its surroundings
_AXIS_EVIDENCE = 40.0  # grey levels: darkness minus twice the chroma of a value-axis column
_GRIDLINE_QUANTILE = 30  # percentile across a row's free pixels: gridlines fill a row, clutter does not
_MIN_GRID_FIT = 0.15  # correlation of the gridline comb below which the lines are not a chart
_CANDIDATE_FRAMES = 3
_SQUARE_TOLERANCE = 0.15  # of the baseline: how far the value axis may be from as long
_MIN_AXIS_COVER = 0.75  # share of its length over which an axis is at least half as dark as it usually is
_MIN_BAR_SOLIDITY = 0.6  # share of a bar's core in its colour
_SLOT_TOLERANCE = 0.25  # of a slot: how far a bar's centre may be from its slot's centre


def _lab(colors: np.ndarray | list[tuple[int, int, int]]) -> np.ndarray:
    """CIE Lab (L 0..100) of RGB colours, one row each."""
    rgb = np.asarray(colors, dtype=np.float32).reshape(1, -1, 3) / 255.0
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).reshape(-1, 3)


_NAMES = list(COLORS)
_PALETTE = _lab(list(COLORS.values()))
_CLASSES = np.concatenate([_PALETTE, _lab(list(INK_COLORS))])
_NEUTRAL = len(_CLASSES)
_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def _pixels(image: Image.Image) -> tuple[np.ndarray, float]:
    """The image as float RGB with no side above `_MAX_SIDE`, and the scale it was read at."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    scale = min(1.0, _MAX_SIDE / max(rgb.shape[:2]))
    if scale < 1:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return rgb, scale


def _noise(rgb: np.ndarray) -> float:
    """Pixel noise std from the median Laplacian response; flat padding (exact zeros) is left out."""
    response = np.abs(cv2.filter2D(rgb, cv2.CV_32F, _LAPLACE)[1:-1, 1:-1])
    textured = response[response > 0]
    return float(np.median(textured)) / (0.6745 * 6.0) if textured.size else 0.0


def _labels(rgb: np.ndarray, classes: np.ndarray = _CLASSES) -> np.ndarray:
    """Index of the nearest class in Lab per pixel; `len(classes)` (grey) when the chroma is smaller."""
    lab = cv2.cvtColor(np.clip(rgb, 0, 255) / 255.0, cv2.COLOR_RGB2Lab).reshape(-1, 3)
    squared = (lab * lab).sum(axis=1, keepdims=True) - 2 * lab @ classes.T + (classes * classes).sum(axis=1)
    grey = lab[:, 1:2] ** 2 + lab[:, 2:3] ** 2
    return np.argmin(np.hstack([squared, grey]), axis=1).astype(np.int32).reshape(rgb.shape[:2])


def _nearest_colour(rgb: np.ndarray) -> str:
    """The palette name nearest to an RGB colour in Lab."""
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - _lab(rgb)[0], axis=1)))]


# ---------------------------------------------------------------------------------------------- shapes


def _descriptor(contour: np.ndarray) -> np.ndarray:
    """Extent, solidity and the fills of the enclosing circle and triangle: apart for the five shapes."""
    area = cv2.contourArea(contour)
    _, _, w, h = cv2.boundingRect(contour)
    hull = max(cv2.contourArea(cv2.convexHull(contour)), 1e-6)
    _, radius = cv2.minEnclosingCircle(contour)
    triangle, _ = cv2.minEnclosingTriangle(contour)
    return np.array((area / (w * h), area / hull, area / (math.pi * radius * radius), area / max(triangle, 1e-6)))


def _pixel_area(contour: np.ndarray) -> float:
    """Pixels inside an outline traced through pixel centres (Pick's theorem)."""
    return cv2.contourArea(contour) + cv2.arcLength(contour, True) / 2 + 1


def _template(shape: str, r: int) -> np.ndarray:
    """A shape of radius `r` as the world's vocabulary defines it, as a 0/1 float map."""
    c = r + 3
    canvas = np.zeros((2 * c + 1, 2 * c + 1), np.uint8)
    if shape == "circle":
        yy, xx = np.mgrid[: 2 * c + 1, : 2 * c + 1]
        canvas[(yy - c) ** 2 + (xx - c) ** 2 <= (r + 0.5) ** 2] = 1
    elif shape == "square":
        half = round(r * 0.85)
        cv2.rectangle(canvas, (c - half, c - half), (c + half, c + half), 1, -1)
    elif shape == "triangle":
        cv2.fillPoly(canvas, [np.array([(c, c - r), (c - r, c + round(r * 0.8)), (c + r, c + round(r * 0.8))])], 1)
    elif shape == "diamond":
        cv2.fillPoly(canvas, [np.array([(c, c - r), (c + r, c), (c, c + r), (c - r, c)])], 1)
    else:
        arm = max(1, round(r * 0.35))
        cv2.rectangle(canvas, (c - r, c - arm), (c + r, c + arm), 1, -1)
        cv2.rectangle(canvas, (c - arm, c - r), (c + arm, c + r), 1, -1)
    return canvas.astype(np.float32)


def _outlines(membership: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Outlines where membership > 1/2, traced at an upsampling factor that brings objects to `_WORK_RADIUS`."""
    radius = math.sqrt(max(float((membership > 0.5).sum()), 1.0) / math.pi)
    factor = int(np.clip(math.ceil(_WORK_RADIUS / radius), 1, 4))
    if factor > 1:
        membership = cv2.resize(membership, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    size = int(_OPENING * radius * factor) + 1
    mask = cv2.morphologyEx((membership > 0.5).astype(np.uint8), cv2.MORPH_OPEN,
                            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c for c in contours if _pixel_area(c) >= _MIN_AREA * factor * factor], factor


def _template_bank() -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of every shape at the radii the world draws, and shrunk as a zoom-out shrinks them."""
    descriptors, kinds = [], []
    for index, shape in enumerate(SHAPES):
        drawn = [_template(shape, r) for r in range(3, 18)]
        drawn += [cv2.resize(_template(shape, r), None, fx=z, fy=z, interpolation=cv2.INTER_CUBIC)
                  for r in (6, 7, 8) for z in (0.5, 0.6, 0.75)]
        for membership in drawn:
            descriptors.append(_descriptor(max(_outlines(membership)[0], key=cv2.contourArea)))
            kinds.append(index)
    return np.array(descriptors), np.array(kinds)


_BANK, _BANK_SHAPE = _template_bank()


@dataclass(frozen=True)
class _Fit:
    """An outline and the shape whose templates it is nearest to, at descriptor distance `distance`."""

    contour: np.ndarray
    shape: int
    distance: float


def _fit(contour: np.ndarray) -> _Fit:
    distances = np.linalg.norm(_BANK - _descriptor(contour), axis=1)
    nearest = int(np.argmin(distances))
    return _Fit(contour, int(_BANK_SHAPE[nearest]), float(distances[nearest]))


def _split(fit: _Fit, shape: tuple[int, int]) -> list[_Fit]:
    """Touching objects: the first distance-transform level with two cores splits the outline between them."""
    mask = np.zeros(shape, np.uint8)
    cv2.drawContours(mask, [fit.contour], -1, 1, -1)
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    deepest = float(depth.max())
    for level in np.arange(1.0, 0.8 * deepest, max(0.5, 0.8 * deepest / _SPLIT_LEVELS)):
        cores, _ = cv2.findContours((depth > level).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if len(cores) >= 2:
            seeds = np.ones_like(mask)
            cv2.drawContours(seeds, cores, -1, 0, -1)
            _, owner = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
            parts = []
            for core in cores:
                x, y = core[0, 0]
                part = (mask & (owner == owner[y, x])).astype(np.uint8)
                outlines, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                parts.append(_fit(max(outlines, key=cv2.contourArea)))
            return parts if max(p.distance for p in parts) < fit.distance else [fit]
    return [fit]


@dataclass(frozen=True)
class _Region:
    """A connected region of one palette colour in the labelled image."""

    colour: int
    contour: np.ndarray


def _regions(labels: np.ndarray) -> tuple[list[_Region], np.ndarray]:
    """Regions of each palette colour (closed over one-pixel gaps), largest first, and a map of who claims a pixel."""
    claimed = np.zeros(labels.shape, np.int32)
    regions = []
    for colour in range(len(_NAMES)):
        mask = (labels == colour).astype(np.uint8)
        if not mask.any():
            continue
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for contour in contours:
            if _pixel_area(contour) >= _MIN_AREA:
                cv2.drawContours(claimed, [contour], -1, colour + 1, -1)
                regions.append(_Region(colour, contour))
    return sorted(regions, key=lambda r: -cv2.contourArea(r.contour)), claimed


@dataclass(frozen=True)
class _Scene:
    """The labelled image that every region is read against."""

    rgb: np.ndarray
    labels: np.ndarray
    claimed: np.ndarray
    background: np.ndarray


def _membership(scene: _Scene, region: _Region, box: tuple[int, int, int, int], mask: np.ndarray) -> np.ndarray:
    """Per pixel of `box`, where its colour lies between the local background (0) and the region's colour (1)."""
    x0, y0, x1, y1 = box
    crop = scene.rgb[y0:y1, x0:x1]
    colour = np.median(crop[mask > 0], axis=0)
    grey = scene.labels[y0:y1, x0:x1] == _NEUTRAL
    background = np.median(crop[grey], axis=0) if grey.sum() >= 8 else scene.background
    axis = colour - background
    membership = (crop - background) @ axis / max(float(axis @ axis), 1.0)
    claimed = scene.claimed[y0:y1, x0:x1]
    membership[(claimed > 0) & (claimed != region.colour + 1)] = 0
    return membership.astype(np.float32)


def _object(fit: _Fit, factor: float, origin: tuple[int, int], colour: str) -> SceneObject:
    """The object an outline shows, in image pixels (`factor` outline pixels per image pixel, `origin` the outline's
    offset): a triangle's centre sits a third of the way from its box centre to its centroid."""
    moments = cv2.moments(fit.contour)
    cx, cy = moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]
    x, y, w, h = cv2.boundingRect(fit.contour)
    shape = SHAPES[fit.shape]
    if shape == "triangle":
        mx, my = x + (w - 1) / 2, y + (h - 1) / 2
        cx, cy = mx + (cx - mx) / 3, my + (cy - my) / 3
    radius = (max(w, h) / factor - 1) / 2 / (0.85 if shape == "square" else 1.0)
    return SceneObject(shape=shape, color=colour, x=round(origin[0] + (cx + 0.5) / factor - 0.5),
                       y=round(origin[1] + (cy + 0.5) / factor - 0.5), size=max(2, round(radius)))


def _read_region(scene: _Scene, region: _Region, taken: np.ndarray, scale: float) -> list[SceneObject]:
    """The objects in one colour region; marks their pixels in `taken` so that a fragment is not read twice."""
    height, width = scene.labels.shape
    x, y, w, h = cv2.boundingRect(region.contour)
    box = (max(0, x - 3), max(0, y - 3), min(width, x + w + 3), min(height, y + h + 3))
    x0, y0, x1, y1 = box
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.drawContours(mask, [region.contour], -1, 1, -1, offset=(-x0, -y0))
    mask &= (scene.labels[y0:y1, x0:x1] == region.colour).astype(np.uint8)
    if mask.sum() < _MIN_AREA or (mask & taken[y0:y1, x0:x1]).sum() * 2 > mask.sum():
        return []
    if cv2.distanceTransform(mask, cv2.DIST_L2, 3).max() < _MIN_INNER:
        return []
    membership = _membership(scene, region, box, mask)
    colour = _nearest_colour(np.median(scene.rgb[y0:y1, x0:x1][mask > 0], axis=0))
    outlines, factor = _outlines(membership)
    found = []
    for outline in outlines:
        fit = _fit(outline)
        parts = _split(fit, (mask.shape[0] * factor, mask.shape[1] * factor)) if fit.distance > _SPLIT_ABOVE else [fit]
        for part in parts:
            filled = np.zeros((mask.shape[0] * factor, mask.shape[1] * factor), np.uint8)
            cv2.drawContours(filled, [part.contour], -1, 1, -1)
            native = cv2.resize(filled, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_NEAREST)
            if (native & mask).sum() < _OVERLAP * native.sum():
                continue
            if part.distance > _AMBIGUOUS_ABOVE:
                raise NotPerceived("ambiguous", f"a {colour} region matches no shape")
            taken[y0:y1, x0:x1] |= native
            found.append(_object(part, factor * scale, ((x0 + 0.5) / scale - 0.5, (y0 + 0.5) / scale - 0.5), colour))
    return found


def read_objects(image: Image.Image) -> list[SceneObject]:
    """The shapes in the image (shape, colour name, centre x/y, radius `size`), sorted by (y, x).

    Raises NotPerceived("no_content") when none, NotPerceived("ambiguous") when a region cannot be classified
    confidently.
    """
    rgb, scale = _pixels(image)
    blur = _BLUR_PER_NOISE * _noise(rgb)
    labels = _labels(cv2.GaussianBlur(rgb, (0, 0), min(1.0, blur)) if blur > 0.3 else rgb)
    grey = labels == _NEUTRAL
    background = np.median(rgb[grey], axis=0) if grey.any() else np.full(3, 255.0, np.float32)
    regions, claimed = _regions(labels)
    if len(regions) > _MAX_REGIONS:
        raise NotPerceived("ambiguous", f"{len(regions)} colour regions: clutter, not shapes")
    scene = _Scene(rgb, labels, claimed, background)
    taken = np.zeros(labels.shape, np.uint8)
    objects = [obj for region in regions for obj in _read_region(scene, region, taken, scale)]
    if not objects:
        raise NotPerceived("no_content", "no coloured shape in the image")
    return sorted(objects, key=lambda obj: (obj.y, obj.x))


# ---------------------------------------------------------------------------------------------- charts


@dataclass(frozen=True)
class _Line:
    """A long dark horizontal line: its row and its first and last column."""

    row: float
    start: int
    end: int


@dataclass(frozen=True)
class _Frame:
    """An upright chart image with the approximate corner of its axes and the baseline's length."""

    image: np.ndarray
    left: float
    bottom: float
    length: float


def _chart_labels(rgb: np.ndarray) -> np.ndarray:
    """Palette labels after a 3x3 median, which keeps bars and wipes one-pixel lines (charts have no ink)."""
    return _labels(cv2.medianBlur(np.clip(rgb, 0, 255).astype(np.uint8), 3).astype(np.float32), _PALETTE)


def _ridge(grey: np.ndarray, paint: np.ndarray) -> np.ndarray:
    """Darkness of each 3-row band against the lighter of the rows two above and below; a painted side is skipped."""
    padded = cv2.copyMakeBorder(grey, 2, 2, 0, 0, cv2.BORDER_REPLICATE)
    painted = cv2.copyMakeBorder(paint.astype(np.uint8), 2, 2, 0, 0, cv2.BORDER_REPLICATE).astype(bool)
    above, below = padded[:-4], padded[4:]
    above = np.where(painted[:-4], below, above)
    below = np.where(painted[4:], above, below)
    return 3 * np.minimum(above, below) - padded[1:-3] - padded[2:-2] - padded[3:-1]


def _lines(rgb: np.ndarray, paint: np.ndarray) -> list[_Line]:
    """Horizontal dark lines at least 0.3 of the image long: ridge filter, close small gaps, long opening."""
    side = min(rgb.shape[:2])
    smear = max(3, side // 16)
    grey = cv2.blur(rgb, (smear, 1)).mean(axis=2)
    mask = (_ridge(grey, paint) > _LINE_INK).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((1, smear + 2), np.uint8))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((1, max(8, round(0.3 * side))), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [_Line(y + (h - 1) / 2, x, x + w - 1) for x, y, w, h in map(cv2.boundingRect, contours)]


def _bar_runs(paint: np.ndarray, line: _Line, side: int) -> int:
    """Painted runs (bars) along the line, two to three pixels off it on `side` (-1 above, 1 below)."""
    rows = [r for r in (round(line.row) + side * 2, round(line.row) + side * 3) if 0 <= r < paint.shape[0]]
    if not rows:
        return 0
    strip = paint[rows, line.start: line.end + 1].any(axis=0).astype(np.int8)
    edges = np.diff(np.concatenate([[0], strip, [0]]))
    return int(((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)) >= 2).sum())


def _neutral_darkness(background: float, means: np.ndarray) -> np.ndarray:
    """Darkness minus twice the Lab chroma of mean colours: high for the grey axes, low for bars and their edges."""
    lab = _lab(means)
    return background - means.mean(axis=1) - 2.0 * np.hypot(lab[:, 1], lab[:, 2])


def _line_evidence(rgb: np.ndarray, background: float, line: _Line) -> float:
    """How dark and grey the line's row (or a neighbour) is on average."""
    rows = [r for r in range(round(line.row) - 1, round(line.row) + 2) if 0 <= r < rgb.shape[0]]
    means = rgb[rows, line.start: line.end + 1].mean(axis=1)
    return float(_neutral_darkness(background, means).max())


def _axis_at(rgb: np.ndarray, background: float, line: _Line, side: int, end: int) -> tuple[float, int]:
    """The darkest neutral column rising from near `end` of the line towards `side`: its evidence and column."""
    y = round(line.row)
    lo, hi = sorted((y + side * 3, y + side * int(0.9 * (line.end - line.start))))
    lo, hi = max(0, lo), min(rgb.shape[0], hi + 1)
    reach = max(3, min(rgb.shape[:2]) // 16) + 3
    columns = np.arange(max(0, end - reach), min(rgb.shape[1], end + reach + 1))
    if hi - lo < 3 or columns.size == 0:
        return -math.inf, end
    evidence = _neutral_darkness(background, rgb[lo:hi, columns].mean(axis=0))
    best = int(np.argmax(evidence))
    return float(evidence[best]), int(columns[best])


def _frames(rgb: np.ndarray) -> list[_Frame]:
    """Candidate charts, most bars first: a baseline with bars on one side and a value axis at one end, upright."""
    candidates = []
    upright_paint = _chart_labels(rgb) < len(_NAMES)
    background = float(np.median(rgb.mean(axis=2)[~upright_paint])) if (~upright_paint).any() else 255.0
    for transposed in (False, True):
        image = np.ascontiguousarray(rgb.transpose(1, 0, 2)) if transposed else rgb
        paint = upright_paint.T if transposed else upright_paint
        for line in _lines(image, paint):
            line_evidence = _line_evidence(image, background, line)
            if line_evidence < _AXIS_EVIDENCE:
                continue
            for side in (-1, 1):
                runs = _bar_runs(paint, line, side)
                if runs == 0:
                    continue
                for end in (line.start, line.end):
                    evidence, column = _axis_at(image, background, line, side, end)
                    if evidence >= _AXIS_EVIDENCE:
                        candidates.append(((runs, min(evidence, line_evidence)), transposed, line, side, column))
    frames = []
    for _, transposed, line, side, column in sorted(candidates, key=lambda c: c[0], reverse=True)[:_CANDIDATE_FRAMES]:
        image = rgb.transpose(1, 0, 2) if transposed else rgb
        far = line.end if abs(column - line.start) < abs(column - line.end) else line.start
        left, bottom = float(column), line.row
        if side > 0:
            image, bottom = image[::-1], image.shape[0] - 1 - bottom
        if far < column:
            image, left = image[:, ::-1], image.shape[1] - 1 - left
        frames.append(_Frame(np.ascontiguousarray(image), left, bottom, float(abs(far - column))))
    return frames


@dataclass(frozen=True)
class _Plot:
    """The plot of an upright chart in pixels: value-axis column, baseline row, top of the value axis, right end."""

    left: float
    bottom: float
    top: float
    right: float


def _row_quantile(values: np.ndarray, valid: np.ndarray, q: float, least: int = 1) -> np.ndarray:
    """Per row, the q-quantile (0..1) of the valid values; NaN where fewer than `least` are valid."""
    count = valid.sum(axis=1)
    if values.shape[1] == 0:
        return np.full(len(values), np.nan)
    ordered = np.sort(np.where(valid, values, np.inf), axis=1)
    picked = ordered[np.arange(len(values)), np.clip(np.floor(q * (count - 1)).astype(int), 0, None)]
    return np.where(count >= least, picked, np.nan)


def _peak(profile: np.ndarray, centre: int, reach: int) -> float | None:
    """The sub-pixel position of the highest value within `reach` of `centre` (centroid of it and its neighbours)."""
    lo, hi = max(0, centre - reach), min(len(profile), centre + reach + 1)
    window = np.nan_to_num(profile[lo:hi], nan=-np.inf)
    if hi - lo < 3 or not np.isfinite(window).any():
        return None
    i = lo + int(np.argmax(window))
    a, b = max(0, i - 1), min(len(profile), i + 2)
    weights = np.clip(np.nan_to_num(profile[a:b]), 0, None)
    return float((np.arange(a, b) * weights).sum() / weights.sum()) if weights.sum() > 0 else float(i)


def _sample(image: np.ndarray, column: float) -> np.ndarray:
    """A column of `image` at a fractional position, interpolated linearly."""
    i = min(int(column), image.shape[1] - 1)
    w = column - i
    return image[:, i] * (1 - w) + image[:, min(image.shape[1] - 1, i + 1)] * w


def _plot(frame: _Frame, dark: np.ndarray, paint: np.ndarray) -> _Plot | None:
    """Baseline and value axis to a fraction of a pixel (median profiles of unpainted pixels); the axis top where
    the darkness along it best splits into line below and nothing above."""
    height, width = dark.shape
    x0, y0, length = round(frame.left), round(frame.bottom), int(frame.length)
    columns = slice(min(width - 1, x0 + 3), max(min(width, x0 + length - 2), min(width - 1, x0 + 3) + 1))
    rows = slice(max(0, y0 - length + 3), max(1, y0 - 2))
    bottom = _peak(_row_quantile(dark[:, columns], ~paint[:, columns], 0.5), y0, 3)
    left = _peak(_row_quantile(dark[rows].T, ~paint[rows].T, 0.5), x0, 3)
    if bottom is None or left is None:
        return None
    along = _sample(dark, left)[: round(bottom)]
    level = float(np.median(along[rows]))
    if level <= 0:
        return None
    gain = np.cumsum((along - level / 2)[::-1])[::-1]
    t = int(np.argmax(gain))
    top = t - (float(np.clip(along[t - 1] / level, 0, 1)) if t > 0 else 0.0)
    right = min(width - 1.0, left + bottom - top)
    base = _sample(dark.T, bottom)[math.ceil(left) + 1: math.floor(right) + 1]
    axis = along[math.ceil(top): round(bottom)]
    if base.size < 8 or axis.size < 8 or not 0.5 <= np.median(base) / level <= 2:  # a plot of 8+ pixels
        return None
    if min((base > level / 2).mean(), (axis > level / 2).mean()) < _MIN_AXIS_COVER:
        return None
    return _Plot(left, bottom, top, right)


def _gridlines(dark: np.ndarray, paint: np.ndarray, plot: _Plot) -> tuple[int, float]:
    """How many gridlines (= max value) and how well: the evenly spaced comb from the baseline to the axis top that
    correlates best with each row's darkness (a low percentile across the row's unpainted pixels)."""
    columns = slice(round(plot.left) + 2, round(plot.right) + 1)
    profile = np.nan_to_num(_row_quantile(dark[:, columns], ~paint[:, columns], _GRIDLINE_QUANTILE / 100, 3))
    lo, hi = max(0, math.floor(plot.top) - 1), round(plot.bottom)
    window = profile[lo:hi]
    span = plot.bottom - plot.top
    best = (-1.0, 1)
    for count in range(1, max(2, int(span / 2.2)) + 1):
        positions = plot.bottom - np.arange(1, count + 1) * span / count - lo
        comb = np.zeros(len(window))
        floor = np.floor(positions).astype(int)
        for index, weight in ((floor, 1 - (positions - floor)), (floor + 1, positions - floor)):
            keep = (index >= 0) & (index < len(comb))
            np.add.at(comb, index[keep], weight[keep])
        if comb.std() > 0 and window.std() > 0:
            best = max(best, (float(np.corrcoef(window, comb)[0, 1]), count))
    return best[1], best[0]


def _bar_spans(labels: np.ndarray, plot: _Plot, unit: float) -> list[tuple[int, int, int]]:
    """(colour, first column, last column) of each bar: runs of one colour in a band over the baseline (a column
    takes its commonest palette colour when at least half of it is painted)."""
    rows = np.arange(max(0, round(plot.bottom - max(1.0, 0.75 * unit))), max(1, round(plot.bottom - 0.5)))
    columns = np.arange(round(plot.left) + 1, round(plot.right) + 1)
    if rows.size == 0 or columns.size == 0:
        return []
    band = labels[np.ix_(rows, columns)]
    counts = (band[..., None] == np.arange(len(_NAMES))).sum(axis=0)
    colour = np.where(counts.sum(axis=1) * 2 >= rows.size, counts.argmax(axis=1), -1)
    breaks = np.flatnonzero(np.diff(colour)) + 1
    spans = [(int(run[0]), int(columns[start]), int(columns[start + len(run) - 1]))
             for start, run in zip(np.concatenate([[0], breaks]), np.split(colour, breaks)) if run[0] >= 0]
    widest = max((last - first + 1 for _, first, last in spans), default=0)
    return [span for span in spans if span[2] - span[1] + 1 >= 0.5 * widest]


def _bar(rgb: np.ndarray, labels: np.ndarray, background: np.ndarray, span: tuple[int, int, int], plot: _Plot,
         unit: float, count: int) -> tuple[Bar, float]:
    """A bar's colour (median of its core) and value: its height to where its colour projection falls below 1/2;
    with the share of its core that carries its colour (a bar is a solid rectangle)."""
    label, first, last = span
    width = last - first + 1
    columns = slice(first + int(0.2 * width), last - int(0.2 * width) + 1)
    core = rgb[:, columns]
    base = round(plot.bottom)
    colour = np.median(core[max(0, base - max(1, round(0.7 * unit))): base].reshape(-1, 3), axis=0)
    axis = colour - background
    share = ((core - background) @ axis / max(float(axis @ axis), 1.0)).mean(axis=1)
    row = max(range(max(1, round(plot.bottom - unit)), base), key=lambda r: share[r])
    while row > 1 and share[row - 1] >= 0.5:
        row -= 1
    above, at = share[row - 1], share[row]
    edge = row - 1 + (0.5 - above) / max(at - above, 1e-6)
    value = round((plot.bottom - edge - 0.5) / unit)
    solid = float((labels[row + 1: base - 1, columns] == label).mean()) if base - 1 > row + 3 else 1.0
    return Bar(color=_nearest_colour(colour), value=int(min(count, max(0, value)))), solid


def _chart_shaped(frame: _Frame, plot: _Plot, spans: list[tuple[int, int, int]]) -> bool:
    """A bar chart's plot is square (the baseline as long as the value axis) and its bars stand evenly spaced along
    the baseline, one per slot."""
    width = plot.right - plot.left
    if not spans or len(spans) > 8 or abs(frame.length - width) > _SQUARE_TOLERANCE * width:
        return False
    slot = width / len(spans)
    centres = np.array([(first + last) / 2 for _, first, last in spans])
    expected = plot.left + (np.arange(len(spans)) + 0.5) * slot
    return bool(np.abs(centres - expected).max() <= _SLOT_TOLERANCE * slot)


def _read_frame(frame: _Frame) -> Chart | None:
    """The chart an upright frame shows, when its axes, gridlines and bars all hold together."""
    rgb = frame.image
    labels = _chart_labels(rgb)
    paint = labels < len(_NAMES)
    if paint.all() or not paint.any():
        return None
    background = np.median(rgb[~paint], axis=0)
    dark = float(background.mean()) - rgb.mean(axis=2)
    plot = _plot(frame, dark, paint)
    if plot is None or max(abs(plot.left - frame.left), abs(plot.bottom - frame.bottom)) > 2:
        return None
    count, fit = _gridlines(dark, paint, plot)
    unit = (plot.bottom - plot.top) / count
    spans = _bar_spans(labels, plot, unit)
    if fit < _MIN_GRID_FIT or not _chart_shaped(frame, plot, spans):
        return None
    bars, solidity = zip(*(_bar(rgb, labels, background, span, plot, unit, count) for span in spans))
    if len({bar.color for bar in bars}) != len(bars) or min(bar.value for bar in bars) < 1:
        return None
    return Chart(bars=list(bars), max_value=count) if min(solidity) >= _MIN_BAR_SOLIDITY else None


def read_chart(image: Image.Image) -> Chart | None:
    """The bar chart in the image (bars left to right with colour and integer value, max_value), or None when the
    image shows no bar chart."""
    frames = _frames(_pixels(image)[0])
    return next((chart for frame in frames if (chart := _read_frame(frame)) is not None), None)
