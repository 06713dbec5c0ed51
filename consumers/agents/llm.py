"""LLM-backed roles behind any OpenAI-compatible endpoint (vLLM, OpenAI, `consumers.agents.local_server`).

`LLMClient` wraps `openai.AsyncOpenAI`: at most `concurrency` requests in flight (a semaphore), a
timeout per request, retries with exponential backoff and jitter after timeouts, lost connections,
429 (honouring Retry-After) and 5xx, and structured output: the reply must hold a JSON object
that validates against the role's pydantic model, else the request is asked again, and after
`output_retries` re-asks the role fails with ``invalid_output``. Every failure ends as an
`AgentFailure` with a bounded reason (``timeout``, ``rate_limited``, ``server_error``,
``connection_error``, ``request_refused``, ``invalid_output``), which the crew turns into a
rejection: never a crash, never a lost item.

Prompts come from `consumers.agents.prompts`: constant system prompts, untrusted data fenced in
the user message, fixed output schemas.

Example:
    >>> parse_json_reply('Sure! ```json\\n{"answerable": false, "reason": "too small"}\\n```', Verdict).answerable
    False
"""

from __future__ import annotations

import asyncio
import json
import random
from functools import lru_cache
from typing import Any, TypeVar

import openai
from openai import AsyncOpenAI
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from consumers.agents.editor import EditOp, describe
from consumers.agents.prompts import messages, truncated_json
from consumers.agents.roles import AgentFailure, Draft, ItemContext, Question, TaskPlan, Verdict
from consumers.settings import LLMSettings
from monitoring.metrics import LLM_REQUESTS

M = TypeVar("M", bound=BaseModel)

_RETRYABLE: tuple[tuple[type[Exception], str], ...] = (
    (openai.APITimeoutError, "timeout"),
    (openai.APIConnectionError, "connection_error"),
    (openai.RateLimitError, "rate_limited"),
    (openai.InternalServerError, "server_error"),
)


class PlanReply(BaseModel):
    """The planner's reply: whether the capability can be asked about, the focus, and edits."""

    model_config = ConfigDict(extra="forbid")

    feasible: bool
    focus: str = Field(default="", max_length=300)
    edits: list[EditOp] = Field(default_factory=list, max_length=3)


def parse_json_reply(text: str, model: type[M]) -> M:
    """The first JSON object in `text` that validates as `model`; ValueError if there is none."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    last_error = "no JSON object in the reply"
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
            return model.model_validate(value)
        except json.JSONDecodeError as exc:
            last_error = f"not valid JSON: {exc.msg}"
        except ValidationError as exc:
            last_error = f"JSON does not match the schema: {exc.errors(include_url=False)[0]['msg']}"
        start = text.find("{", start + 1)
    raise ValueError(last_error)


@lru_cache(maxsize=None)
def _response_format(role: str, model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAI `response_format` asking for JSON of `model`'s schema (guided decoding on vLLM)."""
    return {"type": "json_schema", "json_schema": {"name": f"{role}_reply", "schema": model.model_json_schema()}}


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class LLMClient:
    """Chat completions with bounded concurrency, retries and validated JSON replies."""

    def __init__(self, settings: LLMSettings, client: AsyncOpenAI | None = None):
        self.settings = settings
        self.client = client or AsyncOpenAI(
            base_url=settings.base_url, api_key=settings.api_key.get_secret_value(), max_retries=0,
            timeout=settings.timeout_s,
        )
        self._slots = asyncio.Semaphore(settings.concurrency)

    @property
    def model(self) -> str:
        return self.settings.model

    async def close(self) -> None:
        await self.client.close()

    def _delay(self, attempt: int, exc: Exception) -> float:
        hinted = _retry_after(exc)
        if hinted is not None:
            return min(hinted, self.settings.backoff_max_s)
        base = min(self.settings.backoff_max_s, self.settings.backoff_s * 2**attempt)
        return base * (0.5 + random.random() / 2)

    async def chat(self, role: str, chat_messages: list[dict[str, Any]], response_format: dict | None = None) -> str:
        """The reply text of one completion, after transport retries; `AgentFailure` when they run out."""
        settings = self.settings
        extra = {"response_format": response_format} if response_format and settings.structured_output else {}
        for attempt in range(settings.max_retries + 1):
            try:
                async with self._slots:
                    response = await self.client.chat.completions.create(
                        model=settings.model, messages=chat_messages, temperature=settings.temperature,
                        max_tokens=settings.max_tokens, timeout=settings.timeout_s, **extra,
                    )
            except openai.APIStatusError as exc:
                reason = {429: "rate_limited"}.get(exc.status_code, "server_error" if exc.status_code >= 500 else None)
                if reason is None:
                    LLM_REQUESTS.labels(role, "request_refused").inc()
                    raise AgentFailure("request_refused", f"{role}: HTTP {exc.status_code}") from None
                error: Exception = exc
            except openai.APIConnectionError as exc:
                reason = "timeout" if isinstance(exc, openai.APITimeoutError) else "connection_error"
                error = exc
            else:
                LLM_REQUESTS.labels(role, "ok").inc()
                choices = response.choices or []
                return (choices[0].message.content or "") if choices else ""
            LLM_REQUESTS.labels(role, reason).inc()
            if attempt == settings.max_retries:
                raise AgentFailure(reason, f"{role}: gave up after {attempt + 1} requests ({type(error).__name__})")
            await asyncio.sleep(self._delay(attempt, error))
        raise AssertionError("unreachable")

    async def structured(self, role: str, data: dict[str, Any], image: Image.Image | None, model: type[M]) -> M:
        """A reply validated as `model`, re-asking after invalid output; `AgentFailure("invalid_output")` at the end."""
        response_format = _response_format(role, model)
        last = ""
        for _ in range(self.settings.output_retries + 1):
            text = await self.chat(role, messages(role, data, image), response_format)
            try:
                return parse_json_reply(text, model)
            except ValueError as exc:
                LLM_REQUESTS.labels(role, "invalid_output").inc()
                last = str(exc)
        raise AgentFailure("invalid_output", f"{role}: {last}"[:300])


def _item_data(ctx: ItemContext, capability: str) -> dict[str, Any]:
    return {"capability": capability, "item_text": (ctx.item.text or "")[:2000],
            "item_metadata": truncated_json(ctx.item.metadata)}


class LLMPlanner:
    """Plans with a model; any capability may be tried (the model can answer "not feasible")."""

    def __init__(self, client: LLMClient):
        self.client = client
        self.backend = client.model

    def capabilities(self, ctx: ItemContext) -> None:
        return None

    async def plan(self, ctx: ItemContext, capability: str, attempt: int) -> TaskPlan:
        reply = await self.client.structured("planner", _item_data(ctx, capability), ctx.image, PlanReply)
        if not reply.feasible:
            raise AgentFailure("not_applicable", f"planner: {reply.focus}"[:300])
        return TaskPlan(focus=reply.focus, edits=reply.edits)


class LLMWriter:
    """Writes the question and answer with a model."""

    def __init__(self, client: LLMClient):
        self.client = client
        self.backend = client.model

    async def write(self, ctx: ItemContext, capability: str, plan: TaskPlan, image: Image.Image, attempt: int) -> Draft:
        data = _item_data(ctx, capability) | {"focus": plan.focus, "edits": describe(plan.edits)}
        return await self.client.structured("writer", data, image, Draft)


class LLMValidator:
    """Judges answerability with a model."""

    def __init__(self, client: LLMClient):
        self.client = client
        self.backend = client.model

    async def validate(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, draft: Draft) -> Verdict:
        data = {"question": draft.question, "options": draft.options, "answer": draft.answer,
                "answer_type": draft.answer_type}
        return await self.client.structured("validator", data, image, Verdict)


class LLMAnswerer:
    """Answers with a model in free text (graded like a policy's answer)."""

    def __init__(self, client: LLMClient):
        self.client = client
        self.backend = client.model

    async def answer(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, question: Question) -> str:
        data = {"question": question.question, "options": list(question.options or []),
                "answer_type": question.answer_type}
        return await self.client.chat("answerer", messages("answerer", data, image))
