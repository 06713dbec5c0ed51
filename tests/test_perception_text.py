"""The two text readers (RapidOCR and glyph matching) on world images, and formula parsing.

Ground truth (the scene's text) is used here only to score the readers, which see pixels alone.
Accuracy floors sit a little below what the readers measured on these seeds.
"""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from dpe.imaging import Recolor, apply_edits
from dpe.perception import NotPerceived
from dpe.perception.formulas import parse_formula
from dpe.perception.glyphs import GlyphText
from dpe.perception.ocr import RapidText
from dpe.world.render import render_scene
from dpe.world.scene import generate_scene

SEEDS = range(60)
LEVELS = (1, 2, 3, 4, 5)

FLOORS = {
    ("ocr", "text"): (0.95, 0.95, 0.9, 0.9, 0.8),
    ("ocr", "formula"): (0.95, 0.95, 0.95, 0.85, 0.6),
    ("glyphs", "text"): (0.95, 0.95, 0.95, 0.95, 0.85),
    ("glyphs", "formula"): (0.95, 0.95, 0.95, 0.95, 0.85),
}
"""Least share of exact readings per difficulty level, for each reader and kind of image."""

MAX_GLYPH_ERRORS = 2
"""Wrong (not abstained) glyph readings allowed over all levels of one kind: it should abstain instead."""


@pytest.fixture(scope="module")
def readers() -> dict[str, RapidText | GlyphText]:
    return {"ocr": RapidText(), "glyphs": GlyphText()}


@pytest.fixture(scope="module")
def world() -> dict[tuple[str, int], list[tuple[str, Image.Image]]]:
    """(kind, level) -> [(true text, image)] over SEEDS, at the default 64 pixels."""
    samples = {}
    for kind in ("text", "formula"):
        for level in LEVELS:
            scenes = [generate_scene(kind, level, seed) for seed in SEEDS]
            samples[kind, level] = [(scene.text.text, render_scene(scene)) for scene in scenes]
    return samples


def _reading(reader: RapidText | GlyphText, image: Image.Image) -> str | None:
    try:
        return reader.read(image)
    except NotPerceived:
        return None


@pytest.mark.parametrize("name, kind", sorted(FLOORS))
def test_accuracy_per_level(readers, world, name: str, kind: str) -> None:
    reader, errors = readers[name], 0
    for level, floor in zip(LEVELS, FLOORS[name, kind]):
        readings = [(truth, _reading(reader, image)) for truth, image in world[kind, level]]
        accuracy = sum(truth == got for truth, got in readings) / len(readings)
        assert accuracy >= floor, f"{name} on {kind} level {level}: {accuracy:.2f} < {floor}"
        errors += sum(got is not None and got != truth for truth, got in readings)
    if name == "glyphs":
        assert errors <= MAX_GLYPH_ERRORS


@pytest.mark.parametrize("name", ["ocr", "glyphs"])
def test_grayscale_and_large_images_read_the_same(readers, name: str) -> None:
    reader = readers[name]
    for kind, seed in [("text", 1), ("formula", 2), ("text", 3), ("formula", 4)]:
        scene = generate_scene(kind, 2, seed)
        gray = apply_edits(render_scene(scene), [Recolor(mode="grayscale")])
        assert reader.read(gray) == scene.text.text
        large = generate_scene(kind, 2, seed, image_size=128)
        assert reader.read(render_scene(large)) == large.text.text


@pytest.mark.parametrize("name", ["ocr", "glyphs"])
def test_images_without_text_are_not_read(readers, name: str) -> None:
    reader = readers[name]
    for image in [Image.new("RGB", (64, 64), (245, 245, 235)), Image.new("L", (64, 64), 255)]:
        with pytest.raises(NotPerceived) as caught:
            reader.read(image)
        assert caught.value.reason == "no_content"
    for kind in ("shapes", "chart"):
        for level in LEVELS:
            for seed in range(4):
                with pytest.raises(NotPerceived):
                    reader.read(render_scene(generate_scene(kind, level, seed)))


def test_rapid_text_loads_once_across_threads(readers) -> None:
    scene = generate_scene("formula", 1, 5)
    image, reader, results = render_scene(scene), RapidText(), []
    threads = [threading.Thread(target=lambda: results.append(reader.read(image))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [scene.text.text] * 4


@pytest.mark.parametrize(
    "reading, expression",
    [
        ("15x3-15=?", "15x3-15"),
        ("4+1", "4+1"),
        ("4+1=", "4+1"),
        (" 4 + 1 = ? ", "4+1"),
        ("12×3", "12x3"),
        ("12*3+4", "12x3+4"),
        ("１５＋３＝？", "15+3"),
        ("0+999", "0+999"),
        ("9-8-7-6", "9-8-7-6"),
    ],
)
def test_parse_formula_accepts_what_the_world_draws(reading: str, expression: str) -> None:
    assert parse_formula(reading).expression == expression


@pytest.mark.parametrize(
    "reading",
    ["", "=?", "cat", "4", "4+", "+4", "4++1", "4+1=7", "4+1?", "4+1=?=?", "1000+1", "007+1", "1+2+3+4+5",
     "4/2", "4^2", "4+1\x00", "٣+1", "4+1" + " " * 100, "9" * 5000, "4+(1)", "4.5+1", "-4+1"],
)
def test_parse_formula_refuses_anything_else(reading: str) -> None:
    with pytest.raises(NotPerceived) as caught:
        parse_formula(reading)
    assert caught.value.reason == "unreadable"


def test_a_read_formula_parses_to_the_drawn_one(readers) -> None:
    for seed in range(5):
        scene = generate_scene("formula", 4, seed)
        for reader in readers.values():
            assert parse_formula(reader.read(render_scene(scene))) == scene.formula
