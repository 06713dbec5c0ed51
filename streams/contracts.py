"""The weakness stream's internal topic: per-worker weakness reports for the planner.

Capabilities are partitioned over stream workers, so each worker only knows the capabilities of its
partitions. Each worker publishes `PartialWeakness` reports (the capabilities it changed since its
last report) to ``<prefix>weakness.partial``, a single-partition topic; the planner, wherever that
partition lives, merges the latest report per capability (highest `revision`, which travels with a
capability's state through the table changelog, so a worker that took over a partition continues
the count) into one global `WeaknessSnapshot` and `QuotaPlan`. The public weakness topic only ever
carries global snapshots.

Example:
    >>> partial_topic("dpe.")
    'dpe.weakness.partial'
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from dpe.events import CONTRACT, CapabilityWeakness, Event

PARTIAL_SUFFIX = "weakness.partial"


def partial_topic(prefix: str) -> str:
    """Name of the internal report topic for a topic prefix."""
    return f"{prefix}{PARTIAL_SUFFIX}"


class CapabilityReport(BaseModel):
    """One capability's weakness as its owning worker sees it, with the state revision it came from."""

    model_config = CONTRACT

    revision: int = Field(ge=0, description="Writes of this capability's state so far; newer wins.")
    policy_version: int = Field(ge=0, description="Newest policy version in this capability's evidence.")
    outcomes_at_version: int = Field(0, ge=0, description="Eval outcomes of that version (how far its diagnosis is).")
    weakness: CapabilityWeakness


class PartialWeakness(Event):
    """A stream worker's report of the capabilities it changed since its previous report."""

    worker: str = Field(max_length=200, description="host:pid of the reporting worker.")
    seq: int = Field(ge=0, description="Monotonic per worker process.")
    reports: dict[str, CapabilityReport]

    def key(self) -> str:
        return "partial"
