"""Verifiable GRPO rewards as plain callables with TRL's reward-function signature.

TRL calls each reward function with ``prompts``, ``completions`` and every dataset column as a
list (one entry per completion) and expects one float per completion. Completions are chat
messages (``[{"role": "assistant", "content": ...}]``) for conversational prompts, or strings.
Grading is `dpe.grading.grade`, the same the evaluator uses: a choice letter, a number within a
tolerance, yes/no, or exact text, with the answer expected in ``\\boxed{}``.

Example:
    >>> completions = [[{"role": "assistant", "content": "\\\\boxed{B}"}], [{"role": "assistant", "content": "B"}]]
    >>> accuracy_reward(completions, answer=["B", "B"], answer_type=["choice", "choice"],
    ...                 options=[["red", "blue"], ["red", "blue"]], tolerance=[0.0, 0.0])
    [1.0, 1.0]
    >>> format_reward(completions)
    [1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dpe.events import AnswerKey, AnswerType
from dpe.grading import boxed_contents, grade
from dpe.policy.prompts import completion_text


def accuracy_reward(
    completions: Sequence[str | list[dict[str, Any]]],
    answer: Sequence[str],
    answer_type: Sequence[AnswerType],
    options: Sequence[Sequence[str] | None] | None = None,
    tolerance: Sequence[float] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 for a correct answer by answer type, else 0.0 (`dpe.grading.grade`, one `AnswerKey` per row).

    Example:
        >>> accuracy_reward(["\\\\boxed{4.1}", "\\\\boxed{yes}"], answer=["4", "no"],
        ...                 answer_type=["number", "yes_no"], tolerance=[0.5, 0.0])
        [1.0, 0.0]
    """
    count = len(completions)
    options = options if options is not None else [None] * count
    tolerance = tolerance if tolerance is not None else [0.0] * count
    rows = zip(completions, answer, answer_type, options, tolerance, strict=True)
    return [
        grade(completion_text(completion),
              AnswerKey(answer=expected, answer_type=kind, options=opts, tolerance=float(tol or 0.0))).score
        for completion, expected, kind, opts, tol in rows
    ]


def format_reward(completions: Sequence[str | list[dict[str, Any]]], **kwargs: Any) -> list[float]:
    """1.0 when the completion puts a non-empty answer in ``\\boxed{}``, else 0.0.

    Example:
        >>> format_reward(["so \\\\boxed{3}", "\\\\boxed{}", "3"])
        [1.0, 0.0, 0.0]
    """
    return [1.0 if any(boxed_contents(completion_text(completion))) else 0.0 for completion in completions]


RewardFunc = Callable[..., list[float]]
"""TRL's reward-function signature: ``prompts``, ``completions`` and the dataset's columns in, one float per
completion out."""


Rewards = Mapping[RewardFunc, float]
"""What GRPO maximises: each reward function and its weight in the sum its advantages are computed from."""


def policy_rewards(accuracy_weight: float, format_weight: float) -> Rewards:
    """The policy's rewards: a verifiably correct answer, and the ``\\boxed{}`` format.

    Example:
        >>> {func.__name__: weight for func, weight in policy_rewards(0.9, 0.1).items()}
        {'accuracy_reward': 0.9, 'format_reward': 0.1}
    """
    return {accuracy_reward: accuracy_weight, format_reward: format_weight}
