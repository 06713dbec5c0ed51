"""The agent roles' interface: one small Protocol per role, their typed outputs, and how they fail.

The crew asks, for one unlabeled item and one capability: the planner what to ask and which edits
to make, the retriever for related images (for compositions), the editor to apply the edits, the
writer for a question with its answer, then, during quality control, the validator whether the
question is answerable from the image and an independent answerer for its own answer (it never
sees the written answer). Each role is code (`consumers.agents.programmatic`) or a model behind an
OpenAI-compatible endpoint (`consumers.agents.llm`). The retriever and the editor are tools with
pluggable backends of their own: `consumers.agents.retriever.SearchBackend` and
`dpe.imaging.ImageEditor`.

A role that cannot do its job raises `AgentFailure` with a bounded reason code; the crew turns it
into a rejection with that reason, never a crash.

Example:
    >>> Draft(question="How many circles?", answer="3", answer_type="number").options is None
    True
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal, Protocol, TypeVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dpe.endpoint.client import EndpointReason
from dpe.events import AnswerType, CapabilityDiagnosis, UnlabeledItem
from dpe.imaging import EditOp
from dpe.world import Scene
from monitoring.metrics import AGENT_ROLE_SECONDS

T = TypeVar("T")

FailureReason = Literal[EndpointReason, "not_applicable", "not_perceived", "failed", "agent_error"]
"""Why a role failed (a model's endpoint failing is one reason); the rejection's reason is ``<role>_<reason>``,
e.g. ``writer_not_applicable``."""


class AgentFailure(Exception):
    """A role could not produce its output; `reason_code` is a bounded reason, `detail` says more."""

    def __init__(self, reason_code: FailureReason, detail: str = ""):
        super().__init__(f"{reason_code}: {detail}" if detail else reason_code)
        self.reason_code = reason_code
        self.detail = detail


async def run_role(role: str, backend: str, call: Awaitable[T]) -> T:
    """Await one role's call and time it; any error but `AgentFailure` becomes ``agent_error`` (never a crash)."""
    started = time.perf_counter()
    try:
        return await call
    except AgentFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken role rejects its candidate, it never stops the crew
        raise AgentFailure("agent_error", f"{type(exc).__name__}: {exc}"[:300]) from None
    finally:
        kind = backend if backend in ("pixels", "programmatic") else "llm"
        AGENT_ROLE_SECONDS.labels(role, kind).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class ItemContext:
    """What the agents know about an unlabeled item: the event, its image, its scene when it has one, and the
    diagnosis the current plan was made from.

    `scene` is the item's metadata validated as a synthetic-world scene, and is None except on the benchmarks'
    fast path. `diagnoses` is the `Diagnosis` of the plan's policy version, per capability (empty before any).
    """

    item: UnlabeledItem
    image: Image.Image
    scene: Scene | None
    diagnoses: Mapping[str, CapabilityDiagnosis] = field(default_factory=dict)


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskPlan(_Output):
    """The planner's decision: what to focus the question on, which kind of question to ask (empty: the
    writer's choice), and which edits to make first."""

    focus: str = Field(default="", max_length=300)
    kind: str = Field(default="", max_length=100)
    edits: list[EditOp] = Field(default_factory=list, max_length=3)


class Draft(_Output):
    """A written question with its verifiable answer (a choice answer is the option's letter)."""

    question: str = Field(min_length=1, max_length=1000)
    answer: str = Field(min_length=1, max_length=200)
    answer_type: AnswerType
    options: list[Annotated[str, Field(max_length=200)]] | None = Field(default=None, max_length=26)
    tolerance: float = Field(default=0.0, ge=0.0, le=1e6)


class Verdict(_Output):
    """The validator's judgement: can the question be answered from the image alone?"""

    answerable: bool
    reason: str = Field(default="", max_length=300)


@dataclass(frozen=True)
class AnswererQuestion:
    """What the independent answerer is shown: the question without its answer."""

    question: str
    answer_type: AnswerType
    options: tuple[str, ...] | None


class Planner(Protocol):
    """Decides what to ask about an item for a capability, and how to edit the image first."""

    backend: str

    def capabilities(self, ctx: ItemContext) -> frozenset[str] | None:
        """The capabilities this item can serve, or None when only trying will tell."""

    async def plan(self, ctx: ItemContext, capability: str, attempt: int) -> TaskPlan: ...


class Writer(Protocol):
    """Writes a question and its answer about the (edited) image for a capability."""

    backend: str

    async def write(
        self, ctx: ItemContext, capability: str, plan: TaskPlan, image: Image.Image, attempt: int
    ) -> Draft: ...


class Validator(Protocol):
    """Judges whether a drafted question is answerable from the image."""

    backend: str

    async def validate(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, draft: Draft) -> Verdict: ...


class Answerer(Protocol):
    """Answers a question on its own; returns free text (graded like a policy answer)."""

    backend: str

    async def answer(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, question: AnswererQuestion) -> str: ...
