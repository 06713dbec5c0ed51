"""One client for OpenAI-compatible chat endpoints, with one retry and error policy for every caller.

The agents' roles (async: `EndpointClient.chat`, `EndpointClient.structured`), the evaluator's judge
and the auditor's references (threads: `EndpointClient.chat_sync`) all ask through `EndpointClient`:

- at most `concurrency` requests in flight, each with a timeout of `timeout_s`;
- a timeout, a lost connection, HTTP 429 or 5xx is retried up to `max_retries` times, after the
  server's Retry-After when it sends one, else after an exponential backoff with jitter
  (`backoff_s`, doubling, at most `backoff_max_s`); any other HTTP error is not retried;
- a structured reply must hold a JSON object that validates against a pydantic model, else the
  request is asked again, up to `output_retries` times.

When the policy gives up it raises `EndpointFailure` with a bounded reason (``timeout``,
``rate_limited``, ``server_error``, ``connection_error``, ``request_refused``, ``invalid_output``),
which each caller maps to its own outcome (a rejection, a fallback, an abstention). Every request
is counted in ``dpe_agent_llm_requests_total`` by role and result. Images travel as PNG data URLs
inside the chat message.

Example:
    >>> from PIL import Image
    >>> image_data_url(Image.new("RGB", (2, 2))).startswith("data:image/png;base64,")
    True
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import random
import threading
import time
from functools import lru_cache
from typing import Any, Literal, TypeVar

import httpx2
import openai
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion
from PIL import Image
from pydantic import BaseModel, ValidationError

from dpe.endpoint.settings import EndpointSettings
from monitoring.metrics import LLM_REQUESTS

M = TypeVar("M", bound=BaseModel)

Messages = list[dict[str, Any]]
"""Chat messages in the OpenAI format."""

EndpointReason = Literal[
    "timeout", "rate_limited", "server_error", "connection_error", "request_refused", "invalid_output"
]
"""Why the endpoint gave no usable reply."""

TransportError = openai.APIStatusError | openai.APIConnectionError
"""A request that got an HTTP error, or no answer at all."""
_TRANSPORT_ERRORS = (openai.APIStatusError, openai.APIConnectionError)


class EndpointFailure(Exception):
    """The endpoint gave no usable reply within the policy; `reason` is bounded, `detail` says more.

    >>> str(EndpointFailure("timeout", "judge: gave up after 2 requests (APITimeoutError)"))
    'timeout: judge: gave up after 2 requests (APITimeoutError)'
    """

    def __init__(self, reason: EndpointReason, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status
        """The HTTP status of the last answer, if there was one."""


def image_data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(image: Image.Image) -> dict[str, Any]:
    """The image as one content part of a chat message.

    >>> image_part(Image.new("RGB", (2, 2)))["type"]
    'image_url'
    """
    return {"type": "image_url", "image_url": {"url": image_data_url(image)}}


def parse_json_reply(text: str, model: type[M]) -> M:
    """The first JSON object in `text` that validates as `model`; ValueError if there is none.

    >>> class Count(BaseModel):
    ...     n: int
    >>> parse_json_reply('Sure! ```json\\n{"n": 3}\\n```', Count).n
    3
    >>> parse_json_reply('{"n": "three"}', Count)
    Traceback (most recent call last):
    ...
    ValueError: JSON does not match the schema: Input should be a valid integer, unable to parse string as an integer
    """
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


def failure_reason(error: TransportError) -> EndpointReason:
    """The reason code of a failed request; only ``request_refused`` is never retried.

    >>> request = httpx2.Request("POST", "http://endpoint/v1/chat/completions")
    >>> failure_reason(openai.APITimeoutError(request=request))
    'timeout'
    >>> failure_reason(openai.APIStatusError("", response=httpx2.Response(503, request=request), body=None))
    'server_error'
    """
    if isinstance(error, openai.APIConnectionError):
        return "timeout" if isinstance(error, openai.APITimeoutError) else "connection_error"
    if error.status_code == 429:
        return "rate_limited"
    return "server_error" if error.status_code >= 500 else "request_refused"


def _described(error: TransportError) -> str:
    return f"HTTP {error.status_code}" if isinstance(error, openai.APIStatusError) else type(error).__name__


def _retry_after_s(error: TransportError) -> float | None:
    """The server's Retry-After in seconds, when it sent one as a number."""
    if not isinstance(error, openai.APIStatusError):
        return None
    try:
        return float(error.response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


@lru_cache(maxsize=None)
def _response_format(role: str, model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAI `response_format` asking for JSON of `model`'s schema (guided decoding on vLLM)."""
    return {"type": "json_schema", "json_schema": {"name": f"{role}_reply", "schema": model.model_json_schema()}}


def _answered(role: str, response: ChatCompletion) -> ChatCompletion:
    """`response`, counted as an ``ok`` request."""
    LLM_REQUESTS.labels(role, "ok").inc()
    return response


def _reply_text(response: ChatCompletion) -> str:
    """The text of a completion ('' when it has none)."""
    return (response.choices[0].message.content or "") if response.choices else ""


class EndpointClient:
    """Chat completions from one endpoint, from async code or from threads, under one retry policy.

    `role` names the caller in the request metrics (``writer``, ``judge``, a reference's name).
    `http_client` lets a test serve the HTTP edge of the synchronous calls itself.

    Example:
        >>> client = EndpointClient(EndpointSettings(base_url="http://vllm:8000/v1", model="qwen"))
        >>> client.model
        'qwen'
    """

    def __init__(self, settings: EndpointSettings, http_client: httpx2.Client | None = None) -> None:
        self.settings = settings
        connection: dict[str, Any] = dict(
            base_url=settings.base_url, api_key=settings.api_key.get_secret_value(), timeout=settings.timeout_s,
            max_retries=0,
        )
        self._async_openai = AsyncOpenAI(**connection)
        self._openai = OpenAI(**connection, http_client=http_client)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._thread_slots = threading.Semaphore(settings.concurrency)

    @property
    def model(self) -> str:
        """The served model's name."""
        return self.settings.model

    async def close(self) -> None:
        """Close the connections."""
        await self._async_openai.close()
        self._openai.close()

    def close_sync(self) -> None:
        """Close the connections of the synchronous calls (a caller that never used the async ones)."""
        self._openai.close()

    def model_names(self) -> list[str]:
        """The models the endpoint lists (``GET /v1/models``), asked once; `EndpointFailure` when that fails."""
        try:
            return [model.id for model in self._openai.models.list()]
        except _TRANSPORT_ERRORS as error:
            raise EndpointFailure(failure_reason(error), f"listing models: {_described(error)}") from None

    async def chat(self, role: str, messages: Messages, response_format: dict[str, Any] | None = None) -> str:
        """The reply text of one completion, retried as the policy says; `EndpointFailure` when it gives up."""
        request = self._request(messages, response_format)
        for attempt in itertools.count():
            try:
                async with self._slots:
                    response = await self._async_openai.chat.completions.create(**request)
            except _TRANSPORT_ERRORS as error:
                await asyncio.sleep(self._retry_delay_s(role, attempt, error))
            else:
                return _reply_text(_answered(role, response))

    def chat_sync(self, role: str, messages: Messages) -> str:
        """`chat` for synchronous callers (threads): the same requests, retries and failures."""
        return _reply_text(self.completion_sync(role, messages))

    def completion_sync(self, role: str, messages: Messages, **overrides: Any) -> ChatCompletion:
        """The whole completion of one request from a thread, with the request's fields in `overrides` (``model``,
        ``n``, ``temperature``, ``seed``...) over the settings'; retried as the policy says, `EndpointFailure` when
        it gives up."""
        request = self._request(messages, None) | overrides
        for attempt in itertools.count():
            try:
                with self._thread_slots:
                    return _answered(role, self._openai.chat.completions.create(**request))
            except _TRANSPORT_ERRORS as error:
                time.sleep(self._retry_delay_s(role, attempt, error))

    async def structured(self, role: str, messages: Messages, model: type[M]) -> M:
        """A reply validated as `model`, asked again after invalid output; `EndpointFailure` when it gives up."""
        last = ""
        for _ in range(self.settings.output_retries + 1):
            text = await self.chat(role, messages, _response_format(role, model))
            try:
                return parse_json_reply(text, model)
            except ValueError as exc:
                LLM_REQUESTS.labels(role, "invalid_output").inc()
                last = str(exc)
        raise EndpointFailure("invalid_output", f"{role}: {last}"[:300])

    def _request(self, messages: Messages, response_format: dict[str, Any] | None) -> dict[str, Any]:
        """The arguments of one chat completion request."""
        settings = self.settings
        structured = {"response_format": response_format} if response_format and settings.structured_output else {}
        return dict(model=settings.model, messages=messages, temperature=settings.temperature,
                    max_tokens=settings.max_tokens, **structured)

    def _retry_delay_s(self, role: str, attempt: int, error: TransportError) -> float:
        """Count the failed request `attempt` (0 first); the wait before the next, or `EndpointFailure` if none."""
        reason = failure_reason(error)
        LLM_REQUESTS.labels(role, reason).inc()
        status = error.status_code if isinstance(error, openai.APIStatusError) else None
        if reason == "request_refused":
            raise EndpointFailure(reason, f"{role}: {_described(error)}", status) from None
        if attempt >= self.settings.max_retries:
            detail = f"{role}: gave up after {attempt + 1} requests ({_described(error)})"
            raise EndpointFailure(reason, detail, status) from None
        hinted = _retry_after_s(error)
        if hinted is not None:
            return min(hinted, self.settings.backoff_max_s)
        backoff = min(self.settings.backoff_max_s, self.settings.backoff_s * 2**attempt)
        return backoff * (0.5 + random.random() / 2)
