"""Quota accounting that lets several agent workers fill a plan exactly: slices, a ledger, reservations.

Each capability's quota is split deterministically over the unlabeled topic's partitions
(`split_quota`); the slice of a sample is the partition of its source item (`item_slice`, Kafka's
default key partitioner, so the slice is computable from `source_item_id` alone). Only the worker
that owns a partition in the consumer group fills its slices, so no two workers ever fill the
same slice. `QuotaLedger` counts accepted sample ids per (plan, capability, slice), from the
accepted topic and from the worker's own publications alike (a set, so both sources and replays
count once), and hands out reservations so that concurrent attempts within a worker never exceed
a slice's room either.

Capabilities the worker finds out of reach of the current policy (`set_out_of_reach`: the difficulty
band keeps almost none of their candidates) get no more reservations, and their unfilled room in a
slice becomes a pool the other capabilities of the plan may fill beyond their own targets. A slice
never takes more samples than the sum of its targets, so the plan's budget is still met exactly, and
a round is not held up by a capability it cannot train.

Example:
    >>> split_quota(10, 4, "counting")
    [2, 3, 3, 2]
    >>> sum(split_quota(7, 4, "chart")), item_slice("abc", 4) == item_slice("abc", 4)
    (7, True)
"""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.partitioner import murmur2

from dpe.events import QuotaPlan


def split_quota(quota: int, partitions: int, capability: str) -> list[int]:
    """A capability's quota over partitions: equal shares, the remainder from a capability-dependent partition on."""
    base, extra = divmod(quota, partitions)
    start = zlib.crc32(capability.encode()) % partitions
    return [base + (1 if (p - start) % partitions < extra else 0) for p in range(partitions)]


def item_slice(item_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2 of the key) gives an item keyed by its id."""
    return (murmur2(item_id.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Reservation:
    """A slot held by one in-flight attempt: released when the attempt ends, filled when it is accepted."""

    plan_id: str
    capability: str
    slice: int


class QuotaLedger:
    """Targets of the current plan, accepted sample ids of every plan, reservations of in-flight attempts."""

    def __init__(self, partitions: int):
        self.partitions = partitions
        self.plan: QuotaPlan | None = None
        self._targets: dict[tuple[str, int], int] = {}
        self._accepted: dict[str, dict[tuple[str, int], set[str]]] = defaultdict(lambda: defaultdict(set))
        self._plan_of: dict[str, str] = {}
        self._reserved: Counter[tuple[str, str, int]] = Counter()
        self.out_of_reach: frozenset[str] = frozenset()
        self._changed = asyncio.Event()

    def use_plan(self, plan: QuotaPlan) -> bool:
        """Follow `plan` from now on; False when it is the plan already followed.

        A plan that repeats the followed one (same quotas for the same policy version: the weakness
        stream re-plans on every snapshot) continues it rather than starting a new budget. Every
        worker reads the plans in the same order, so all of them keep the same plan id.
        """
        if self.plan is not None and (
            plan.plan_id == self.plan.plan_id
            or (plan.quotas == self.plan.quotas and plan.policy_version == self.plan.policy_version)
        ):
            return False
        self.plan = plan
        self._targets = {
            (capability, p): share
            for capability, quota in plan.quotas.items()
            for p, share in enumerate(split_quota(quota, self.partitions, capability))
        }
        self._notify()
        return True

    def record(self, plan_id: str, capability: str, source_item_id: str, sample_id: str) -> bool:
        """Count an accepted sample (idempotent); True when it was new."""
        bucket = self._accepted[plan_id][(capability, item_slice(source_item_id, self.partitions))]
        if sample_id in bucket:
            return False
        bucket.add(sample_id)
        self._plan_of.setdefault(sample_id, plan_id)
        self._notify()
        return True

    def plan_of(self, sample_id: str) -> str | None:
        """The plan a sample was first accepted under, or None if it never was."""
        return self._plan_of.get(sample_id)

    def filled(self, capability: str, slice_: int | None = None, plan_id: str | None = None) -> int:
        """Accepted samples of a capability (in one slice, or all) for a plan (default: the current one)."""
        plan_id = plan_id or (self.plan.plan_id if self.plan else "")
        counts = self._accepted.get(plan_id, {})
        slices = range(self.partitions) if slice_ is None else (slice_,)
        return sum(len(counts.get((capability, p), ())) for p in slices)

    def remaining(self) -> dict[str, int]:
        """Samples still missing per capability of the current plan (over all slices)."""
        if self.plan is None:
            return {}
        return {capability: max(0, quota - self.filled(capability)) for capability, quota in self.plan.quotas.items()}

    def set_out_of_reach(self, capabilities: Iterable[str]) -> None:
        """Reserve nothing more for `capabilities`; their unfilled room goes to the plan's other capabilities."""
        capabilities = frozenset(capabilities)
        if capabilities != self.out_of_reach:
            self.out_of_reach = capabilities
            self._notify()

    def open_slice(self, slice_: int) -> bool:
        """Whether some capability still has unfilled (possibly reserved) room in this slice."""
        return any(self._room(capability, slice_, reserved=False) > 0 for capability in self._in_reach(slice_))

    def _open(self, capability: str, slice_: int) -> int:
        return self._targets.get((capability, slice_), 0) - self.filled(capability, slice_)

    def _own_room(self, capability: str, slice_: int, reserved: bool) -> int:
        """Room left of a capability's own target in the slice (negative once it filled the pool's room too)."""
        plan_id = self.plan.plan_id if self.plan else ""
        return self._open(capability, slice_) - (self._reserved[(plan_id, capability, slice_)] if reserved else 0)

    def _in_slice(self, slice_: int) -> set[str]:
        return {capability for capability, p in self._targets if p == slice_}

    def _in_reach(self, slice_: int) -> list[str]:
        return sorted(self._in_slice(slice_) - self.out_of_reach)

    def _room(self, capability: str, slice_: int, reserved: bool = True) -> int:
        """Free room for a capability in the slice: its own, plus the pool the out-of-reach ones left (less what
        the others already took from it), never more than the slice has left in all (once others took a
        capability's room, it stays taken when that capability comes back in reach); with `reserved`, in-flight
        attempts hold room too."""
        if capability in self.out_of_reach:
            return 0
        pool = sum(max(self._own_room(other, slice_, reserved), 0) for other in self.out_of_reach)
        pool -= sum(max(-self._own_room(other, slice_, reserved), 0) for other in self._in_reach(slice_))
        left = sum(self._own_room(other, slice_, reserved) for other in self._in_slice(slice_))
        return min(max(self._own_room(capability, slice_, reserved), 0) + max(pool, 0), left)

    def reserve(self, slice_: int, capabilities: Iterable[str] | None) -> Reservation | None:
        """Hold a slot for the neediest of `capabilities` (None: any) with free room in the slice: the one with the
        largest share of its own target still free (below zero once it took room from the pool)."""
        if self.plan is None:
            return None
        wanted = set(self.plan.quotas) if capabilities is None else set(capabilities) & set(self.plan.quotas)
        best = None
        for capability in sorted(wanted):
            target = max(self._targets.get((capability, slice_), 0), 1)
            free = self._own_room(capability, slice_, reserved=True) / target
            if self._room(capability, slice_) > 0 and (best is None or free > best[0]):
                best = (free, capability)
        if best is None:
            return None
        reservation = Reservation(self.plan.plan_id, best[1], slice_)
        self._reserved[(reservation.plan_id, reservation.capability, slice_)] += 1
        return reservation

    def blocked(self, slice_: int, capabilities: Iterable[str] | None) -> bool:
        """True when the only room left for these capabilities is held by in-flight attempts."""
        if self.plan is None:
            return False
        wanted = set(self.plan.quotas) if capabilities is None else set(capabilities) & set(self.plan.quotas)
        return (any(self._room(c, slice_, reserved=False) > 0 for c in wanted)
                and not any(self._room(c, slice_) > 0 for c in wanted))

    def release(self, reservation: Reservation) -> None:
        """End an attempt's hold (after it was recorded as accepted, or failed)."""
        key = (reservation.plan_id, reservation.capability, reservation.slice)
        self._reserved[key] -= 1
        if self._reserved[key] <= 0:
            del self._reserved[key]
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Wait until the ledger changes (a record, a release or a new plan)."""
        await self._changed.wait()
