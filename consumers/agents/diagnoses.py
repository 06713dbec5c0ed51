"""The diagnoses the agents follow: each policy version's `Diagnosis`, and the one a plan is filled with.

A quota plan is made from the evidence of one policy version (`QuotaPlan.policy_version`); the evaluator
publishes that version's diagnosis right after its outcomes, before the plan can be made. The plan is filled
with that diagnosis, or with the newest one before it while it is not out (a `dpe eval` re-run, a diagnosis
lost with a killed evaluator). A version evaluated twice keeps its newest diagnosis. The auditor's failure types of
the same version (`FailureTypes`) join each capability's brief: their counts, and their exemplars as failed items of
the ``audit`` suite.

Example:
    >>> from dpe.events import CapabilityDiagnosis, Diagnosis, FailureTypes
    >>> brief = CapabilityDiagnosis(graded=4, wrong=1, error_mix={"other": 1.0}, failures=[], analysis="1 of 4")
    >>> book = Diagnoses()
    >>> book.add([Diagnosis(policy_version=2, capabilities={"color": brief})])
    >>> list(book.for_version(3)), book.for_version(1), book.newest
    (['color'], {}, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from dpe.events import CapabilityDiagnosis, Diagnosis, FailureTypes

Versioned = TypeVar("Versioned", Diagnosis, FailureTypes)

MAX_FAILURES = 8
"""Failed items a brief holds (`CapabilityDiagnosis.failures`)."""
KEEP_VERSIONS = 16
"""Diagnoses kept (the newest versions): plans are made from recent versions only."""


class Diagnoses:
    """The newest `KEEP_VERSIONS` diagnoses by policy version, with the auditor's failure types of each version."""

    def __init__(self) -> None:
        self._by_version: dict[int, Diagnosis] = {}
        self._failure_types: dict[int, FailureTypes] = {}
        self._briefs: dict[int, Mapping[str, CapabilityDiagnosis]] = {}
        """`for_version`'s answers, merged once per version until a diagnosis or tally arrives (it runs per item)."""

    @property
    def newest(self) -> int | None:
        """The newest policy version with a diagnosis (None before any)."""
        return max(self._by_version, default=None)

    def add(self, diagnoses: Sequence[Diagnosis]) -> None:
        """Keep these diagnoses (in topic order: a later one for the same version replaces the earlier)."""
        _keep(self._by_version, diagnoses)
        self._briefs.clear()

    @property
    def newest_failure_types(self) -> int | None:
        """The newest policy version with a failure-type tally (None before any)."""
        return max(self._failure_types, default=None)

    def add_failure_types(self, tallies: Sequence[FailureTypes]) -> None:
        """Keep the auditor's failure-type tallies (the newest of each version replaces the earlier)."""
        _keep(self._failure_types, tallies)
        self._briefs.clear()

    def for_version(self, policy_version: int) -> Mapping[str, CapabilityDiagnosis]:
        """Per capability, the diagnosis of `policy_version`, else of the newest version before it (empty: none),
        with the failure types the auditor found on that version beside its error types (`with_failure_types`)."""
        known = [version for version in self._by_version if version <= policy_version]
        if not known:
            return {}
        version = max(known)
        if version not in self._briefs:
            briefs, tally = self._by_version[version].capabilities, self._failure_types.get(version)
            self._briefs[version] = briefs if tally is None else with_failure_types(briefs, tally)
        return self._briefs[version]


def _keep(by_version: dict[int, Versioned], events: Sequence[Versioned]) -> None:
    """Put `events` by policy version (a later one replaces an earlier), keeping the newest `KEEP_VERSIONS` versions."""
    for event in events:
        by_version[event.policy_version] = event
    for version in sorted(by_version)[:-KEEP_VERSIONS]:
        del by_version[version]


def with_failure_types(briefs: Mapping[str, CapabilityDiagnosis], tally: FailureTypes
                       ) -> dict[str, CapabilityDiagnosis]:
    """Each capability's brief with the auditor's failure types of it: their counts, and their exemplars after the
    evaluator's failed items where the brief has room (8 in all), so that whoever aims at the failures aims at both.

    Example:
        >>> from dpe.events import FailedItem, FailureType
        >>> brief = CapabilityDiagnosis(graded=4, wrong=0, error_mix={}, failures=[], analysis="none wrong")
        >>> found = FailedItem(item_id="i/cf/mirror", suite="audit", question="Is the red square left of the circle?",
        ...                    expected="no", given="yes", reason="spatial/any/mirror/ignores_edit")
        >>> tally = FailureTypes(policy_version=2, audited_probes=9, types={
        ...     "spatial/any/mirror/ignores_edit": FailureType(capability="spatial", count=3, exemplars=[found])})
        >>> merged = with_failure_types({"spatial": brief}, tally)["spatial"]
        >>> merged.failure_types, [item.suite for item in merged.failures]
        ({'spatial/any/mirror/ignores_edit': 3}, ['audit'])
    """
    merged = {}
    for capability, brief in briefs.items():
        found = {name: kind for name, kind in tally.types.items() if kind.capability == capability}
        exemplars = [item for kind in found.values() for item in kind.exemplars]
        merged[capability] = brief.model_copy(update={
            "failure_types": {name: kind.count for name, kind in found.items()},
            "failures": [*brief.failures, *exemplars][:MAX_FAILURES],
        })
    return merged
