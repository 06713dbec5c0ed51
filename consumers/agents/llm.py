"""LLM-backed roles behind any OpenAI-compatible endpoint (vLLM, OpenAI, `dpe.endpoint.server`).

Every role asks through `dpe.endpoint.client.EndpointClient`, the client the judge and the
auditor's references use too: bounded concurrency, timeouts, retries with backoff and Retry-After,
and structured replies validated against the role's pydantic model (re-asked after invalid
output). When the client gives up, its `EndpointFailure` becomes the role's `AgentFailure` with
the same reason (``timeout``, ``rate_limited``, ``server_error``, ``connection_error``,
``request_refused``, ``invalid_output``), which the crew turns into a rejection: never a crash,
never a lost item.

Prompts come from `consumers.agents.prompts`: constant system prompts, untrusted data fenced in
the user message, fixed output schemas.

Example:
    >>> with endpoint_failures_as_agent_failures():
    ...     raise EndpointFailure("timeout", "writer: gave up after 4 requests (APITimeoutError)")
    Traceback (most recent call last):
    ...
    consumers.roles.AgentFailure: timeout: writer: gave up after 4 requests (APITimeoutError)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from consumers.agents.prompts import messages
from consumers.roles import AgentFailure, AnswererQuestion, Draft, ItemContext, TaskPlan, Verdict
from dpe.endpoint.client import EndpointClient, EndpointFailure
from dpe.events import CapabilityDiagnosis
from dpe.imaging import EditOp, describe

M = TypeVar("M", bound=BaseModel)


class PlanReply(BaseModel):
    """The planner's reply: whether the capability can be asked about, the focus, and edits."""

    model_config = ConfigDict(extra="forbid")

    feasible: bool
    focus: str = Field(default="", max_length=300)
    edits: list[EditOp] = Field(default_factory=list, max_length=3)


@contextmanager
def endpoint_failures_as_agent_failures() -> Iterator[None]:
    """Turn an `EndpointFailure` raised inside into the `AgentFailure` with the same reason and detail."""
    try:
        yield
    except EndpointFailure as failure:
        raise AgentFailure(failure.reason, failure.detail) from None


def _item_data(ctx: ItemContext, capability: str) -> dict[str, Any]:
    """What the planner and the writer are told: the capability, the item's own text (untrusted data), and the
    diagnosis of the capability (`brief`). Never the item's metadata: a model role works from pixels too."""
    return {"capability": capability, "item_text": (ctx.item.text or "")[:2000],
            "diagnosis": brief(ctx.diagnoses.get(capability))}


def brief(diagnosis: CapabilityDiagnosis | None) -> dict[str, Any] | None:
    """A capability's diagnosis as prompt data: the analysis, the error-type mix, and the failed items' questions,
    expected and given answers and reasons (their images stay in the blob store).

    Example:
        >>> from dpe.events import FailedItem
        >>> failed = FailedItem(item_id="d1", suite="synthetic", question="How many circles?", expected="3",
        ...                     given="4", error_type="visual_recognition")
        >>> entry = brief(CapabilityDiagnosis(graded=5, wrong=1, error_mix={"visual_recognition": 1.0},
        ...                                   failures=[failed], analysis="1 of 5 wrong"))["failures"][0]
        >>> sorted(entry), entry["given"]
        (['error_type', 'expected', 'given', 'question', 'reason'], '4')
    """
    if diagnosis is None:
        return None
    return {"analysis": diagnosis.analysis, "error_mix": diagnosis.error_mix,
            "failures": [failure.model_dump(include={"question", "expected", "given", "error_type", "reason"})
                         for failure in diagnosis.failures]}


class _ModelRole:
    """A role played by the model behind `client`; `backend` names the model."""

    def __init__(self, client: EndpointClient) -> None:
        self.client = client
        self.backend = client.model

    async def _structured(self, role: str, data: dict[str, Any], image: Image.Image | None, model: type[M]) -> M:
        """The reply to the role's prompt about `data` and `image`, validated as `model`."""
        with endpoint_failures_as_agent_failures():
            return await self.client.structured(role, messages(role, data, image), model)


class LLMPlanner(_ModelRole):
    """Plans with a model; any capability may be tried (the model can answer "not feasible")."""

    def capabilities(self, ctx: ItemContext) -> None:
        return None

    async def plan(self, ctx: ItemContext, capability: str, attempt: int) -> TaskPlan:
        reply = await self._structured("planner", _item_data(ctx, capability), ctx.image, PlanReply)
        if not reply.feasible:
            raise AgentFailure("not_applicable", f"planner: {reply.focus}"[:300])
        return TaskPlan(focus=reply.focus, edits=reply.edits)


class LLMWriter(_ModelRole):
    """Writes the question and answer with a model."""

    async def write(self, ctx: ItemContext, capability: str, plan: TaskPlan, image: Image.Image, attempt: int) -> Draft:
        data = _item_data(ctx, capability) | {"focus": plan.focus, "edits": describe(plan.edits)}
        return await self._structured("writer", data, image, Draft)


class LLMValidator(_ModelRole):
    """Judges answerability with a model."""

    async def validate(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, draft: Draft) -> Verdict:
        data = {"question": draft.question, "options": draft.options, "answer": draft.answer,
                "answer_type": draft.answer_type}
        return await self._structured("validator", data, image, Verdict)


class LLMAnswerer(_ModelRole):
    """Answers with a model in free text (graded like a policy's answer)."""

    async def answer(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, question: AnswererQuestion) -> str:
        data = {"question": question.question, "options": list(question.options or []),
                "answer_type": question.answer_type}
        with endpoint_failures_as_agent_failures():
            return await self.client.chat("answerer", messages("answerer", data, image))
