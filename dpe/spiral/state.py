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
from typing import Any, TypeVar

from dpe.events import (
    AcceptedSample,
    Checkpoint,
    EvalOutcome,
    Event,
    FailureTypes,
    QuotaPlan,
    RejectedSample,
    WeaknessSnapshot,
)
from dpe.recent import RecentIds

SEEN_IDS = 100_000
"""Accepted and rejected ids remembered for de-duplication (a roll or resume re-delivers recent ones)."""
HELDOUT_ITEM_VERSIONS = 4
"""Newest versions whose held-out items are kept one by one; older ones are folded into counts."""

Versioned = TypeVar("Versioned", WeaknessSnapshot, QuotaPlan)


def _keep_newest(by_version: dict[int, Versioned], event: Versioned) -> None:
    """Keep `event` as its version's entry unless that entry is newer."""
    current = by_version.get(event.policy_version)
    if current is None or event.ts >= current.ts:
        by_version[event.policy_version] = event


def _newest_up_to(by_version: dict[int, Versioned], up_to_version: int | None) -> Versioned | None:
    """The entry of the newest version at most `up_to_version` (any version when None)."""
    versions = [v for v in by_version if up_to_version is None or v <= up_to_version]
    return by_version[max(versions)] if versions else None


@dataclass
class RoundRecord:
    """One policy version's row of the summary."""

    policy_version: int
    heldout_accuracy: dict[str, float]
    heldout_items: int
    heldout_items_by_capability: dict[str, int]
    weakness: dict[str, float]
    quota_plan: dict[str, int]
    strategy: str | None
    samples_trained: int
    samples_trained_by_capability: dict[str, int]
    trainer_metrics: dict[str, float]
    failure_types: dict[str, int] = field(default_factory=dict)
    """Divergences per failure type the auditor found on this version."""

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class SpiralState:
    """Aggregates of the observed topics; idempotent under duplicates, bounded over a week of versions.

    Per version it keeps the newest weakness snapshot and plan, the checkpoint (without its sample
    ids: `trained` counts them, `trained_by_capability` by the capability of their accepted event,
    whichever of the two is seen first) and held-out counts per capability; graded items are kept one
    by one for the newest `HELDOUT_ITEM_VERSIONS` versions only, and seen ids in windows of `SEEN_IDS`.
    """

    heldout_suite: str = "heldout"
    policy_version: int = 0
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    trained: dict[int, int] = field(default_factory=dict)
    trained_by_capability: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    snapshots: dict[int, WeaknessSnapshot] = field(default_factory=dict)
    plans: dict[int, QuotaPlan] = field(default_factory=dict)
    failure_types: dict[int, dict[str, int]] = field(default_factory=dict)
    """Per version, the auditor's newest tally: failure type -> divergences."""
    accepted: int = 0
    accepted_by_capability: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rejected_by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_origin: dict[str, dict[str, int]] = field(default_factory=lambda: {"accepted": {}, "rejected": {}})
    """Accepted and rejected samples by origin: the agents' crew, or the auditor's leads (rectification)."""
    _heldout: dict[int, dict[str, tuple[str, bool]]] = field(default_factory=lambda: defaultdict(dict))
    _heldout_folded: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    """Versions older than the newest few: capability -> [correct, graded]."""
    _accepted_ids: RecentIds = field(default_factory=lambda: RecentIds(SEEN_IDS))
    _rejected_ids: RecentIds = field(default_factory=lambda: RecentIds(SEEN_IDS))
    _accept_times: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    _version_at: float = field(default_factory=time.monotonic)
    """When the newest policy version was seen (or the state began)."""
    _accepted_before_version: int = 0
    """Accepted samples seen before the newest policy version: the rest wait for the trainer."""
    _capability_of: dict[str, str] = field(default_factory=dict)
    """Accepted sample id -> capability, until a checkpoint trains it."""
    _trained_in: dict[str, int] = field(default_factory=dict)
    """Trained sample id -> version, until its accepted event is seen."""

    def apply(self, event: Event) -> None:
        """Fold one event in."""
        if isinstance(event, EvalOutcome):
            if event.suite == self.heldout_suite and event.policy_version not in self._heldout_folded:
                self._heldout[event.policy_version][event.item_id] = (event.capability, event.correct)
        elif isinstance(event, AcceptedSample):
            if self._accepted_ids.add(event.sample_id):
                self.accepted += 1
                self.accepted_by_capability[event.capability] += 1
                self._count_origin("accepted", event.origin)
                self._accept_times.append(time.monotonic())
                self._match(event.sample_id, capability=event.capability)
        elif isinstance(event, RejectedSample):
            if self._rejected_ids.add(event.candidate_id):
                self.rejected_by_reason[event.reason_code] += 1
                self._count_origin("rejected", event.origin)
        elif isinstance(event, Checkpoint):
            self._apply_checkpoint(event)
        elif isinstance(event, WeaknessSnapshot):
            _keep_newest(self.snapshots, event)
        elif isinstance(event, QuotaPlan):
            _keep_newest(self.plans, event)
        elif isinstance(event, FailureTypes):
            self.failure_types[event.policy_version] = {name: kind.count for name, kind in event.types.items()}

    def _count_origin(self, verdict: str, origin: str) -> None:
        counts = self.by_origin[verdict]
        counts[origin] = counts.get(origin, 0) + 1

    def _apply_checkpoint(self, event: Checkpoint) -> None:
        if event.policy_version not in self.checkpoints and event.policy_version >= self.policy_version:
            self._version_at = time.monotonic()
            self._accepted_before_version = self.accepted
        if event.policy_version not in self.checkpoints:
            for sample_id in event.sample_ids:
                self._match(sample_id, version=event.policy_version)
        self.trained[event.policy_version] = len(event.sample_ids)
        self.checkpoints[event.policy_version] = event.model_copy(update={"sample_ids": [], "trained_on": []})
        self.policy_version = max(self.policy_version, event.policy_version)
        self._fold_heldout(self.policy_version - HELDOUT_ITEM_VERSIONS)

    def _match(self, sample_id: str, *, capability: str | None = None, version: int | None = None) -> None:
        """Credit a trained sample to its version and capability once both its events are seen."""
        if version is None:
            version = self._trained_in.pop(sample_id, None)
        elif sample_id in self._capability_of:
            capability = self._capability_of.pop(sample_id)
        if version is not None and capability is not None:
            counts = self.trained_by_capability[version]
            counts[capability] = counts.get(capability, 0) + 1
            return
        waiting = self._capability_of if capability is not None else self._trained_in
        waiting[sample_id] = capability if capability is not None else version
        if len(waiting) > SEEN_IDS:
            del waiting[next(iter(waiting))]

    def _fold_heldout(self, before: int) -> None:
        """Turn the graded items of versions older than `before` into per-capability counts."""
        for version in [v for v in self._heldout if v < before]:
            self._heldout_folded[version] = dict(self._heldout_counts(version))
            del self._heldout[version]

    def to_json(self) -> dict[str, Any]:
        """Everything `from_json` needs to go on, as JSON-ready data (a resumed run's history).

        >>> state = SpiralState()
        >>> state.apply(Checkpoint(policy_version=2, uri="/c/2", sample_ids=["a"]))
        >>> SpiralState.from_json(state.to_json()).rounds()[-1].samples_trained
        1
        """
        self._fold_heldout(self.policy_version + 1)
        return {
            "heldout_suite": self.heldout_suite, "policy_version": self.policy_version,
            "checkpoints": [event.model_dump(mode="json") for event in self.checkpoints.values()],
            "trained": self.trained, "trained_by_capability": self.trained_by_capability, "accepted": self.accepted,
            "snapshots": [event.model_dump(mode="json") for event in self.snapshots.values()],
            "plans": [event.model_dump(mode="json") for event in self.plans.values()],
            "failure_types": self.failure_types,
            "accepted_by_capability": self.accepted_by_capability, "rejected_by_reason": self.rejected_by_reason,
            "by_origin": self.by_origin,
            "heldout": self._heldout_folded,
            "accepted_ids": self._accepted_ids.ids(), "rejected_ids": self._rejected_ids.ids(),
            "untrained_capabilities": self._capability_of, "trained_unseen": self._trained_in,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpiralState:
        """The state `to_json` described."""
        state = cls(heldout_suite=data["heldout_suite"], policy_version=data["policy_version"],
                    accepted=data["accepted"])
        state.checkpoints = {e.policy_version: e for e in map(Checkpoint.model_validate, data["checkpoints"])}
        state.trained = {int(v): n for v, n in data["trained"].items()}
        by_capability = data.get("trained_by_capability", {})
        state.trained_by_capability.update({int(v): counts for v, counts in by_capability.items()})
        state.snapshots = {e.policy_version: e for e in map(WeaknessSnapshot.model_validate, data["snapshots"])}
        state.plans = {e.policy_version: e for e in map(QuotaPlan.model_validate, data["plans"])}
        state.failure_types = {int(v): counts for v, counts in data.get("failure_types", {}).items()}
        state.accepted_by_capability.update(data["accepted_by_capability"])
        state.rejected_by_reason.update(data["rejected_by_reason"])
        state.by_origin = data.get("by_origin", state.by_origin)
        state._heldout_folded = {int(v): counts for v, counts in data["heldout"].items()}
        state._accepted_ids = RecentIds(SEEN_IDS, data["accepted_ids"])
        state._rejected_ids = RecentIds(SEEN_IDS, data["rejected_ids"])
        state._capability_of = dict(data.get("untrained_capabilities", {}))
        state._trained_in = dict(data.get("trained_unseen", {}))
        state._accepted_before_version = state.accepted
        return state

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
        waiting = self.accepted - self._accepted_before_version
        if waiting:
            return (f"stalled: no new policy version for {idle_s / 60:.0f} min while {waiting} accepted samples wait "
                    "for the trainer (see its log)")
        return (f"stalled: no new policy version for {idle_s / 60:.0f} min and no sample accepted since (agents idle: "
                "no plan, no unlabeled data, or QC rejects every candidate)")

    def _heldout_counts(self, policy_version: int) -> dict[str, list[int]]:
        """Capability -> [correct, graded] of one version's held-out items."""
        if policy_version in self._heldout_folded:
            return self._heldout_folded[policy_version]
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for capability, correct in self._heldout.get(policy_version, {}).values():
            counts[capability][0] += correct
            counts[capability][1] += 1
        return counts

    def heldout_accuracy(self, policy_version: int) -> dict[str, float]:
        """Held-out accuracy per capability of one policy version (items graded so far)."""
        return {cap: correct / graded for cap, (correct, graded) in sorted(self._heldout_counts(policy_version).items())}

    def heldout_items(self, policy_version: int) -> int:
        return sum(graded for _, graded in self._heldout_counts(policy_version).values())

    def latest_weakness(self, up_to_version: int | None = None) -> WeaknessSnapshot | None:
        return _newest_up_to(self.snapshots, up_to_version)

    def latest_plan(self, up_to_version: int | None = None) -> QuotaPlan | None:
        return _newest_up_to(self.plans, up_to_version)

    def rounds(self) -> list[RoundRecord]:
        """One record per policy version seen (0 is the base model)."""
        versions = sorted(set(self._heldout) | set(self._heldout_folded) | set(self.checkpoints) | {0})
        records = []
        for version in versions:
            snapshot = self.latest_weakness(version)
            plan = self.latest_plan(version)
            checkpoint = self.checkpoints.get(version)
            records.append(RoundRecord(
                policy_version=version,
                heldout_accuracy=self.heldout_accuracy(version),
                heldout_items=self.heldout_items(version),
                heldout_items_by_capability={cap: graded for cap, (_, graded) in
                                             sorted(self._heldout_counts(version).items())},
                weakness={cap: w.error_rate for cap, w in sorted(snapshot.capabilities.items())} if snapshot else {},
                quota_plan=dict(sorted(plan.quotas.items())) if plan else {},
                strategy=plan.strategy if plan else None,
                samples_trained=self.trained.get(version, 0),
                samples_trained_by_capability=dict(sorted(self.trained_by_capability.get(version, {}).items())),
                trainer_metrics=dict(checkpoint.metrics) if checkpoint else {},
                failure_types=dict(sorted(self.failure_types.get(version, {}).items())),
            ))
        return records
