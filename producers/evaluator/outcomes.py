"""Evaluate a policy on items: batched greedy answers, grades, failure attribution, EvalOutcome events.

Every item gives one outcome, successes included, so that rates have denominators. Greedy decoding
on a fixed item list is deterministic, so re-evaluating a checkpoint reproduces the same outcomes
under the same `outcome_id`s (policy version / suite / item), which consumers overwrite.

Example:
    >>> from dpe.policy.config import TinyVLMConfig
    >>> from dpe.policy.model import build_tiny_policy
    >>> from producers.evaluator.settings import SyntheticSuites
    >>> from producers.evaluator.items import heldout_items
    >>> items = heldout_items(SyntheticSuites(heldout_items=2, capabilities=("color", "counting")))
    >>> from dpe.inference import LocalVersion
    >>> outcomes = evaluate_items(LocalVersion(build_tiny_policy(TinyVLMConfig(corpus_items=5)), 0), items)
    >>> [(o.outcome_id, o.correct, o.error_type) for o in outcomes]  # doctest: +NORMALIZE_WHITESPACE
    [('0/heldout/diagnostic/color/d1/797860', False, 'format'),
     ('0/heldout/diagnostic/counting/d1/703142', False, 'format')]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dpe.events import EvalOutcome
from dpe.grading import Grade, grade
from dpe.inference import PolicyVersion
from dpe.policy.generation import SamplingParams
from dpe.policy.prompts import build_messages
from producers.evaluator.items import EvalItem
from producers.evaluator.judge import Case, Judge
from producers.evaluator.rules import attribute_failure
from producers.evaluator.settings import DEFAULT_SKILLS, Skill

PRODUCER = "evaluator"
_MAX_PREDICTED = 20_000
_MAX_SHORT = 2000


def answer_items(
    policy: PolicyVersion, items: Sequence[EvalItem], *, max_new_tokens: int = 24, batch_size: int = 32
) -> list[str]:
    """The policy version's greedy answer to each item, `batch_size` prompts per generate call (loaded here, or
    asked of the policy server).

    Images are decoded one batch at a time, so a large benchmark never sits decoded in memory.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, batch_size=batch_size)
    outputs: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        conversations = [build_messages(item.question, item.answer_type, item.options) for item in batch]
        images = [item.load_image() for item in batch]
        outputs += [samples[0] for samples in policy.generate(images, conversations, params)]
    return outputs


def grade_item(item: EvalItem, output: str) -> Grade:
    """Grade one output against the item's answer (`dpe.grading.grade`)."""
    return grade(output, item.key)


def outcomes_for(
    items: Sequence[EvalItem],
    outputs: Sequence[str],
    *,
    policy_version: int,
    skills: Mapping[str, Skill] = DEFAULT_SKILLS,
    judge: Judge | None = None,
) -> list[EvalOutcome]:
    """One EvalOutcome per item: grade, extracted answer, and for failures the error type and reason."""
    grades = [grade_item(item, output) for item, output in zip(items, outputs, strict=True)]
    cases = {}
    for position, (item, output, verdict) in enumerate(zip(items, outputs, grades)):
        rules = attribute_failure(item.capability, item.answer_type, item.answer, item.options, verdict, skills)
        if rules is not None:
            cases[position] = Case(item, output, rules)
    judged = judge.attribute_all(list(cases.values())) if judge else [case.fallback for case in cases.values()]
    attributions = dict(zip(cases, judged))
    outcomes = []
    for position, (item, output, verdict) in enumerate(zip(items, outputs, grades)):
        attribution = attributions.get(position)
        outcomes.append(
            EvalOutcome(
                producer=PRODUCER,
                policy_version=policy_version,
                suite=item.suite,
                item_id=item.item_id,
                capability=item.capability,
                answer_type=item.answer_type,
                expected=item.answer,
                predicted=output[:_MAX_PREDICTED],
                extracted=verdict.extracted[:_MAX_SHORT] if verdict.extracted is not None else None,
                correct=verdict.correct,
                score=verdict.score,
                error_type=attribution.error_type if attribution else None,
                failure_reason=attribution.reason[:_MAX_SHORT] if attribution else None,
            )
        )
    return outcomes


def evaluate_items(
    policy: PolicyVersion,
    items: Sequence[EvalItem],
    *,
    skills: Mapping[str, Skill] = DEFAULT_SKILLS,
    judge: Judge | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[EvalOutcome]:
    """Answer, grade and attribute every item for `policy.version`: `answer_items` then `outcomes_for`."""
    outputs = answer_items(policy, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return outcomes_for(items, outputs, policy_version=policy.version, skills=skills, judge=judge)


@dataclass(frozen=True)
class AccuracyRow:
    """Accuracy of one policy version on one capability of one suite."""

    policy_version: int
    suite: str
    capability: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def accuracy_rows(outcomes: Sequence[EvalOutcome]) -> list[AccuracyRow]:
    """Per (policy version, suite, capability) accuracy, sorted; a repeated outcome_id counts once (the last).

    Example:
        >>> from dpe.events import EvalOutcome
        >>> o = EvalOutcome(policy_version=1, suite="s", item_id="a", capability="color", answer_type="text",
        ...                 expected="x", predicted="x", correct=True, score=1.0)
        >>> [(r.capability, r.correct, r.total) for r in accuracy_rows([o, o])]
        [('color', 1, 1)]
    """
    latest = {outcome.outcome_id: outcome for outcome in outcomes}
    counts: dict[tuple[int, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for outcome in latest.values():
        tally = counts[(outcome.policy_version, outcome.suite, outcome.capability)]
        tally[0] += outcome.correct
        tally[1] += 1
    return [AccuracyRow(version, suite, capability, correct, total)
            for (version, suite, capability), (correct, total) in sorted(counts.items())]
