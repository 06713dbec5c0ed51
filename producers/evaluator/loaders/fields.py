"""Turning a benchmark row's fields into an `EvalItem`, shared by every file format.

Everything in a benchmark file is untrusted: ids must match the event id pattern, image paths are
confined to the benchmark file's folder (no absolute paths, no ``..``, no symlinks out), images
are validated in full before they are kept (`dpe.blobstore.validate_image`), answers must be
gradable for their answer type, and categories are mapped to known capabilities.

Example:
    >>> mapper = CapabilityMapper.build(["counting", "existence"], {"Coarse Perception": "existence"}, None)
    >>> mapper.map("coarse  perception"), mapper.map("counting")
    ('existence', 'counting')
    >>> mapper.map("astronomy")
    Traceback (most recent call last):
    ...
    producers.evaluator.loaders.report.RowError: unknown_capability: astronomy
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from dpe.blobstore import ImageLimits, ImageRejected, validate_image
from dpe.events import ID_PATTERN, AnswerType
from dpe.grading import parse_choice, parse_number, parse_yes_no
from producers.evaluator.items import EvalItem
from producers.evaluator.loaders.report import RowError, SkipReason

_ID = re.compile(ID_PATTERN)
_ANSWER_TYPES: tuple[str, ...] = get_args(AnswerType)
MAX_ANSWER_CHARS = 2000
"""Longest expected answer (the limit of `EvalOutcome.expected`)."""


def _key(category: str) -> str:
    return " ".join(category.lower().split())


@dataclass(frozen=True)
class CapabilityMapper:
    """Benchmark category -> capability: a known capability maps to itself, else the mapping, else the default."""

    known: frozenset[str]
    categories: Mapping[str, str]
    default: str | None

    @classmethod
    def build(cls, known: Iterable[str], categories: Mapping[str, str], default: str | None) -> "CapabilityMapper":
        return cls(frozenset(known), {_key(name): capability for name, capability in categories.items()}, default)

    def map(self, category: str | None) -> str:
        """The capability of `category`; raises RowError(unknown_capability) when there is none."""
        name = _key(category or "")
        if name in self.known:
            return name
        if name in self.categories:
            return self.categories[name]
        if self.default is not None:
            return self.default
        raise RowError("unknown_capability", name or "<empty>")


@dataclass(frozen=True)
class RowContext:
    """What every row of one file is read against."""

    suite: str
    folder: Path
    capabilities: CapabilityMapper
    limits: ImageLimits


def is_missing(value: Any) -> bool:
    """None, an empty string, 'nan' (how pandas writes a missing cell) or a float NaN."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null")


def text_field(row: Mapping[str, Any], name: str, reason: SkipReason) -> str:
    """A required text cell, stripped; raises RowError(`reason`) when missing."""
    value = row.get(name)
    if is_missing(value):
        raise RowError(reason, f"column {name!r} is missing or empty")
    return str(value).strip()


def item_id(value: Any) -> str:
    """A row id usable in events (numbers as written, e.g. 12 or '12')."""
    if is_missing(value):
        raise RowError("bad_id", "the row has no id")
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()
    if not _ID.match(text):
        raise RowError("bad_id", f"id {text[:60]!r} has characters outside {ID_PATTERN}")
    return text


def checked_image(data: bytes, limits: ImageLimits) -> bytes:
    """`data` if it is a complete, allowed image within the limits; else RowError saying why."""
    try:
        validate_image(data, limits)
    except ImageRejected as rejected:
        too_large = rejected.reason_code in ("too_many_bytes", "too_many_pixels")
        raise RowError("image_too_large" if too_large else "undecodable_image", str(rejected)) from None
    return data


def image_from_base64(value: Any, limits: ImageLimits) -> bytes:
    """Decode a base64 image cell and validate the image."""
    if is_missing(value):
        raise RowError("missing_image", "the image cell is empty")
    text = "".join(str(value).split())
    if len(text) * 3 // 4 > limits.max_bytes:
        raise RowError("image_too_large", f"base64 image of {len(text):,} characters is over the byte limit")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RowError("bad_base64", f"image is not valid base64 ({exc})") from None
    return checked_image(data, limits)


def resolve_inside(folder: Path, relative: Any) -> Path:
    """The file `relative` names inside `folder`; RowError when it is absolute, escapes, or is missing.

    Example:
        >>> resolve_inside(Path("/tmp"), "../etc/passwd")
        Traceback (most recent call last):
        ...
        producers.evaluator.loaders.report.RowError: image_outside_folder: '../etc/passwd' is outside the benchmark folder
    """
    if is_missing(relative) or not isinstance(relative, str) or "\x00" in relative:
        raise RowError("missing_image", "the row names no image file")
    root = folder.resolve()
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        raise RowError("image_outside_folder", f"{relative[:200]!r} is outside the benchmark folder")
    if not path.is_file():
        raise RowError("missing_image", f"no image file {relative[:200]!r} in the benchmark folder")
    return path


def image_from_path(folder: Path, relative: Any, limits: ImageLimits) -> bytes:
    """Read and validate an image file named relative to the benchmark folder."""
    path = resolve_inside(folder, relative)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise RowError("image_too_large", f"{relative!r} is {size:,} bytes, over {limits.max_bytes:,}")
    return checked_image(path.read_bytes(), limits)


def answer_type(value: Any) -> AnswerType:
    """A declared answer type, one of choice/number/yes_no/text."""
    text = "" if is_missing(value) else str(value).strip().lower()
    if text not in _ANSWER_TYPES:
        raise RowError("unknown_answer_type", f"answer type {text or '<empty>'!r} is not one of {_ANSWER_TYPES}")
    return text  # type: ignore[return-value]


def gradable_answer(answer: str, kind: AnswerType, options: Sequence[str] | None) -> str:
    """The answer in the form grading expects (a choice as its option letter); RowError if ungradable.

    Example:
        >>> gradable_answer("(b)", "choice", ["x", "y"]), gradable_answer("Y", "choice", ["x", "y"])
        ('B', 'B')
    """
    if len(answer) > MAX_ANSWER_CHARS:
        raise RowError("bad_answer", f"answer of {len(answer):,} characters is over {MAX_ANSWER_CHARS:,}")
    if kind == "choice":
        if not options:
            raise RowError("malformed_row", "a choice question needs options")
        letter = parse_choice(answer, options)
        if letter is None or string.ascii_uppercase.index(letter) >= len(options):
            raise RowError("unknown_answer_letter", f"answer {answer[:40]!r} is not one of the {len(options)} options")
        return letter
    if kind == "number" and parse_number(answer) is None:
        raise RowError("bad_answer", f"answer {answer[:40]!r} is not a number")
    if kind == "yes_no":
        value = parse_yes_no(answer)
        if value is None:
            raise RowError("bad_answer", f"answer {answer[:40]!r} is not yes or no")
        return value
    return answer


def build_item(
    context: RowContext,
    *,
    row_id: str,
    category: str | None,
    image: bytes,
    question: str,
    answer: str,
    kind: AnswerType,
    options: Sequence[str] | None = None,
    tolerance: float = 0.0,
) -> EvalItem:
    """An item of this file's suite, its answer checked and its capability mapped."""
    if not math.isfinite(tolerance) or tolerance < 0:
        raise RowError("malformed_row", f"tolerance {tolerance!r} must be a non-negative number")
    return EvalItem(
        suite=context.suite,
        item_id=row_id,
        capability=context.capabilities.map(category),
        image=image,
        question=question,
        answer=gradable_answer(answer, kind, options),
        answer_type=kind,
        options=tuple(options) if options else None,
        tolerance=tolerance,
    )
