"""The topic registry: every topic's name, contract, partitioning and config in one place.

Names get the configured prefix (default ``dpe.``). A topic's key rule is its event model's
``key()`` method; ``partitioning`` documents what that means for consumers.

Example:
    >>> spec = TOPICS["eval_outcomes"]
    >>> spec.name("dpe."), spec.model.__name__
    ('dpe.eval.outcomes', 'EvalOutcome')
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpe.events import (
    AcceptedSample,
    AuditLead,
    AuditorCheckpoint,
    Checkpoint,
    DeadLetter,
    Diagnosis,
    Divergence,
    EvalOutcome,
    Event,
    FailureTypes,
    QuotaPlan,
    RejectedSample,
    UnlabeledItem,
    WeaknessSnapshot,
)


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its suffix, contract, partition count, key rule and Kafka topic configs."""

    suffix: str
    model: type[Event]
    partitions: int
    key: str
    partitioning: str
    configs: dict[str, str] = field(default_factory=dict)
    size_factor: int = 1

    def name(self, prefix: str) -> str:
        return f"{prefix}{self.suffix}"

    def max_bytes(self, max_event_bytes: int) -> int:
        """Largest record value accepted on this topic."""
        return max_event_bytes * self.size_factor


TOPICS: dict[str, TopicSpec] = {
    spec.suffix.replace(".", "_"): spec
    for spec in (
        TopicSpec(
            "unlabeled", UnlabeledItem, 4, "item_id",
            "by image content hash: re-ingesting an image lands on the same partition",
        ),
        TopicSpec(
            "eval.outcomes", EvalOutcome, 4, "capability",
            "by capability: one stream worker owns a capability's state; outcome_id is the idempotency key",
        ),
        TopicSpec(
            "diagnosis", Diagnosis, 1, "'diagnosis'",
            "single partition: one brief per evaluated policy version, in version order",
        ),
        TopicSpec(
            "audit.divergences", Divergence, 4, "capability",
            "by capability, co-partitioned with eval.outcomes",
        ),
        TopicSpec(
            "audit.leads", AuditLead, 4, "divergence.item_id",
            "by audited image id, co-partitioned with unlabeled: the agent worker that owns an unlabeled partition "
            "owns the same leads partition (range assignment), so a lead falls in that worker's quota slice",
        ),
        TopicSpec(
            "audit.failure_types", FailureTypes, 1, "policy version",
            "single partition; compacted per policy version: the newest tally of each version stays",
            {"cleanup.policy": "compact,delete"},
        ),
        TopicSpec(
            "weakness", WeaknessSnapshot, 1, "'weakness'",
            "single partition: snapshots are totally ordered",
            {"cleanup.policy": "compact,delete"},
        ),
        TopicSpec(
            "quotas", QuotaPlan, 1, "'plan'",
            "single partition: the latest plan is the last message",
            {"cleanup.policy": "compact,delete"},
        ),
        TopicSpec(
            "samples.accepted", AcceptedSample, 3, "sample_id",
            "by sample id; the trainer stores per-partition offsets in its checkpoints",
        ),
        TopicSpec(
            "samples.rejected", RejectedSample, 3, "candidate_id",
            "by candidate id",
        ),
        TopicSpec(
            "checkpoints", Checkpoint, 1, "'policy'",
            "single partition: policy versions are totally ordered; compacted, the newest version stays",
            {"cleanup.policy": "compact"},
        ),
        TopicSpec(
            "audit.checkpoints", AuditorCheckpoint, 1, "'auditor'",
            "single partition: auditor model versions are totally ordered; compacted, the newest version stays",
            {"cleanup.policy": "compact"},
        ),
        TopicSpec(
            "deadletter", DeadLetter, 1, "origin topic",
            "single partition, in arrival order; room for a base64 copy of any record the bus accepted",
            {"max.message.bytes": str(16 << 20)},
            size_factor=4,
        ),
    )
}

MODEL_TOPIC: dict[type[Event], TopicSpec] = {spec.model: spec for spec in TOPICS.values()}


def topic_for(model: type[Event], prefix: str) -> str:
    """The topic name an event type is published to."""
    return MODEL_TOPIC[model].name(prefix)


def spec_for_topic(topic: str, prefix: str) -> TopicSpec:
    """The spec of a full topic name; raises KeyError for topics dpe does not own."""
    for spec in TOPICS.values():
        if spec.name(prefix) == topic:
            return spec
    raise KeyError(f"unknown topic {topic!r} (prefix {prefix!r})")
