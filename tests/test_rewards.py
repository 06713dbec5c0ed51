"""GRPO reward functions against hand-made completions, called the way TRL calls them."""

from __future__ import annotations

import pytest

from dpe.policy.prompts import completion_text
from trainer.rewards import accuracy_reward, format_reward


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


CASES = [
    # completion, expected answer, answer type, options, tolerance, accuracy reward, format reward
    ("\\boxed{B}", "B", "choice", ["red", "blue", "green"], 0.0, 1.0, 1.0),
    ("It is \\boxed{(b)}", "B", "choice", ["red", "blue", "green"], 0.0, 1.0, 1.0),
    ("\\boxed{blue}", "B", "choice", ["red", "blue", "green"], 0.0, 1.0, 1.0),
    ("\\boxed{C}", "B", "choice", ["red", "blue", "green"], 0.0, 0.0, 1.0),
    ("\\boxed{E}", "B", "choice", ["red", "blue", "green"], 0.0, 0.0, 1.0),
    ("B", "B", "choice", ["red", "blue", "green"], 0.0, 1.0, 0.0),
    ("\\boxed{7}", "7", "number", None, 0.0, 1.0, 1.0),
    ("\\boxed{7.4}", "7", "number", None, 0.5, 1.0, 1.0),
    ("\\boxed{7.6}", "7", "number", None, 0.5, 0.0, 1.0),
    ("\\boxed{1,000}", "1000", "number", None, 0.0, 1.0, 1.0),
    ("\\boxed{seven}", "7", "number", None, 0.0, 0.0, 1.0),
    ("\\boxed{yes}", "yes", "yes_no", None, 0.0, 1.0, 1.0),
    ("\\boxed{No.}", "no", "yes_no", None, 0.0, 1.0, 1.0),
    ("\\boxed{no}", "yes", "yes_no", None, 0.0, 0.0, 1.0),
    ("\\boxed{Hello, World}", "hello world", "text", None, 0.0, 1.0, 1.0),
    ("\\boxed{hello}", "hello world", "text", None, 0.0, 0.0, 1.0),
    ("\\boxed{}", "3", "number", None, 0.0, 0.0, 0.0),
    ("", "3", "number", None, 0.0, 0.0, 0.0),
    ("first \\boxed{2} then \\boxed{3}", "3", "number", None, 0.0, 1.0, 1.0),
]


@pytest.mark.parametrize(("text", "answer", "kind", "options", "tolerance", "accuracy", "fmt"), CASES)
def test_hand_made_cases(text, answer, kind, options, tolerance, accuracy, fmt):
    for completion in (text, chat(text)):
        assert accuracy_reward([completion], answer=[answer], answer_type=[kind], options=[options],
                               tolerance=[tolerance]) == [accuracy]
        assert format_reward([completion]) == [fmt]


def test_called_like_trl_with_every_column_and_extra_keywords():
    completions = [chat("\\boxed{A}"), chat("\\boxed{B}"), chat("\\boxed{3}"), chat("no box")]
    columns = {
        "answer": ["A", "A", "3", "yes"],
        "answer_type": ["choice", "choice", "number", "yes_no"],
        "options": [["x", "y"], ["x", "y"], None, None],
        "tolerance": [0.0, 0.0, 0.0, 0.0],
        "weight": [1.0] * 4,
        "image": [None] * 4,
    }
    extras = {"prompts": [[{"role": "user", "content": "q"}]] * 4, "completion_ids": [[1]] * 4,
              "trainer_state": object(), "log_extra": print, "log_metric": print}
    assert accuracy_reward(completions=completions, **columns, **extras) == [1.0, 0.0, 1.0, 0.0]
    assert format_reward(completions=completions, **columns, **extras) == [1.0, 1.0, 1.0, 0.0]


def test_weighted_sum_is_the_paper_reward():
    completions = [chat("\\boxed{3}"), chat("3"), chat("\\boxed{4}"), chat("4")]
    columns = {"answer": ["3"] * 4, "answer_type": ["number"] * 4}
    rewards = zip(accuracy_reward(completions, **columns), format_reward(completions), strict=True)
    total = [0.9 * accuracy + 0.1 * fmt for accuracy, fmt in rewards]
    assert total == pytest.approx([1.0, 0.9, 0.1, 0.0])


def test_completion_text_of_multimodal_content_parts():
    parts = [{"type": "text", "text": "\\boxed{"}, {"type": "text", "text": "2}"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "\\boxed{2}"
    assert format_reward([[{"role": "assistant", "content": parts}]]) == [1.0]
