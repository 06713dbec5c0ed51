"""Failure attribution by rules: why a graded answer is wrong, as an error type and a reason.

The capability comes from the item; the error type from these rules, first match wins:

1. no answer could be extracted at all                        -> ``format``
2. the answer is not in ``\\boxed{}``                          -> ``format``
3. the boxed answer is not of the asked kind (a word where a number was asked, no yes/no, no
   option letter), or names an option that does not exist     -> ``misunderstanding``
4. a well-formed wrong answer: by the capability's skill (`producers.evaluator.settings.Skill`)
   - perception (counting, colour, existence, text reading)   -> ``visual_recognition``
   - calculation (arithmetic, chart reading)                  -> ``calculation``
   - reasoning (spatial relations)                            -> ``reasoning``
   A capability without a configured skill gets one from the answer type: a wrong choice is
   ``reasoning``, a wrong number ``calculation``, a wrong yes/no or text ``visual_recognition``.

Example:
    >>> from dpe.events import AnswerKey
    >>> from dpe.grading import grade
    >>> skills = {"counting": "perception"}
    >>> four, twelve = AnswerKey(answer="4", answer_type="number"), AnswerKey(answer="12", answer_type="number")
    >>> attribute_failure("counting", "number", "4", None, grade("\\\\boxed{5}", four), skills)
    Attribution(error_type='visual_recognition', reason='answered 5, expected 4 (off by 1)')
    >>> attribute_failure("arithmetic", "number", "12", None, grade("13", twelve), skills).error_type
    'format'
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dpe.events import AnswerType, ErrorType
from dpe.grading import Grade, parse_choice, parse_number
from producers.evaluator.settings import Skill

SKILL_ERRORS: dict[Skill, ErrorType] = {
    "perception": "visual_recognition",
    "calculation": "calculation",
    "reasoning": "reasoning",
}

ANSWER_TYPE_SKILLS: dict[AnswerType, Skill] = {
    "choice": "reasoning",
    "number": "calculation",
    "yes_no": "perception",
    "text": "perception",
}
"""The skill of a capability nobody configured, by answer type."""

_KIND_NAMES: dict[AnswerType, str] = {
    "choice": "an option letter",
    "number": "a number",
    "yes_no": "yes or no",
    "text": "text",
}


@dataclass(frozen=True)
class Attribution:
    """Why an answer failed: the error type and a one-line reason."""

    error_type: ErrorType
    reason: str


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _option(letter: str, options: Sequence[str] | None) -> str:
    position = string.ascii_uppercase.index(letter)
    return f"{letter} ({_clip(options[position], 40)})" if options and position < len(options) else letter


def _wrong_detail(answer_type: AnswerType, expected: str, extracted: str, options: Sequence[str] | None) -> str:
    if answer_type == "number":
        value, target = parse_number(extracted), parse_number(expected)
        if value is not None and target is not None:
            return f"answered {extracted}, expected {expected} (off by {abs(value - target):g})"
    if answer_type == "choice":
        letter = parse_choice(extracted, options)
        if letter is not None:
            return f"chose {_option(letter, options)}, expected {_option(expected, options)}"
    return f"answered {_clip(extracted)!r}, expected {_clip(expected)!r}"


def attribute_failure(
    capability: str,
    answer_type: AnswerType,
    expected: str,
    options: Sequence[str] | None,
    grade: Grade,
    skills: Mapping[str, Skill],
) -> Attribution | None:
    """The error type and reason of a failed grade by the rules above; None for a correct answer."""
    if grade.correct:
        return None
    if grade.extracted is None:
        return Attribution("format", "empty output: no answer to extract")
    if not grade.format_ok:
        return Attribution("format", f"no \\boxed{{}} answer (read {_clip(grade.extracted)!r} from the text)")
    if grade.reason == "invalid_option":
        count = len(options or ())
        return Attribution("misunderstanding", f"chose {_clip(grade.extracted)!r}, but there are only {count} options")
    if grade.reason != "wrong_answer":
        return Attribution(
            "misunderstanding", f"answered {_clip(grade.extracted)!r} where {_KIND_NAMES[answer_type]} was asked"
        )
    skill = skills.get(capability, ANSWER_TYPE_SKILLS[answer_type])
    return Attribution(SKILL_ERRORS[skill], _wrong_detail(answer_type, expected, grade.extracted, options))
