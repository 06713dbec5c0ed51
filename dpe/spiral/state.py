"""What the spiral has done so far, folded from the topics alone.

`SpiralState.apply(event)` takes any event from the observed topics (in any order, duplicates
included) and keeps what a person watching the run wants: the latest weakness and quota plan, the
accepted-sample rate, the trainer's checkpoints, and held-out accuracy per capability per policy
version. `rounds()` turns that into the per-round records of ``summary.json``.

Example:
    >>> state = SpiralState(heldout_suite="heldout")
    >>> state.apply(Checkpoint(policy_version=1, parent_version=0, uri="/c/1", sample_ids=["a", "b"]))
    >>> state.policy_version
    1
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from dpe.events import AcceptedSample, Checkpoint, EvalOutcome, Event, QuotaPlan, RejectedSample, WeaknessSnapshot


@dataclass
class RoundRecord:
    """One policy version's row of the summary."""

    policy_version: int
    heldout_accuracy: dict[str, float]
    heldout_items: int
    weakness: dict[str, float]
    quota_plan: dict[str, int]
    strategy: str | None
    samples_trained: int
    trainer_metrics: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class SpiralState:
    """Aggregates of the observed topics; idempotent under duplicates."""

    heldout_suite: str = "heldout"
    policy_version: int = 0
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    snapshots: list[WeaknessSnapshot] = field(default_factory=list)
    plans: list[QuotaPlan] = field(default_factory=list)
    accepted_ids: set[str] = field(default_factory=set)
    accepted_by_capability: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rejected_by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _heldout: dict[int, dict[str, bool]] = field(default_factory=lambda: defaultdict(dict))
    _heldout_capability: dict[str, str] = field(default_factory=dict)
    _accept_times: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    _seen_rejections: set[str] = field(default_factory=set)
    _version_at: float = field(default_factory=time.monotonic)
    """When the newest policy version was seen (or the state began)."""
    _accepted_before_version: int = 0
    """Accepted samples seen before the newest policy version: the rest wait for the trainer."""

    def apply(self, event: Event) -> None:
        """Fold one event in."""
        if isinstance(event, EvalOutcome):
            if event.suite == self.heldout_suite:
                self._heldout[event.policy_version][event.item_id] = event.correct
                self._heldout_capability[event.item_id] = event.capability
        elif isinstance(event, AcceptedSample):
            if event.sample_id not in self.accepted_ids:
                self.accepted_ids.add(event.sample_id)
                self.accepted_by_capability[event.capability] += 1
                self._accept_times.append(time.monotonic())
        elif isinstance(event, RejectedSample):
            if event.candidate_id not in self._seen_rejections:
                self._seen_rejections.add(event.candidate_id)
                self.rejected_by_reason[event.reason_code] += 1
        elif isinstance(event, Checkpoint):
            if event.policy_version not in self.checkpoints and event.policy_version >= self.policy_version:
                self._version_at = time.monotonic()
                self._accepted_before_version = len(self.accepted_ids)
            self.checkpoints[event.policy_version] = event
            self.policy_version = max(self.policy_version, event.policy_version)
        elif isinstance(event, WeaknessSnapshot):
            self.snapshots.append(event)
        elif isinstance(event, QuotaPlan):
            self.plans.append(event)

    def accepted_per_s(self, window_s: float = 30.0) -> float:
        """Accepted samples per second over the last `window_s` seconds."""
        now = time.monotonic()
        recent = [t for t in self._accept_times if now - t <= window_s]
        return len(recent) / window_s

    def stall(self, after_s: float, now: float | None = None) -> str | None:
        """A stall in words: no new policy version for `after_s` seconds, or None while the spiral moves.

        Example:
            >>> state = SpiralState()
            >>> state.apply(Checkpoint(policy_version=0, uri="/c/0"))
            >>> state.stall(600) is None
            True
            >>> state.stall(600, now=time.monotonic() + 900)
            'stalled: no new policy version for 15 min and no sample accepted since (agents idle: no plan, no unlabeled data, or QC rejects every candidate)'
        """
        idle_s = (time.monotonic() if now is None else now) - self._version_at
        if idle_s < after_s:
            return None
        waiting = len(self.accepted_ids) - self._accepted_before_version
        if waiting:
            return (f"stalled: no new policy version for {idle_s / 60:.0f} min while {waiting} accepted samples wait "
                    "for the trainer (see its log)")
        return (f"stalled: no new policy version for {idle_s / 60:.0f} min and no sample accepted since (agents idle: "
                "no plan, no unlabeled data, or QC rejects every candidate)")

    def heldout_accuracy(self, policy_version: int) -> dict[str, float]:
        """Held-out accuracy per capability of one policy version (items graded so far)."""
        per_capability: dict[str, list[bool]] = defaultdict(list)
        for item_id, correct in self._heldout.get(policy_version, {}).items():
            per_capability[self._heldout_capability[item_id]].append(correct)
        return {cap: sum(v) / len(v) for cap, v in sorted(per_capability.items())}

    def heldout_items(self, policy_version: int) -> int:
        return len(self._heldout.get(policy_version, {}))

    def latest_weakness(self, up_to_version: int | None = None) -> WeaknessSnapshot | None:
        eligible = [s for s in self.snapshots if up_to_version is None or s.policy_version <= up_to_version]
        return max(eligible, key=lambda s: (s.policy_version, s.ts), default=None)

    def latest_plan(self, up_to_version: int | None = None) -> QuotaPlan | None:
        eligible = [p for p in self.plans if up_to_version is None or p.policy_version <= up_to_version]
        return max(eligible, key=lambda p: (p.policy_version, p.ts), default=None)

    def rounds(self) -> list[RoundRecord]:
        """One record per policy version seen (0 is the base model)."""
        versions = sorted(set(self._heldout) | set(self.checkpoints) | {0})
        records = []
        for version in versions:
            snapshot = self.latest_weakness(version)
            plan = self.latest_plan(version)
            checkpoint = self.checkpoints.get(version)
            records.append(RoundRecord(
                policy_version=version,
                heldout_accuracy=self.heldout_accuracy(version),
                heldout_items=self.heldout_items(version),
                weakness={cap: w.error_rate for cap, w in sorted(snapshot.capabilities.items())} if snapshot else {},
                quota_plan=dict(sorted(plan.quotas.items())) if plan else {},
                strategy=plan.strategy if plan else None,
                samples_trained=len(checkpoint.sample_ids) if checkpoint else 0,
                trainer_metrics=dict(checkpoint.metrics) if checkpoint else {},
            ))
        return records
