"""The two pixel toolchains: shapes and charts read right from world images, and any image read in bounded time.

Ground truth (the scene) is used here only to score the toolchains, which see pixels alone. The floors sit a
little below what both measured on these seeds (every shape scene and all but one chart right over levels 1-5).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dpe.perception import NotPerceived
from dpe.perception.toolchain import MAX_SIDE, TOOLCHAINS, build_toolchains
from dpe.world import Scene, generate_scene, render_scene

SEEDS = range(20)
LEVELS = (1, 2, 3, 4, 5)
FLOOR = 0.95
"""Least share of world scenes per kind and level that a toolchain reads exactly."""
MAX_SECONDS = 15.0
"""Longest a toolchain may take over one image, however odd (before the bounds, a noise image took minutes)."""


def _content(scene: Scene) -> list[tuple]:
    if scene.kind == "chart":
        return sorted((bar.color, bar.value) for bar in scene.chart.bars)
    return sorted((obj.shape, obj.color) for obj in scene.objects)


@pytest.mark.parametrize("name", sorted(TOOLCHAINS))
@pytest.mark.parametrize("kind", ["shapes", "chart"])
def test_a_toolchain_reads_the_worlds_shapes_and_charts_at_every_level(name: str, kind: str) -> None:
    toolchain = TOOLCHAINS[name]
    for level in LEVELS:
        right = wrong = 0
        for seed in SEEDS:
            scene = generate_scene(kind, level, seed=seed)
            try:
                seen = toolchain.perceive(render_scene(scene))
            except NotPerceived:
                continue
            if seen.kind == kind and _content(seen) == _content(scene):
                right += 1
            else:
                wrong += 1
        assert right >= FLOOR * len(SEEDS) and wrong <= 1, (name, kind, level, right, wrong)


def _odd_images() -> list[Image.Image]:
    """Images no world draws: tiny, thin, flat, noise, gradients, and random rectangles, discs and lines."""
    rng = np.random.default_rng(0)
    images = [Image.new("RGB", (1, 1)), Image.new("RGB", (3, 50), "white"), Image.new("RGB", (64, 64), "black"),
              Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
              Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (40, 1))).convert("RGB")]
    for _ in range(12):
        width, height = (int(side) for side in rng.integers(10, 200, 2))
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 12))):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            box = [x0, y0, x0 + int(rng.integers(1, 60)), y0 + int(rng.integers(1, 60))]
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.rectangle, draw.ellipse, draw.line)[int(rng.integers(0, 3))](box, fill=colour)
        images.append(image)
    return images


@pytest.mark.parametrize("name", sorted(TOOLCHAINS))
def test_any_image_is_read_or_refused_with_a_reason_in_bounded_time(name: str) -> None:
    toolchain = build_toolchains()[name]  # a fresh cache: every image is really read
    for image in _odd_images():
        started = time.perf_counter()
        try:
            seen = toolchain.perceive(image)
        except NotPerceived as refused:
            assert refused.reason in {"no_content", "ambiguous", "unreadable"}
        else:
            assert max(seen.width, seen.height) <= MAX_SIDE
        assert time.perf_counter() - started < MAX_SECONDS, (name, image.size)


def test_a_large_photo_of_shapes_is_read_in_a_frame_of_at_most_max_side() -> None:
    image = Image.new("RGB", (1024, 768), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse([100, 300, 260, 460], fill=(220, 30, 30))
    draw.rectangle([700, 100, 860, 260], fill=(30, 90, 220))
    for name, toolchain in TOOLCHAINS.items():
        seen = toolchain.perceive(image)
        assert (seen.width, seen.height) == (256, 192), name
        assert sorted((obj.shape, obj.color) for obj in seen.objects) == [("circle", "red"), ("square", "blue")], name
        circle = next(obj for obj in seen.objects if obj.shape == "circle")
        assert (circle.x, circle.y) == pytest.approx((45, 95), abs=2), name
