"""Answer extraction and grading against hand-made cases, edge cases included."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dpe.events import AnswerKey
from dpe.grading import boxed_contents, extract_answer, grade, normalize_text, parse_choice, parse_number, parse_yes_no

OPTIONS = ["red", "blue", "green", "to the left"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{B}", "B"),
        ("first \\boxed{3} then \\boxed{4}", "4"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{ yes }", "yes"),
        ("\\boxed{} and \\boxed{7}", "7"),
        ("\\boxed{7} and an empty \\boxed{}", "7"),
        ("unclosed \\boxed{5", "unclosed \\boxed{5"),
        ("The answer is 12", "12"),
        ("Final answer: cat", "cat"),
        ("some reasoning\nB", "B"),
        ("", None),
        ("  \n ", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_boxed_contents_handles_nesting_and_garbage():
    assert boxed_contents("\\boxed{a{b}c} x \\boxed{d}") == ["a{b}c", "d"]
    assert boxed_contents("\\boxed{\\boxed{1}}") == ["\\boxed{1}"]
    assert boxed_contents("no box") == []


@pytest.mark.parametrize(
    ("predicted", "expected", "correct", "reason"),
    [
        ("\\boxed{B}", "B", True, None),
        ("\\boxed{(B)}", "B", True, None),
        ("\\boxed{B.}", "B", True, None),
        ("\\boxed{b}", "B", True, None),
        ("\\boxed{B. blue}", "B", True, None),
        ("\\boxed{blue}", "B", True, None),
        ("\\boxed{Blue!}", "B", True, None),
        ("\\boxed{to the left}", "D", True, None),
        ("\\boxed{A}", "B", False, "wrong_answer"),
        ("\\boxed{red}", "B", False, "wrong_answer"),
        ("\\boxed{F}", "B", False, "invalid_option"),
        ("\\boxed{purple}", "B", False, "unparseable_choice"),
        ("\\boxed{BC}", "B", False, "unparseable_choice"),
        ("", "B", False, "no_answer"),
    ],
)
def test_grade_choice(predicted, expected, correct, reason):
    result = grade(predicted, AnswerKey(answer=expected, answer_type="choice", options=OPTIONS))
    assert (result.correct, result.reason) == (correct, reason)
    assert result.score == (1.0 if correct else 0.0)


@pytest.mark.parametrize(
    ("predicted", "expected", "tolerance", "correct", "reason"),
    [
        ("\\boxed{4}", "4", 0.0, True, None),
        ("\\boxed{4.0}", "4", 0.0, True, None),
        ("\\boxed{1,000}", "1000", 0.0, True, None),
        ("\\boxed{-24}", "-24", 0.0, True, None),
        ("\\boxed{3.6}", "4", 0.5, True, None),
        ("\\boxed{3.4}", "4", 0.5, False, "wrong_answer"),
        ("\\boxed{4.5}", "4", 0.5, True, None),
        ("\\boxed{5 apples}", "5", 0.0, True, None),
        ("\\boxed{$12}", "12", 0.0, True, None),
        ("\\boxed{1e3}", "1000", 0.0, True, None),
        ("\\boxed{.5}", "0.5", 0.0, True, None),
        ("\\boxed{3 or 4}", "4", 0.0, False, "unparseable_number"),
        ("\\boxed{four}", "4", 0.0, False, "unparseable_number"),
        ("\\boxed{5}", "4", 0.0, False, "wrong_answer"),
        ("there are 4", "4", 0.0, True, None),
    ],
)
def test_grade_number(predicted, expected, tolerance, correct, reason):
    result = grade(predicted, AnswerKey(answer=expected, answer_type="number", tolerance=tolerance))
    assert (result.correct, result.reason) == (correct, reason)


@pytest.mark.parametrize(
    ("predicted", "expected", "correct", "reason"),
    [
        ("\\boxed{yes}", "yes", True, None),
        ("\\boxed{Yes.}", "yes", True, None),
        ("\\boxed{TRUE}", "yes", True, None),
        ("\\boxed{no, there is not}", "no", True, None),
        ("\\boxed{False}", "no", True, None),
        ("\\boxed{no}", "yes", False, "wrong_answer"),
        ("\\boxed{maybe}", "yes", False, "unparseable_yes_no"),
        ("\\boxed{nope}", "no", False, "unparseable_yes_no"),
    ],
)
def test_grade_yes_no(predicted, expected, correct, reason):
    result = grade(predicted, AnswerKey(answer=expected, answer_type="yes_no"))
    assert (result.correct, result.reason) == (correct, reason)


@pytest.mark.parametrize(
    ("predicted", "expected", "correct"),
    [
        ("\\boxed{cat}", "cat", True),
        ("\\boxed{CAT}", "cat", True),
        ("\\boxed{ the   cat. }", "the cat", True),
        ("\\boxed{cat!}", "cat", True),
        ("\\boxed{cats}", "cat", False),
        ("\\boxed{c a t}", "cat", False),
    ],
)
def test_grade_text(predicted, expected, correct):
    assert grade(predicted, AnswerKey(answer=expected, answer_type="text")).correct is correct


def test_format_flag_and_extracted_value():
    key = AnswerKey(answer="B", answer_type="choice", options=OPTIONS)
    boxed = grade("so \\boxed{B}", key)
    assert boxed.format_ok and boxed.extracted == "B"
    unboxed = grade("B", key)
    assert unboxed.correct and not unboxed.format_ok
    empty_box = grade("\\boxed{}", key)
    assert not empty_box.format_ok and not empty_box.correct


def test_helpers_on_edge_cases():
    assert normalize_text("Ｃａｔ") == "cat"
    assert parse_number("1,00") is None
    assert parse_number("-1,234.5") == -1234.5
    assert parse_yes_no("") is None
    assert parse_choice("(c)") == "C"
    assert parse_choice("a cat", None) == "A"
    assert parse_choice("cat", ["dog", "cat", "cow"]) == "B"


def test_bad_expected_answers_and_types_raise():
    with pytest.raises(ValueError):
        grade("\\boxed{3}", AnswerKey(answer="three", answer_type="number"))
    with pytest.raises(ValueError):
        AnswerKey(answer="3", answer_type="essay")


def test_answer_key_is_frozen_and_bounded_like_the_sample_body():
    key = AnswerKey(answer="B", answer_type="choice", options=["red", "blue"])
    assert key.options == ("red", "blue")
    with pytest.raises(ValidationError):
        key.answer = "A"
    with pytest.raises(ValidationError):
        AnswerKey(answer="4", answer_type="number", tolerance=-0.5)
    with pytest.raises(ValidationError):
        AnswerKey(answer="", answer_type="text")
