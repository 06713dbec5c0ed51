"""The quality-control chain: explicit checks, cheapest first, each verdict with a reason code.

| check          | passes with | fails with                                                                  |
|----------------|-------------|-----------------------------------------------------------------------------|
| schema         | ok          | too_few_options, too_many_options, duplicate_options, bad_choice_letter,     |
|                |             | unexpected_options, answer_not_number, answer_not_yes_no, empty_answer,     |
|                |             | answer_too_long, answer_in_question                                          |
| near_duplicate | ok          | near_duplicate (same image, same question as an accepted sample)            |
| answerability  | ok          | unanswerable, validator_<failure> (e.g. validator_invalid_output)           |
| agreement      | ok          | disagree, answerer_<failure>                                                 |
| difficulty     | ok          | too_easy, too_hard, policy_unavailable                                       |

Every verdict is counted in ``dpe_qc_checks_total{check, reason}``; the chain stops at the first
failure. A check that raises is a failure with reason ``check_error``, never a crash.

Example:
    >>> from dpe.events import BlobRef
    >>> ref = BlobRef(sha256="0" * 64, media_type="image/png", size_bytes=1, width=1, height=1)
    >>> body = SampleBody(image=ref, question="Which?", answer="D", answer_type="choice", options=["a", "b", "c"])
    >>> schema_problem(body, min_options=3, max_options=8)
    ('bad_choice_letter', 'answer D is not one of the 3 option letters')
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from consumers.qc.dedup import DedupKey, NearDuplicateIndex
from consumers.qc.difficulty import PolicyPassRate, PolicyUnavailable, band_verdict
from consumers.qc.settings import DifficultySettings
from consumers.roles import AgentFailure, Answerer, AnswererQuestion, Draft, ItemContext, TaskPlan, Validator, run_role
from dpe.events import AgentStep, QCVerdict, SampleBody
from dpe.grading import grade, normalize_text, parse_number
from monitoring.metrics import QC_CHECKS

OK = "ok"
CHECK_ERROR = "check_error"
"""The reason of a check that raised."""


@dataclass
class Candidate:
    """A drafted sample under quality control; checks add their agents' steps and measurements."""

    ctx: ItemContext
    capability: str
    plan: TaskPlan
    image: Image.Image
    draft: Draft
    body: SampleBody
    steps: list[AgentStep] = field(default_factory=list)
    dedup_key: DedupKey | None = None
    policy_version: int | None = None
    pass_rate: float | None = None

    def key(self) -> DedupKey:
        """The near-duplicate key of the image and question (computed once)."""
        if self.dedup_key is None:
            self.dedup_key = DedupKey.of(self.image, self.body.question)
        return self.dedup_key


class Check(Protocol):
    """One quality-control check."""

    name: str

    async def __call__(self, candidate: Candidate) -> QCVerdict: ...


def _verdict(check: str, reason: str = OK, detail: str = "", score: float | None = None) -> QCVerdict:
    return QCVerdict(check=check, passed=reason == OK, reason_code=reason, detail=detail[:2000] or None, score=score)


def schema_problem(body: SampleBody, min_options: int, max_options: int) -> tuple[str, str] | None:
    """(reason code, detail) of the first format problem of a sample body, or None."""
    answer = body.answer.strip()
    if body.answer_type == "choice":
        options = body.options or []
        if len(options) < min_options:
            return "too_few_options", f"{len(options)} options, at least {min_options} needed"
        if len(options) > max_options:
            return "too_many_options", f"{len(options)} options, at most {max_options} allowed"
        normalised = [normalize_text(option) for option in options]
        if any(not text for text in normalised) or len(set(normalised)) != len(normalised):
            return "duplicate_options", "options must be distinct and non-empty"
        if len(answer) != 1 or answer not in string.ascii_uppercase[: len(options)]:
            return "bad_choice_letter", f"answer {answer[:20]} is not one of the {len(options)} option letters"
        return None
    if body.options:
        return "unexpected_options", f"a {body.answer_type} question has no options"
    if body.answer_type == "number":
        value = parse_number(answer)
        if value is None or not math.isfinite(value) or not math.isfinite(body.tolerance):
            return "answer_not_number", f"{answer[:50]!r} is not a number"
    elif body.answer_type == "yes_no":
        if answer.lower() not in ("yes", "no"):
            return "answer_not_yes_no", f"{answer[:50]!r} is not yes or no"
    else:
        text = normalize_text(answer)
        if not text:
            return "empty_answer", "the text answer is empty after normalisation"
        if len(answer) > 100:
            return "answer_too_long", f"a text answer of {len(answer)} characters"
        if f" {text} " in f" {normalize_text(body.question)} ":
            return "answer_in_question", "the question contains its own answer"
    return None


class SchemaCheck:
    """Format: option counts and letters, parseable numbers, yes/no, sane text answers."""

    name = "schema"

    def __init__(self, min_options: int = 3, max_options: int = 8):
        self.min_options = min_options
        self.max_options = max_options

    async def __call__(self, candidate: Candidate) -> QCVerdict:
        problem = schema_problem(candidate.body, self.min_options, self.max_options)
        return _verdict(self.name, *(problem or (OK, "")))


class NearDuplicateCheck:
    """Refuses a sample whose image and question nearly match an accepted sample's."""

    name = "near_duplicate"

    def __init__(self, index: NearDuplicateIndex):
        self.index = index

    async def __call__(self, candidate: Candidate) -> QCVerdict:
        twin = self.index.find(candidate.key())
        return _verdict(self.name, "near_duplicate", f"like accepted sample {twin}") if twin else _verdict(self.name)


class AnswerabilityCheck:
    """Asks the validator whether the question is answerable from the image."""

    name = "answerability"

    def __init__(self, validator: Validator):
        self.validator = validator

    async def __call__(self, candidate: Candidate) -> QCVerdict:
        backend = self.validator.backend
        call = self.validator.validate(candidate.ctx, candidate.plan, candidate.image, candidate.draft)
        try:
            verdict = await run_role("validator", backend, call)
        except AgentFailure as failure:
            candidate.steps.append(AgentStep(role="validator", backend=backend, detail=str(failure)[:2000]))
            return _verdict(self.name, f"validator_{failure.reason_code}", failure.detail)
        candidate.steps.append(AgentStep(role="validator", backend=backend, detail=verdict.reason or None))
        return _verdict(self.name, OK if verdict.answerable else "unanswerable", verdict.reason)


class AgreementCheck:
    """Asks an independent answerer (who never sees the written answer) and grades its answer against it."""

    name = "agreement"

    def __init__(self, answerer: Answerer):
        self.answerer = answerer

    async def __call__(self, candidate: Candidate) -> QCVerdict:
        body, backend = candidate.body, self.answerer.backend
        question = AnswererQuestion(body.question, body.answer_type, tuple(body.options) if body.options else None)
        try:
            text = await run_role("answerer", backend,
                                  self.answerer.answer(candidate.ctx, candidate.plan, candidate.image, question))
        except AgentFailure as failure:
            candidate.steps.append(AgentStep(role="answerer", backend=backend, detail=str(failure)[:2000]))
            return _verdict(self.name, f"answerer_{failure.reason_code}", failure.detail)
        result = grade(text, body.key)
        candidate.steps.append(AgentStep(role="answerer", backend=backend, detail=f"answered {text[:200]!r}"))
        if result.correct:
            return _verdict(self.name, OK, f"answerer said {result.extracted!r}")
        return _verdict(self.name, "disagree", f"answerer said {(result.extracted or '')[:200]!r} ({result.reason})")


BAND_VERDICTS = frozenset({"too_hard", "too_easy"})
"""The difficulty band's rejections: a verdict on how hard the item is for the current policy, not on the candidate's
wording, so the crew makes no further attempt at that capability on that item (another question about the same
image at the same level mostly lands the same way; on 2 cores, retrying them spent half the band's rollouts on
items that never reached it)."""


class DifficultyCheck:
    """Keeps samples the current policy solves between `min_correct` and `max_correct` times out of k."""

    name = "difficulty"

    def __init__(self, estimator: PolicyPassRate, settings: DifficultySettings):
        self.estimator = estimator
        self.settings = settings

    async def __call__(self, candidate: Candidate) -> QCVerdict:
        try:
            measured = await self.estimator.measure(candidate.image, candidate.body)
        except PolicyUnavailable as exc:
            return _verdict(self.name, "policy_unavailable", str(exc))
        correct, rollouts = measured.correct, measured.rollouts
        rate = correct / rollouts if rollouts else None
        candidate.policy_version, candidate.pass_rate = measured.version, rate
        early = " (verdict certain)" if rollouts < self.settings.samples else ""
        detail = f"policy v{measured.version} solved {correct}/{rollouts}{early}"
        return _verdict(self.name, band_verdict(correct, rollouts, self.settings), detail, rate)


class QCChain:
    """Runs checks in order until one fails; counts every verdict."""

    def __init__(self, checks: Sequence[Check]):
        self.checks = list(checks)
        for check in self.checks:  # the outcomes every check has, exported at 0 before its first candidate
            for reason in (OK, CHECK_ERROR):
                QC_CHECKS.labels(check.name, reason)

    async def run(self, candidate: Candidate) -> list[QCVerdict]:
        verdicts = []
        for check in self.checks:
            try:
                verdict = await check(candidate)
            except Exception as exc:  # noqa: BLE001 - a broken check rejects, it never crashes the crew
                verdict = _verdict(check.name, CHECK_ERROR, f"{type(exc).__name__}: {exc}")
            QC_CHECKS.labels(check.name, verdict.reason_code).inc()
            verdicts.append(verdict)
            if not verdict.passed:
                break
        return verdicts
