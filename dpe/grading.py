"""Answer extraction and grading by answer type, shared by the evaluator and the GRPO rewards.

The model is asked to answer in ``\\boxed{...}``. `extract_answer` takes the last boxed answer
(falling back to "answer: X" or the last line), and `grade` compares it with the expected answer
according to the answer type: a choice letter, a number within a tolerance, yes/no, or exact text
after normalisation. The expected answer, its type, the options and the tolerance travel together
as one `dpe.events.AnswerKey`.

Example:
    >>> grade("The bars show... \\\\boxed{(B)}", AnswerKey(answer="B", answer_type="choice",
    ...                                                   options=["red", "blue", "green"])).correct
    True
    >>> grade("\\\\boxed{1,000}", AnswerKey(answer="1000", answer_type="number")).correct
    True
    >>> grade("I think yes", AnswerKey(answer="yes", answer_type="yes_no")).format_ok
    False
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from dpe.events import AnswerKey

_BOXED = "\\boxed{"
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)\s*(.+)", re.IGNORECASE)
_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)]|\s|$)")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_YES = {"yes", "y", "true", "correct", "right"}
_NO = {"no", "n", "false", "incorrect", "wrong"}


@dataclass(frozen=True)
class Grade:
    """The verdict on one answer.

    `score` is 1.0 or 0.0; `format_ok` says the answer came in ``\\boxed{}``; `reason` names why
    an answer failed (None when correct).
    """

    correct: bool
    score: float
    extracted: str | None
    format_ok: bool
    reason: str | None = None


def boxed_contents(text: str) -> list[str]:
    """Every ``\\boxed{...}`` content in order, with nested braces kept.

    Example:
        >>> boxed_contents("\\\\boxed{a} then \\\\boxed{\\\\frac{1}{2}}")
        ['a', '\\\\frac{1}{2}']
    """
    found = []
    start = text.find(_BOXED)
    while start != -1:
        depth, cursor = 1, start + len(_BOXED)
        while cursor < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[cursor], 0)
            cursor += 1
        if depth == 0:
            found.append(text[start + len(_BOXED) : cursor - 1].strip())
        start = text.find(_BOXED, cursor if depth == 0 else start + len(_BOXED))
    return found


def extract_answer(text: str) -> str | None:
    """The answer in a model output: the last non-empty ``\\boxed{}``, else "answer is X", else the last line.

    Example:
        >>> extract_answer("first \\\\boxed{3}, no wait \\\\boxed{4}")
        '4'
        >>> extract_answer("The answer is: blue.")
        'blue.'
        >>> extract_answer("   ") is None
        True
    """
    boxed = [content for content in boxed_contents(text) if content]
    if boxed:
        return boxed[-1]
    matches = _ANSWER_IS.findall(text)
    if matches:
        return matches[-1].strip() or None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, single spaces, unicode compatibility form.

    Example:
        >>> normalize_text("  Hello,   World! ")
        'hello world'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if char in string.punctuation else char for char in text)
    return " ".join(text.split())


def parse_number(text: str) -> float | None:
    """A number in `text`: the whole text, or its only number; "1,000" is a thousand.

    Example:
        >>> parse_number("1,000.5"), parse_number("about 7 apples"), parse_number("3 or 4")
        (1000.5, 7.0, None)
    """
    cleaned = text.strip().strip("$").rstrip("%").replace(" ", "")
    if _NUMBER.fullmatch(cleaned):
        return float(cleaned.replace(",", ""))
    numbers = _NUMBER.findall(text)
    if len(numbers) != 1:
        return None
    return float(numbers[0].replace(",", ""))


def parse_yes_no(text: str) -> str | None:
    """'yes', 'no', or None for anything else.

    Example:
        >>> parse_yes_no("True."), parse_yes_no("No, it is not"), parse_yes_no("maybe")
        ('yes', 'no', None)
    """
    words = normalize_text(text).split()
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    return None


def parse_choice(text: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter meant by `text`: "B", "(b)", "B." or "B. blue", or an option's own text.

    Example:
        >>> parse_choice("(c)"), parse_choice("B. blue"), parse_choice("Blue", ["red", "blue"])
        ('C', 'B', 'B')
    """
    wanted = normalize_text(text)
    if options:
        for position, option in enumerate(options):
            if wanted == normalize_text(option):
                return string.ascii_uppercase[position]
    match = _LETTER.match(text.strip())
    if match is None:
        return None
    return match.group(1).upper()


def grade(predicted_text: str, key: AnswerKey) -> Grade:
    """Grade a model output against an answer key.

    Example:
        >>> grade("\\\\boxed{3.9}", AnswerKey(answer="4", answer_type="number", tolerance=0.5)).correct
        True
        >>> grade("\\\\boxed{E}", AnswerKey(answer="A", answer_type="choice", options=["x", "y", "z"])).reason
        'invalid_option'
        >>> grade("no box here", AnswerKey(answer="cat", answer_type="text")).reason
        'wrong_answer'
    """
    format_ok = any(boxed_contents(predicted_text))
    extracted = extract_answer(predicted_text)
    if extracted is None:
        return Grade(False, 0.0, None, format_ok, "no_answer")
    reason = _failure(extracted, key)
    return Grade(reason is None, 1.0 if reason is None else 0.0, extracted, format_ok, reason)


def _failure(extracted: str, key: AnswerKey) -> str | None:
    expected, answer_type, options = key.answer, key.answer_type, key.options
    if answer_type == "choice":
        letter = parse_choice(extracted, options)
        if letter is None:
            return "unparseable_choice"
        if options and string.ascii_uppercase.index(letter) >= len(options):
            return "invalid_option"
        return None if letter == parse_choice(expected, options) else "wrong_answer"
    if answer_type == "number":
        value, target = parse_number(extracted), parse_number(expected)
        if value is None:
            return "unparseable_number"
        if target is None:
            raise ValueError(f"expected answer {expected!r} is not a number")
        return None if math.isclose(value, target, abs_tol=key.tolerance + 1e-9) else "wrong_answer"
    if answer_type == "yes_no":
        value = parse_yes_no(extracted)
        if value is None:
            return "unparseable_yes_no"
        return None if value == parse_yes_no(expected) else "wrong_answer"
    if answer_type == "text":
        return None if normalize_text(extracted) == normalize_text(expected) else "wrong_answer"
    raise ValueError(f"unknown answer type {answer_type!r}")
