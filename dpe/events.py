"""Event contracts: one pydantic model per topic.

Every event carries a schema version, an event id, a timestamp and the name of its producer, plus
the lineage fields that let anyone answer "why did the model see this sample?" from the topics
alone. Events travel as JSON; images never travel inside events, only `BlobRef`s to the blob store.

Readers ignore fields they do not know (so old readers can read events from newer writers that only
added optional fields) and refuse schema versions newer than their own with a clear error.

Example:
    >>> ev = EvalOutcome(policy_version=3, suite="synthetic", item_id="i1", capability="counting",
    ...                  answer_type="number", expected="4", predicted="5", correct=False, score=0.0)
    >>> ev.outcome_id
    '3/synthetic/i1'
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

AnswerType = Literal["choice", "number", "yes_no", "text"]
"""How an answer is graded: a choice letter, a number with tolerance, yes/no, or exact text."""

SampleOrigin = Literal["agents", "audit"]
"""Where a sample came from: the agents' crew writing about an unlabeled item, or the auditor's rectification (the
references' consensus on a probe the target failed)."""

ErrorType = Literal["visual_recognition", "calculation", "reasoning", "misunderstanding", "format", "other"]

SHA256_PATTERN = r"^[0-9a-f]{64}$"
ID_PATTERN = r"^[A-Za-z0-9._:/@+=-]{1,200}$"

MAX_POLICY_VERSION = 10**9
"""Policy versions are below this: one checkpoint per second would take 30 years to reach it, so a
larger one is a bug (a timestamp, a sentinel) and is refused before it can skew any state."""
MAX_COUNT = 10**12
"""Counts (events, sequence numbers, rounds, budgets, bytes) are below this."""
MAX_PARTITION = 2**31
"""Kafka partition ids are int32 on the wire."""
MAX_OFFSET = 2**63
"""Kafka offsets are int64 on the wire."""


def below(bound: int) -> AfterValidator:
    """A validator refusing integers of `bound` and more.

    The upper bounds of the integer fields are checked by validators, not stated as JSON-schema
    maxima: a reader's schema that gained a maximum would refuse events its old writers could write,
    which `dpe.schema.compatibility_problems` reports as a break (only the bogus events it is there
    to refuse are concerned).

    >>> below(10).func(9)
    9
    >>> below(10).func(10)
    Traceback (most recent call last):
    ...
    ValueError: 10 is not below 10
    """

    def check(value: int) -> int:
        if value >= bound:
            raise ValueError(f"{value} is not below {bound}")
        return value

    return AfterValidator(check)


PolicyVersion = Annotated[int, Field(ge=0), below(MAX_POLICY_VERSION)]
Count = Annotated[int, Field(ge=0), below(MAX_COUNT)]
Partition = Annotated[int, Field(ge=0), below(MAX_PARTITION)]
Offset = Annotated[int, Field(ge=0), below(MAX_OFFSET)]


CONTRACT = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
"""The configuration of every event and of its parts: unknown fields are ignored, instances are immutable, and
numbers are finite. JSON has no NaN or infinity; a writer that sends them anyway is refused like any other
schema violation (pydantic would write them back as null, which no reader could decode)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Base of every event: envelope fields and schema-version checking."""

    model_config = CONTRACT

    SCHEMA_VERSION: ClassVar[int] = 1
    MIN_SCHEMA_VERSION: ClassVar[int] = 1

    schema_version: int = Field(default=0, validate_default=True, description="Major version of this event's schema.")
    event_id: str = Field(default_factory=_new_id, pattern=ID_PATTERN)
    ts: datetime = Field(default_factory=_now, description="When the event was created (UTC).")
    producer: str = Field(default="dpe", max_length=200, description="Service that wrote the event.")

    @field_validator("schema_version", mode="before")
    @classmethod
    def _known_schema_version(cls, value: Any) -> Any:
        if value in (0, None):
            return cls.SCHEMA_VERSION
        if isinstance(value, int) and not isinstance(value, bool):
            if value > cls.SCHEMA_VERSION:
                raise ValueError(
                    f"schema_version {value} is newer than this reader understands "
                    f"({cls.__name__} v{cls.SCHEMA_VERSION}); upgrade the reader"
                )
            if value < cls.MIN_SCHEMA_VERSION:
                raise ValueError(
                    f"schema_version {value} is older than the oldest {cls.__name__} "
                    f"version still read (v{cls.MIN_SCHEMA_VERSION})"
                )
        return value

    def key(self) -> str:
        """The Kafka message key (decides the partition); see `dpe.topics` for each topic's rule."""
        return self.event_id


class BlobRef(BaseModel):
    """Reference to an image in the content-addressed blob store."""

    model_config = CONTRACT

    sha256: str = Field(pattern=SHA256_PATTERN)
    media_type: str = Field(pattern=r"^image/[a-z0-9.+-]+$")
    size_bytes: Annotated[int, below(MAX_COUNT)] = Field(ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)


class UnlabeledItem(Event):
    """An image that entered the system without labels (ingested folder, manifest, synthetic world)."""

    item_id: str = Field(pattern=ID_PATTERN, description="Content hash of the image: re-ingesting adds nothing.")
    image: BlobRef
    source: str = Field(max_length=2000, description="Where it came from (path, URL, 'synthetic:<seed>').")
    text: str | None = Field(default=None, max_length=20_000, description="Untrusted caption or text; data only.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Untrusted annotations (captioner stand-in).")

    def key(self) -> str:
        return self.item_id


class EvalOutcome(Event):
    """One graded answer of one policy version on one diagnostic item (successes too).

    Partitioned by capability so that one stream worker owns a capability's state; `outcome_id`
    (policy version, suite, item) is the idempotency key: a re-run replaces, never adds.
    """

    policy_version: PolicyVersion
    suite: str = Field(pattern=ID_PATTERN)
    item_id: str = Field(pattern=ID_PATTERN)
    capability: str = Field(min_length=1, max_length=100)
    answer_type: AnswerType
    expected: str = Field(max_length=2000)
    predicted: str = Field(max_length=20_000)
    extracted: str | None = Field(default=None, max_length=2000, description="Answer extracted from the output.")
    correct: bool
    score: float = Field(ge=0.0, le=1.0, description="Graded score in [0, 1].")
    error_type: ErrorType | None = None
    failure_reason: str | None = Field(default=None, max_length=2000)

    @property
    def outcome_id(self) -> str:
        return f"{self.policy_version}/{self.suite}/{self.item_id}"

    def key(self) -> str:
        return self.capability


class Divergence(Event):
    """AuditDM evidence: one audited probe on which the reference models agreed. `diverged`: the target's answer
    differed (a failure found); otherwise it matched, a success, so that a capability's audit evidence is a rate of
    failures per probe, not a count of failures alone (which would make every capability look weak alike)."""

    policy_version: PolicyVersion
    item_id: str = Field(pattern=ID_PATTERN)
    probe_id: str = Field(pattern=ID_PATTERN, description="Which probe question (and counterfactual edit) was asked.")
    capability: str = Field(min_length=1, max_length=100)
    question: str = Field(max_length=2000)
    image: BlobRef
    counterfactual_of: str | None = Field(default=None, description="Original item id when the image is an edit.")
    edit: str | None = Field(default=None, max_length=500, description="The edit that made the counterfactual.")
    target_answer: str = Field(max_length=2000)
    reference_answers: dict[str, str] = Field(description="Reference model name -> its answer.")
    consensus_answer: str = Field(max_length=2000)
    consensus_strength: float = Field(ge=0.0, le=1.0, description="Share of references agreeing on the consensus.")
    diverged: bool = Field(True, description="The target's answer differed from the consensus (False: it matched).")
    consensus_agreeing: Count | None = Field(default=None, description="References that gave the consensus answer.")
    failure_type: str | None = Field(default=None, max_length=200, description="The named failure type of a "
                                     "divergence (`producers.auditor.failures`): capability/kind/edit/pattern.")
    answer_type: AnswerType | None = Field(default=None, description="How the probe's answers are graded (absent in "
                                           "events written before rectification: those are never trained on).")
    options: list[str] | None = Field(default=None, description="The probe's choice texts, A, B, C... in order.")
    tolerance: float = Field(default=0.0, ge=0.0, description="Absolute tolerance of the probe's number answers.")
    prober: str | None = Field(default=None, max_length=200, description="Who chose the probe: absent for the fixed "
                               "prober's templates, 'auditor-v<N>' for version N of the trained auditor model.")

    @property
    def divergence_id(self) -> str:
        return f"{self.policy_version}/{self.item_id}/{self.probe_id}"

    def key(self) -> str:
        return self.capability


class AuditLead(Event):
    """A divergence the references agreed on strongly enough to train on, routed to the agents by its image: they
    turn it into a sample (the consensus answer as the label) through the same QC chain and quota plan as their own.

    Keyed like `UnlabeledItem` (by the audited image's id, on as many partitions), so a lead falls in the same quota
    slice, and the same agent worker, as an unlabeled item of that id would.
    """

    divergence: Divergence

    def key(self) -> str:
        return self.divergence.item_id


class FailedItem(BaseModel):
    """One diagnostic item a policy version got wrong, as the agents may see it: the image (a blob), the
    question, both answers and the judge's reason; never the scene behind it."""

    model_config = CONTRACT

    item_id: str = Field(pattern=ID_PATTERN)
    suite: str = Field(pattern=ID_PATTERN)
    image: BlobRef | None = Field(default=None, description="The item's image in the blob store, when stored.")
    question: str = Field(max_length=2000)
    expected: str = Field(max_length=2000)
    given: str = Field(max_length=2000, description="The answer extracted from the policy's output (else its start).")
    error_type: ErrorType | None = None
    reason: str | None = Field(default=None, max_length=2000)


class CapabilityDiagnosis(BaseModel):
    """What went wrong in one capability on one policy version: the error-type mix, a few failed items, and a
    short analysis in words."""

    model_config = CONTRACT

    graded: Count = Field(description="Items of this capability graded (the held-out suite is not counted).")
    wrong: Count
    error_mix: dict[ErrorType, float] = Field(description="Share of the wrong answers per error type (sums to 1).")
    failures: list[FailedItem] = Field(max_length=8)
    analysis: str = Field(max_length=1000)
    failure_types: dict[str, Count] = Field(default_factory=dict, description="Divergences per failure type the "
                                            "auditor found on this version (beside the evaluator's error types).")


class FailureType(BaseModel):
    """One named failure type the auditor found: how many divergences, and a few of them as exemplars (image, question,
    the references' consensus as ``expected``, the target's answer as ``given``)."""

    model_config = CONTRACT

    capability: str = Field(min_length=1, max_length=100)
    count: Count
    exemplars: list[FailedItem] = Field(max_length=3)


class FailureTypes(Event):
    """The auditor's tally of one policy version's divergences by failure type (AuditDM's failure taxonomy), counts
    and exemplars; republished as it grows, the newest per version is the tally."""

    policy_version: PolicyVersion
    audited_probes: Count = Field(description="Probes the references agreed on, diverged or not.")
    types: dict[str, FailureType] = Field(description="Failure type name -> its count and exemplars.")

    def key(self) -> str:
        return f"v{self.policy_version}"


class Diagnosis(Event):
    """The agents' brief for one policy version: per capability, what its evaluation got wrong and why.

    Written by the evaluator after a version's outcomes, from the suites the weakness stream scores (never the
    held-out suite, which is for reporting only); the agents' planner and writer read it.
    """

    policy_version: PolicyVersion
    capabilities: dict[str, CapabilityDiagnosis]

    def key(self) -> str:
        return "diagnosis"


class CapabilityWeakness(BaseModel):
    """Rolling weakness of one capability."""

    model_config = CONTRACT

    error_rate: float = Field(ge=0.0, le=1.0, description="Exponentially decayed error rate.")
    effective_n: float = Field(ge=0.0, description="Decayed number of observations behind the rate.")
    ci_low: float = Field(ge=0.0, le=1.0)
    ci_high: float = Field(ge=0.0, le=1.0)
    events: Count = Field(description="Distinct outcomes seen (not decayed).")
    trend: float = Field(default=0.0, description="Change of error rate per policy version (negative: improving).")


class WeaknessSnapshot(Event):
    """Per-capability weakness at one moment; the input of every quota plan."""

    snapshot_id: str = Field(default_factory=_new_id, pattern=ID_PATTERN)
    seq: Count = Field(description="Monotonic per stream worker.")
    policy_version: PolicyVersion = Field(description="Newest policy version seen in the evidence.")
    capabilities: dict[str, CapabilityWeakness]
    events_total: Count

    def key(self) -> str:
        return "weakness"


class QuotaPlan(Event):
    """How many samples agents should make per capability in one round, and why."""

    plan_id: str = Field(default_factory=_new_id, pattern=ID_PATTERN)
    round: Count
    strategy: str = Field(min_length=1, max_length=100)
    budget: Count
    quotas: dict[str, int]
    weights: dict[str, float]
    snapshot_id: str = Field(pattern=ID_PATTERN, description="The weakness snapshot this plan came from.")
    policy_version: PolicyVersion

    @model_validator(mode="after")
    def _quotas_within_budget(self) -> "QuotaPlan":
        if any(q < 0 for q in self.quotas.values()):
            raise ValueError("quotas must be non-negative")
        if sum(self.quotas.values()) > self.budget:
            raise ValueError(f"quotas sum to {sum(self.quotas.values())}, over the budget {self.budget}")
        return self

    def key(self) -> str:
        return "plan"


class AgentStep(BaseModel):
    """One agent role's contribution to a sample."""

    model_config = CONTRACT

    role: Literal["planner", "retriever", "editor", "writer", "validator", "answerer"]
    backend: str = Field(max_length=200, description="'pixels', 'programmatic' or the endpoint's model name.")
    tools: list[str] = Field(default_factory=list)
    detail: str | None = Field(default=None, max_length=2000)


class QCVerdict(BaseModel):
    """One quality-control check's result, with its reason code."""

    model_config = CONTRACT

    check: str = Field(max_length=100)
    passed: bool
    reason_code: str = Field(max_length=100)
    detail: str | None = Field(default=None, max_length=2000)
    score: float | None = None


class AnswerKey(BaseModel):
    """What an answer is graded against: the expected answer, its type, the options and the tolerance.

    For `choice` the answer is the option's letter and `options` are the option texts, A, B, C...
    in order; `tolerance` is the absolute tolerance of `number` answers.

    Example:
        >>> AnswerKey(answer="B", answer_type="choice", options=["red", "blue"])
        AnswerKey(answer='B', answer_type='choice', options=('red', 'blue'), tolerance=0.0)
        >>> AnswerKey(answer="4", answer_type="essay")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for AnswerKey...
    """

    model_config = CONTRACT

    answer: str = Field(min_length=1, max_length=2000)
    answer_type: AnswerType
    options: tuple[str, ...] | None = Field(default=None, description="Choice texts, A, B, C... in order.")
    tolerance: float = Field(default=0.0, ge=0.0, description="Absolute tolerance for number answers.")

    @classmethod
    def of(cls, carrier: object) -> "AnswerKey":
        """The key read from the `answer`, `answer_type`, `options` and `tolerance` attributes of `carrier`.

        Example:
            >>> from types import SimpleNamespace
            >>> AnswerKey.of(SimpleNamespace(answer="4", answer_type="number", options=None, tolerance=0.5))
            AnswerKey(answer='4', answer_type='number', options=None, tolerance=0.5)
        """
        return cls.model_validate(carrier, from_attributes=True)


class SampleBody(BaseModel):
    """The training content of a sample: image, question and verifiable answer."""

    model_config = CONTRACT

    image: BlobRef
    question: str = Field(min_length=1, max_length=4000)
    answer: str = Field(min_length=1, max_length=500)
    answer_type: AnswerType
    options: list[str] | None = Field(default=None, description="Choice texts, A, B, C... in order.")
    tolerance: float = Field(default=0.0, ge=0.0, description="Absolute tolerance for number answers.")

    @property
    def key(self) -> AnswerKey:
        """What answers to the question are graded against."""
        return AnswerKey.of(self)


class AcceptedSample(Event):
    """A QC-passed training sample with full provenance."""

    sample_id: str = Field(pattern=ID_PATTERN, description="Content hash of image + question + answer.")
    capability: str = Field(min_length=1, max_length=100)
    body: SampleBody
    source_item_id: str = Field(pattern=ID_PATTERN)
    plan_id: str = Field(pattern=ID_PATTERN)
    agents: list[AgentStep]
    qc: list[QCVerdict]
    policy_version: PolicyVersion = Field(description="Policy the difficulty band was measured against.")
    pass_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    origin: SampleOrigin = Field(default="agents", description="Who wrote it: the agents from an unlabeled item, or "
                                 "the auditor (a divergence's consensus answer, `divergence_id`).")
    divergence_id: str | None = Field(default=None, max_length=500, description="The audit verdict it came from.")

    def key(self) -> str:
        return self.sample_id


class RejectedSample(Event):
    """A candidate that failed QC, with every verdict so rejections can be counted and inspected."""

    candidate_id: str = Field(pattern=ID_PATTERN)
    capability: str = Field(min_length=1, max_length=100)
    body: SampleBody | None = None
    source_item_id: str = Field(pattern=ID_PATTERN)
    plan_id: str = Field(pattern=ID_PATTERN)
    agents: list[AgentStep] = Field(default_factory=list)
    qc: list[QCVerdict]
    reason_code: str = Field(max_length=100, description="The first failed check's reason.")
    policy_version: PolicyVersion | None = None
    origin: SampleOrigin = "agents"
    divergence_id: str | None = Field(default=None, max_length=500)

    def key(self) -> str:
        return self.candidate_id


class OffsetRange(BaseModel):
    """Half-open range [start, end) of offsets in one topic partition."""

    model_config = CONTRACT

    topic: str
    partition: Partition
    start: Offset
    end: Offset


class Checkpoint(Event):
    """A new policy version written by the trainer; triggers re-diagnosis."""

    policy_version: PolicyVersion
    parent_version: PolicyVersion | None = None
    uri: str = Field(max_length=2000, description="Folder or URL of the saved weights.")
    trained_on: list[OffsetRange] = Field(default_factory=list)
    sample_ids: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)

    def key(self) -> str:
        return "policy"


class AuditorCheckpoint(Checkpoint):
    """A new version of the trained auditor model (AuditDM's auditor), written by the auditor's trainer: its
    `policy_version` counts the auditor's own versions, its `trained_on` the unlabeled items it probed."""

    target_version: PolicyVersion | None = Field(
        None, description="The policy version whose divergences rewarded the round (the newest one announced then)."
    )

    def key(self) -> str:
        return "auditor"


class DeadLetter(Event):
    """A message that could not be parsed or processed, with where it came from and why.

    A letter that would not fit the dead-letter topic is `truncated`: it keeps the origin, the size
    and SHA-256 of the value and its first bytes, and clips long texts and headers.
    """

    origin_topic: str
    origin_partition: int | None = None
    origin_offset: int | None = None
    origin_key: str | None = None
    stage: str = Field(max_length=200, description="Which service step failed (decode, validate, handle...).")
    error_class: str = Field(max_length=200)
    error_message: str = Field(max_length=8000)
    payload_b64: str = Field(
        description="The original message value, base64: untouched, or its first bytes if truncated."
    )
    payload_bytes: Count | None = Field(default=None, description="Size of the original message value in bytes.")
    payload_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="SHA-256 of the original message value (hex)."
    )
    truncated: bool = Field(
        default=False, description="Cut to fit the dead-letter topic: payload_b64 holds only the first bytes of the "
        "value, and long texts and headers are clipped."
    )
    headers: dict[str, str] = Field(default_factory=dict)

    def key(self) -> str:
        return self.origin_topic


EVENT_MODELS: tuple[type[Event], ...] = (
    UnlabeledItem,
    EvalOutcome,
    Diagnosis,
    Divergence,
    AuditLead,
    FailureTypes,
    WeaknessSnapshot,
    QuotaPlan,
    AcceptedSample,
    RejectedSample,
    Checkpoint,
    AuditorCheckpoint,
    DeadLetter,
)
