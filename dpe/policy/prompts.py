"""The one way every component asks the policy a question: image, question, options, instruction.

The evaluator, the agents' difficulty filter, the SFT warm-up and the GRPO trainer all build their
prompts here, so the model always sees the same format and is graded on the same ``\\boxed{}``.

Example:
    >>> print(format_question("What colour is the square?", "choice", ["red", "blue", "green"]))
    What colour is the square?
    A. red
    B. blue
    C. green
    Answer with the option's letter in \\boxed{}.
    >>> build_messages("How many circles?", "number")[0]["content"][0]
    {'type': 'image'}
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from dpe.events import AnswerType

INSTRUCTIONS: dict[str, str] = {
    "choice": "Answer with the option's letter",
    "number": "Answer with a number",
    "yes_no": "Answer yes or no",
    "text": "Answer with the exact text",
}
"""What the model is told to answer, by answer type; every instruction ends "in \\boxed{}."."""


def format_question(question: str, answer_type: AnswerType, options: Sequence[str] | None = None) -> str:
    """The user text: the question, the lettered options if any, and the answer instruction."""
    if answer_type not in INSTRUCTIONS:
        raise ValueError(f"unknown answer type {answer_type!r}")
    if options is not None and len(options) > len(string.ascii_uppercase):
        raise ValueError(f"at most {len(string.ascii_uppercase)} options, got {len(options)}")
    lines = [question.strip()]
    lines += [f"{letter}. {option}" for letter, option in zip(string.ascii_uppercase, options or ())]
    lines.append(f"{INSTRUCTIONS[answer_type]} in \\boxed{{}}.")
    return "\n".join(lines)


def build_messages(
    question: str,
    answer_type: AnswerType,
    options: Sequence[str] | None = None,
    *,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """A chat conversation with one user turn: the image placeholder, then the formatted question."""
    user = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": format_question(question, answer_type, options)}],
    }
    return ([{"role": "system", "content": system}] if system else []) + [user]


def boxed(answer: str) -> str:
    """The answer as the model should write it.

    Example:
        >>> boxed("B")
        '\\\\boxed{B}'
    """
    return f"\\boxed{{{answer}}}"


def render_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text for generation (chat template with the assistant turn opened)."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of one completion: a string as is, or the content of its last chat message.

    Example:
        >>> completion_text([{"role": "assistant", "content": "hi"}]), completion_text("hi")
        ('hi', 'hi')
    """
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)
