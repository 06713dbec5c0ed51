"""Image editing tools as validated operations: crop, zoom, rotate, flip, occlude, recolour, overlay text, compose.

Each operation is a small pydantic model with bounded parameters (coordinates are fractions of the
image, sizes are capped), so an edit written by a language model or read from an event can never
ask for a gigantic canvas, a file or a font path. `apply_edits` applies a list in order and
returns a new RGB image; `ImageEditor` is the pluggable backend interface and `PillowEditor` the
default. The agent crew uses it to vary and harden samples, the auditor to make counterfactuals.

Example:
    >>> from PIL import Image
    >>> image = Image.new("RGB", (64, 48), "white")
    >>> ops = parse_edits([{"op": "rotate", "degrees": 90, "expand": True}, {"op": "zoom", "factor": 0.5}])
    >>> apply_edits(image, ops).size
    (48, 64)
    >>> try:
    ...     parse_edits([{"op": "load", "path": "/etc/passwd"}])
    ... except ValueError as exc:
    ...     print(type(exc).__name__)
    ValidationError
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Channel = Annotated[int, Field(ge=0, le=255)]
RGB = tuple[Channel, Channel, Channel]

MAX_SIDE = 2048
"""No edit produces an image wider or taller than this; larger results are scaled down."""


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Box(_Op):
    """A rectangle in fractions of the image: left, top, right, bottom."""

    left: Fraction = 0.0
    top: Fraction = 0.0
    right: Fraction = 1.0
    bottom: Fraction = 1.0

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box in pixels, at least one pixel wide and tall."""
        left, top = round(self.left * width), round(self.top * height)
        right = max(left + 1, round(self.right * width))
        bottom = max(top + 1, round(self.bottom * height))
        return left, top, min(right, width), min(bottom, height)

    @field_validator("right", "bottom")
    @classmethod
    def _ordered(cls, value: float, info: Any) -> float:
        start_name = "left" if info.field_name == "right" else "top"
        if value <= info.data.get(start_name, 0.0):
            raise ValueError(f"{info.field_name} must be greater than {start_name}")
        return value


class Crop(_Op):
    """Keep a region; with `keep_size` it is scaled back to the original size (a zoom on that region)."""

    op: Literal["crop"] = "crop"
    box: Box
    keep_size: bool = True


class Zoom(_Op):
    """Zoom around a centre: factor > 1 magnifies, factor < 1 shrinks the content onto a padded canvas."""

    op: Literal["zoom"] = "zoom"
    factor: float = Field(ge=0.25, le=4.0)
    center_x: Fraction = 0.5
    center_y: Fraction = 0.5
    fill: RGB = (255, 255, 255)


class Rotate(_Op):
    """Rotate counter-clockwise; multiples of 90 degrees are exact. `expand` grows the canvas to fit."""

    op: Literal["rotate"] = "rotate"
    degrees: float = Field(ge=-360.0, le=360.0)
    expand: bool = False
    fill: RGB = (255, 255, 255)


class Flip(_Op):
    """Mirror left-right (`horizontal`) or top-bottom (`vertical`)."""

    op: Literal["flip"] = "flip"
    axis: Literal["horizontal", "vertical"] = "horizontal"


class Occlude(_Op):
    """Paint a solid rectangle over a region."""

    op: Literal["occlude"] = "occlude"
    box: Box
    color: RGB = (128, 128, 128)


class Recolor(_Op):
    """Change colours: grayscale, invert, rotate hues by `degrees`, or swap the red and blue channels."""

    op: Literal["recolor"] = "recolor"
    mode: Literal["grayscale", "invert", "hue_shift", "swap_red_blue"]
    degrees: float = Field(default=180.0, ge=-360.0, le=360.0)


class OverlayText(_Op):
    """Draw a short text (printable ASCII) at a position given in fractions, with a height in fractions."""

    op: Literal["overlay_text"] = "overlay_text"
    text: str = Field(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")
    x: Fraction = 0.05
    y: Fraction = 0.05
    size: float = Field(default=0.2, ge=0.05, le=0.5)
    color: RGB = (0, 0, 0)


class Compose(_Op):
    """Put the image next to another one (`other` indexes the images handed to the editor).

    `place` says where the edited image goes: ``left`` puts it on the left, the other on the right.
    """

    op: Literal["compose"] = "compose"
    other: int = Field(default=0, ge=0, le=7)
    place: Literal["left", "right", "top", "bottom"] = "left"


EditOp = Annotated[Union[Crop, Zoom, Rotate, Flip, Occlude, Recolor, OverlayText, Compose], Field(discriminator="op")]
"""One editing operation, told apart by its ``op`` field."""

_EDITS = TypeAdapter(list[EditOp])


def parse_edits(raw: Any) -> list[EditOp]:
    """Validate a JSON-like list of operations (raises pydantic's `ValidationError`)."""
    return _EDITS.validate_python(raw)


def describe(ops: Sequence[EditOp]) -> list[str]:
    """Tool names of the operations, e.g. ``['pillow.rotate', 'pillow.compose']``."""
    return [f"pillow.{op.op}" for op in ops]


def placement(ops: Sequence[EditOp]) -> str | None:
    """Where the original content ended up after compose operations ('left', 'top'...), or None."""
    places = [op.place for op in ops if isinstance(op, Compose)]
    return places[-1] if len(places) == 1 else ("mixed" if places else None)


class ImageEditor(Protocol):
    """An editing backend: applies operations to an image, with other images for `Compose`."""

    name: str

    def apply(self, image: Image.Image, ops: Sequence[EditOp], others: Sequence[Image.Image] = ()) -> Image.Image: ...


class PillowEditor:
    """The default editing backend, on Pillow and numpy."""

    name = "pillow"

    def __init__(self, max_side: int = MAX_SIDE):
        self.max_side = max_side

    def apply(self, image: Image.Image, ops: Sequence[EditOp], others: Sequence[Image.Image] = ()) -> Image.Image:
        return apply_edits(image, ops, others, max_side=self.max_side)


def apply_edits(
    image: Image.Image, ops: Sequence[EditOp], others: Sequence[Image.Image] = (), *, max_side: int = MAX_SIDE
) -> Image.Image:
    """Apply `ops` in order to an RGB copy of `image`; raises IndexError when a compose has no such other image."""
    result = image.convert("RGB")
    for op in ops:
        result = _bounded(_APPLY[op.op](result, op, others), max_side)
    return result


def _bounded(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def _crop(image: Image.Image, op: Crop, others: Sequence[Image.Image]) -> Image.Image:
    region = image.crop(op.box.pixels(*image.size))
    return region.resize(image.size, Image.BICUBIC) if op.keep_size else region


def _zoom(image: Image.Image, op: Zoom, others: Sequence[Image.Image]) -> Image.Image:
    width, height = image.size
    if op.factor >= 1:
        half_w, half_h = width / op.factor / 2, height / op.factor / 2
        cx = min(max(op.center_x * width, half_w), width - half_w)
        cy = min(max(op.center_y * height, half_h), height - half_h)
        box = (round(cx - half_w), round(cy - half_h), round(cx + half_w), round(cy + half_h))
        return image.crop(box).resize(image.size, Image.BICUBIC)
    small = image.resize((max(1, round(width * op.factor)), max(1, round(height * op.factor))), Image.BICUBIC)
    canvas = Image.new("RGB", image.size, op.fill)
    left = round((width - small.width) * op.center_x)
    top = round((height - small.height) * op.center_y)
    canvas.paste(small, (left, top))
    return canvas


_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def _rotate(image: Image.Image, op: Rotate, others: Sequence[Image.Image]) -> Image.Image:
    degrees = op.degrees % 360
    if degrees == 0:
        return image.copy()
    if degrees in _TRANSPOSE and (op.expand or degrees == 180 or image.width == image.height):
        return image.transpose(_TRANSPOSE[int(degrees)])
    return image.rotate(degrees, resample=Image.BICUBIC, expand=op.expand, fillcolor=op.fill)


def _flip(image: Image.Image, op: Flip, others: Sequence[Image.Image]) -> Image.Image:
    return ImageOps.mirror(image) if op.axis == "horizontal" else ImageOps.flip(image)


def _occlude(image: Image.Image, op: Occlude, others: Sequence[Image.Image]) -> Image.Image:
    result = image.copy()
    left, top, right, bottom = op.box.pixels(*image.size)
    ImageDraw.Draw(result).rectangle((left, top, right - 1, bottom - 1), fill=op.color)
    return result


def _recolor(image: Image.Image, op: Recolor, others: Sequence[Image.Image]) -> Image.Image:
    if op.mode == "grayscale":
        return ImageOps.grayscale(image).convert("RGB")
    if op.mode == "invert":
        return ImageOps.invert(image)
    pixels = np.asarray(image)
    if op.mode == "swap_red_blue":
        return Image.fromarray(np.ascontiguousarray(pixels[..., ::-1]), "RGB")
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(op.degrees / 360 * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _overlay_text(image: Image.Image, op: OverlayText, others: Sequence[Image.Image]) -> Image.Image:
    result = image.copy()
    font = ImageFont.load_default(size=max(4, round(op.size * image.height)))
    ImageDraw.Draw(result).text((round(op.x * image.width), round(op.y * image.height)), op.text, fill=op.color,
                                font=font)
    return result


def _compose(image: Image.Image, op: Compose, others: Sequence[Image.Image]) -> Image.Image:
    if op.other >= len(others):
        raise IndexError(f"compose needs other image {op.other}, {len(others)} given")
    other = others[op.other].convert("RGB")
    horizontal = op.place in ("left", "right")
    if horizontal:
        other = other.resize((max(1, round(other.width * image.height / other.height)), image.height), Image.BICUBIC)
        canvas = Image.new("RGB", (image.width + other.width, image.height), (255, 255, 255))
    else:
        other = other.resize((image.width, max(1, round(other.height * image.width / other.width))), Image.BICUBIC)
        canvas = Image.new("RGB", (image.width, image.height + other.height), (255, 255, 255))
    first, second = (image, other) if op.place in ("left", "top") else (other, image)
    canvas.paste(first, (0, 0))
    canvas.paste(second, (first.width, 0) if horizontal else (0, first.height))
    return canvas


_APPLY = {
    "crop": _crop,
    "zoom": _zoom,
    "rotate": _rotate,
    "flip": _flip,
    "occlude": _occlude,
    "recolor": _recolor,
    "overlay_text": _overlay_text,
    "compose": _compose,
}
