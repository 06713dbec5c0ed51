"""Rendering: a scene's metadata in, a PIL image out, as a pure function of the scene.

Example:
    >>> from dpe.world.scene import generate_scene
    >>> image = render_scene(generate_scene("shapes", 1, seed=5).to_metadata())
    >>> image.size, image.mode
    ((64, 64), 'RGB')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dpe.world.fonts import font
from dpe.world.palette import COLORS
from dpe.world.scene import Chart, Scene, SceneObject

_AXIS = (60, 60, 60)
_GRID = (210, 210, 210)


def render_scene(scene: Scene | Mapping[str, Any]) -> Image.Image:
    """Draw a scene (or its validated metadata): background, clutter, content, then seeded pixel noise."""
    scene = scene if isinstance(scene, Scene) else Scene.model_validate(scene)
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for stroke in scene.clutter:
        draw.line((stroke.x0, stroke.y0, stroke.x1, stroke.y1), fill=stroke.color, width=stroke.width)
    for obj in scene.objects:
        _draw_object(draw, obj)
    if scene.chart is not None:
        _draw_chart(draw, scene.chart, scene.width, scene.height)
    if scene.text is not None:
        block = scene.text
        draw.text((block.x, block.y), block.text, fill=block.color, font=font(block.font_size))
    return _add_noise(image, scene.noise, scene.seed)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x, y, r = obj.x, obj.y, obj.size
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        half = round(r * 0.85)
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + round(r * 0.8)), (x + r, y + round(r * 0.8))], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:
        arm = max(1, round(r * 0.35))
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)


def _draw_chart(draw: ImageDraw.ImageDraw, chart: Chart, width: int, height: int) -> None:
    margin = max(3, width // 16)
    left, right, top, bottom = margin, width - margin, margin, height - margin
    unit = (bottom - top) / chart.max_value
    for step in range(1, chart.max_value + 1):
        level = round(bottom - step * unit)
        draw.line((left, level, right, level), fill=_GRID, width=1)
    slot = (right - left) / len(chart.bars)
    for index, bar in enumerate(chart.bars):
        x0 = round(left + index * slot + slot * 0.15)
        x1 = round(left + (index + 1) * slot - slot * 0.15)
        draw.rectangle((x0, round(bottom - bar.value * unit), x1, bottom), fill=COLORS[bar.color])
    draw.line((left, top, left, bottom), fill=_AXIS, width=1)
    draw.line((left, bottom, right, bottom), fill=_AXIS, width=1)


def _add_noise(image: Image.Image, noise: float, seed: int) -> Image.Image:
    if noise <= 0:
        return image
    pixels = np.asarray(image, dtype=np.float32)
    jitter = np.random.default_rng(seed).normal(0.0, noise * 255.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + jitter, 0, 255).astype(np.uint8), "RGB")
