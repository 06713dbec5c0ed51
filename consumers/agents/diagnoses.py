"""The diagnoses the agents follow: each policy version's `Diagnosis`, and the one a plan is filled with.

A quota plan is made from the evidence of one policy version (`QuotaPlan.policy_version`); the evaluator
publishes that version's diagnosis right after its outcomes, before the plan can be made. The plan is filled
with that diagnosis, or with the newest one before it while it is not out (a `dpe eval` re-run, a diagnosis
lost with a killed evaluator). A version evaluated twice keeps its newest diagnosis.

Example:
    >>> from dpe.events import CapabilityDiagnosis, Diagnosis
    >>> brief = CapabilityDiagnosis(graded=4, wrong=1, error_mix={"other": 1.0}, failures=[], analysis="1 of 4")
    >>> book = Diagnoses()
    >>> book.add([Diagnosis(policy_version=2, capabilities={"color": brief})])
    >>> list(book.for_version(3)), book.for_version(1), book.newest
    (['color'], {}, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dpe.events import CapabilityDiagnosis, Diagnosis

KEEP_VERSIONS = 16
"""Diagnoses kept (the newest versions): plans are made from recent versions only."""


class Diagnoses:
    """The newest `KEEP_VERSIONS` diagnoses by policy version."""

    def __init__(self) -> None:
        self._by_version: dict[int, Diagnosis] = {}

    @property
    def newest(self) -> int | None:
        """The newest policy version with a diagnosis (None before any)."""
        return max(self._by_version, default=None)

    def add(self, diagnoses: Sequence[Diagnosis]) -> None:
        """Keep these diagnoses (in topic order: a later one for the same version replaces the earlier)."""
        for diagnosis in diagnoses:
            self._by_version[diagnosis.policy_version] = diagnosis
        for version in sorted(self._by_version)[:-KEEP_VERSIONS]:
            del self._by_version[version]

    def for_version(self, policy_version: int) -> Mapping[str, CapabilityDiagnosis]:
        """Per capability, the diagnosis of `policy_version`, else of the newest version before it (empty: none)."""
        known = [version for version in self._by_version if version <= policy_version]
        return self._by_version[max(known)].capabilities if known else {}
