r"""The agents' brief (`Diagnosis`): what one policy version's evaluation got wrong, per capability.

Made from the outcomes of the suites that steer the spiral; the held-out suite only measures the policy, so its
items never reach the agents. Per capability: the error-type mix of the wrong answers (an answer with no
attributed type counts as ``other``), up to `MAX_FAILURES` failed items in suite order (the diagnostic suites
are fresh random samples, so these are a fair sample of the failures), each with its image stored in the blob
store when a `store` is given, and a short analysis in words. The analysis is written from the numbers: it
stands in for the analyst model that the reference DPE pipeline runs, and says only what the numbers say.

Example:
    >>> from dpe.events import EvalOutcome
    >>> from producers.evaluator.items import EvalItem
    >>> item = EvalItem("synthetic", "i1", "counting", b"", "How many shapes are in the image?", "4", "number")
    >>> wrong = EvalOutcome(policy_version=2, suite="synthetic", item_id="i1", capability="counting",
    ...                     answer_type="number", expected="4", predicted="5", extracted="5", correct=False,
    ...                     score=0.0, error_type="visual_recognition")
    >>> brief = diagnose([item], [wrong], policy_version=2, heldout_suite="heldout")
    >>> brief.capabilities["counting"].error_mix
    {'visual_recognition': 1.0}
    >>> print(brief.capabilities["counting"].analysis.replace("; ", ";\n"))
    1 of 1 wrong (100%) on policy v2;
    errors: visual_recognition 100%;
    e.g. 'How many shapes are in the image?': expected '4', answered '5'
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence

from dpe.blobstore import BlobStore
from dpe.events import BlobRef, CapabilityDiagnosis, Diagnosis, EvalOutcome, FailedItem
from producers.evaluator.items import EvalItem

MAX_FAILURES = 8
"""Failed items per capability in a brief (the contract's bound)."""

_SHORT = 200
"""Characters of a question or answer quoted in the analysis."""


def diagnose(items: Sequence[EvalItem], outcomes: Sequence[EvalOutcome], *, policy_version: int, heldout_suite: str,
             store: BlobStore | None = None) -> Diagnosis:
    """The brief of `policy_version` from its graded `outcomes` (of `items`), the held-out suite left out."""
    by_id = {(item.suite, item.item_id): item for item in items}
    scored: dict[str, list[EvalOutcome]] = {}
    for outcome in {o.outcome_id: o for o in outcomes if o.suite != heldout_suite}.values():
        scored.setdefault(outcome.capability, []).append(outcome)
    return Diagnosis(producer="evaluator", policy_version=policy_version, capabilities={
        capability: _capability(group, by_id, policy_version, store) for capability, group in sorted(scored.items())})


def _capability(outcomes: list[EvalOutcome], items: dict[tuple[str, str], EvalItem], policy_version: int,
                store: BlobStore | None) -> CapabilityDiagnosis:
    wrong = [outcome for outcome in outcomes if not outcome.correct]
    types = Counter(outcome.error_type or "other" for outcome in wrong)
    failures = [_failed_item(outcome, items.get((outcome.suite, outcome.item_id)), store)
                for outcome in wrong[:MAX_FAILURES]]
    mix = {error_type: count / len(wrong) for error_type, count in types.most_common()}
    return CapabilityDiagnosis(graded=len(outcomes), wrong=len(wrong), error_mix=mix, failures=failures,
                               analysis=analysis(len(outcomes), len(wrong), mix, failures, policy_version))


def _failed_item(outcome: EvalOutcome, item: EvalItem | None, store: BlobStore | None) -> FailedItem:
    return FailedItem(item_id=outcome.item_id, suite=outcome.suite, image=_stored(item, store),
                      question=item.question[:2000] if item is not None else "", expected=outcome.expected,
                      given=(outcome.extracted if outcome.extracted is not None else outcome.predicted)[:2000],
                      error_type=outcome.error_type, reason=outcome.failure_reason)


def _stored(item: EvalItem | None, store: BlobStore | None) -> BlobRef | None:
    """The item's image put in the blob store (content-addressed: storing it again costs nothing)."""
    if item is None or store is None:
        return None
    if isinstance(item.image, bytes):
        return store.put_image(item.image)
    buffer = io.BytesIO()
    item.image.save(buffer, format="PNG")
    return store.put_image(buffer.getvalue())


def analysis(graded: int, wrong: int, mix: dict[str, float], failures: Sequence[FailedItem], policy_version: int
             ) -> str:
    """One or two sentences from the numbers: how many were wrong, the error types, one failure quoted.

    Example:
        >>> analysis(5, 0, {}, [], 3)
        '0 of 5 wrong (0%) on policy v3'
    """
    if not graded:
        return "nothing graded"
    text = f"{wrong} of {graded} wrong ({wrong / graded:.0%}) on policy v{policy_version}"
    if mix:
        text += "; errors: " + ", ".join(f"{error_type} {share:.0%}" for error_type, share in mix.items())
    if failures:
        first = failures[0]
        text += (f"; e.g. {first.question[:_SHORT]!r}: expected {first.expected[:_SHORT]!r}, "
                 f"answered {first.given[:_SHORT]!r}")
    return text[:1000]
