"""Which capabilities the current policy can learn from, judged by the difficulty band's verdicts.

GRPO learns nothing from a sample its policy always or never solves (every rollout gets the same
reward, so no advantage). The band keeps only samples in between; a capability of which it keeps
almost none is out of reach of that policy: the worker stops spending rollouts on it, and its
ledger lets the plan's other capabilities fill its room (`QuotaLedger.set_out_of_reach`). Verdicts
count per policy version, so a new checkpoint starts every capability afresh.

Example:
    >>> reach = Reach(evidence=3, floor=0.5)
    >>> for kept in (False, False, False):
    ...     reach.record("arithmetic", version=1, kept=kept)
    >>> reach.record("color", version=1, kept=True)
    >>> sorted(reach.out_of_reach(1)), sorted(reach.out_of_reach(2))
    (['arithmetic'], [])
"""

from __future__ import annotations

from collections import Counter


class Reach:
    """Band verdicts per capability under the newest policy version seen; out of reach: at least `evidence`
    verdicts, of which under `floor` (a share) kept."""

    def __init__(self, evidence: int, floor: float):
        self.evidence = evidence
        self.floor = floor
        self.version: int | None = None
        self._judged: Counter[str] = Counter()
        self._kept: Counter[str] = Counter()

    def record(self, capability: str, version: int, kept: bool) -> None:
        """Count one band verdict on a `capability` sample measured by policy `version` (older versions' are
        ignored; a newer version starts afresh)."""
        if self.version is not None and version < self.version:
            return
        if version != self.version:
            self.version, self._judged, self._kept = version, Counter(), Counter()
        self._judged[capability] += 1
        self._kept[capability] += kept

    def out_of_reach(self, version: int) -> frozenset[str]:
        """The capabilities out of reach of policy `version` (none before its verdicts are in)."""
        if version != self.version:
            return frozenset()
        return frozenset(capability for capability, judged in self._judged.items()
                         if judged >= self.evidence and self._kept[capability] < self.floor * judged)
