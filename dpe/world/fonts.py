"""The world's one font (Pillow's built-in scalable font, nothing to install) and text measuring.

Example:
    >>> measure_text("cat", 20)[0] > measure_text("cat", 10)[0]
    True
"""

from __future__ import annotations

from functools import lru_cache

from PIL import ImageFont


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's default font at `size` pixels."""
    return ImageFont.load_default(size=size)


def measure_text(text: str, font_size: int) -> tuple[int, int]:
    """Width and height in pixels of `text` drawn at `font_size` from the origin."""
    left, top, right, bottom = font(font_size).getbbox(text)
    return right, bottom
