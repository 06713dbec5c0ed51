"""An OpenAI-compatible chat server around a local vision-language model, with injectable faults.

Serves ``POST /v1/chat/completions`` (non-streaming), ``GET /v1/models`` and ``GET /health`` on
aiohttp, in front of a `dpe.policy` model (the tiny random policy by default). Requests that
arrive together are generated as one batch (`dpe.batching.MicroBatcher`). Each request
must carry exactly one image, as a ``data:`` URL (the server never fetches URLs); images go
through the blob store's validation. `FaultPlan` makes the server misbehave on a fixed cycle:
``timeout`` (answers after `delay_s`), ``server_error`` (HTTP 500), ``rate_limited`` (HTTP 429
with Retry-After), ``invalid_json`` (HTTP 200 whose content is not JSON). Tests and benchmarks
use it to exercise the OpenAI path over real HTTP; a tiny random model writes nonsense, which
the crew must turn into rejections with reasons.

Run it on its own: ``python -m dpe.endpoint.server --port 8000 --faults ok,server_error``.

Example:
    >>> async def ask(policy):                                             # doctest: +SKIP
    ...     async with LocalServer(LocalVLM(policy)) as server:
    ...         client = openai.AsyncOpenAI(base_url=server.url, api_key="unused")
    ...         return await client.models.list()
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import copy
import io
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiohttp import web
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dpe.batching import MicroBatcher
from dpe.blobstore import ImageLimits, ImageRejected, validate_image
from dpe.lifecycle import run_until_stopped
from dpe.policy.generation import SamplingParams, generate
from dpe.policy.model import Policy
from dpe.policy.prompts import render_prompt

Fault = Literal["ok", "timeout", "server_error", "rate_limited", "invalid_json"]


class FaultPlan(BaseModel):
    """Request n gets `cycle[n % len(cycle)]`."""

    model_config = ConfigDict(extra="forbid")

    cycle: list[Fault] = Field(default_factory=lambda: ["ok"], min_length=1)
    delay_s: float = Field(default=5.0, ge=0, description="How long a `timeout` request waits before answering.")
    retry_after_s: float = Field(default=0.05, ge=0, description="Retry-After of a `rate_limited` answer.")


class ServerConfig(BaseModel):
    """What the server is called, how much it generates, how it batches, how it fails."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = "dpe-tiny"
    max_new_tokens: int = Field(default=64, ge=1, description="Cap on any request's max_tokens.")
    max_prompt_tokens: int = Field(default=3500, ge=16, description="Longer prompts get HTTP 400, as on vLLM.")
    max_image_bytes: int = Field(default=8_000_000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    batch_window_s: float = Field(default=0.01, ge=0)
    faults: FaultPlan = Field(default_factory=FaultPlan)


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict[str, Any] | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[_Part]


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat completion request this server understands."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[_Message] = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=64, description="Completions for the prompt (sampled unless temperature 0).")
    seed: int | None = Field(default=None, description="Seeds the sampling of this request's batch.")


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400."""


class UnknownModel(LookupError):
    """A request for a model the server does not serve (HTTP 404, OpenAI's ``model_not_found``)."""


@dataclass(frozen=True)
class _Job:
    image: Image.Image
    conversation: list[dict[str, Any]]
    temperature: float
    max_new_tokens: int
    samples: int = 1
    seed: int | None = None

    @property
    def batch_key(self) -> tuple[float, int, int, int | None]:
        """Jobs generated together share their sampling (one `generate` call, one seed)."""
        return self.temperature, self.max_new_tokens, self.samples, self.seed


class LocalVLM:
    """Batched chat generation with a `dpe.policy` model."""

    def __init__(self, policy: Policy, config: ServerConfig | None = None):
        self.policy = policy
        self.config = config or ServerConfig()
        self.limits = ImageLimits(max_bytes=self.config.max_image_bytes)
        self._counting = copy.deepcopy(policy.tokenizer)
        """The tokenizer that measures prompts as requests arrive: a fast tokenizer's padding is state that each call
        sets, so measuring with the one a batch is being encoded with (in the batcher's thread) can unpad it."""
        self._batcher: MicroBatcher[_Job, str] = MicroBatcher(self._generate, self.config.batch_size,
                                                             self.config.batch_window_s)

    def job(self, request: ChatRequest) -> _Job:
        """Turn a request into a generation job; raises `BadRequest`."""
        images: list[Image.Image] = []
        conversation = []
        for message in request.messages:
            if isinstance(message.content, str):
                conversation.append({"role": message.role, "content": message.content})
                continue
            parts = []
            for part in message.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                else:
                    images.append(self._image(part.image_url or {}))
                    parts.append({"type": "image"})
            conversation.append({"role": message.role, "content": parts})
        if len(images) != 1:
            raise BadRequest(f"this server needs exactly one image per request, got {len(images)}")
        if request.n > 1 and request.temperature == 0:
            raise BadRequest("greedy decoding (temperature 0) gives one completion; set a temperature for n > 1")
        prompt = render_prompt(self.policy.processor, conversation)
        if len(self._counting(prompt).input_ids) > self.config.max_prompt_tokens:
            raise BadRequest(f"the prompt is longer than {self.config.max_prompt_tokens} tokens")
        wanted = request.max_completion_tokens or request.max_tokens or self.config.max_new_tokens
        return _Job(images[0], conversation, request.temperature, min(wanted, self.config.max_new_tokens),
                    request.n, request.seed)

    def _image(self, image_url: dict[str, Any]) -> Image.Image:
        url = str(image_url.get("url", ""))
        if not url.startswith("data:") or ";base64," not in url:
            raise BadRequest("images must be base64 data URLs; this server fetches nothing")
        try:
            data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"the image is not valid base64: {exc}") from None
        try:
            validate_image(data, self.limits)
        except ImageRejected as exc:
            raise BadRequest(f"image refused: {exc}") from None
        return Image.open(io.BytesIO(data)).convert("RGB")

    async def complete(self, job: _Job) -> list[str]:
        """The job's `samples` completions."""
        return await self._batcher.submit(job)

    async def close(self) -> None:
        await self._batcher.close()

    def _generate(self, jobs: list[_Job]) -> list[list[str]]:
        results: dict[int, list[str]] = {}
        ordered = sorted(enumerate(jobs), key=lambda ij: repr(ij[1].batch_key))
        for (temperature, max_new_tokens, samples, seed), members in itertools.groupby(
                ordered, key=lambda ij: ij[1].batch_key):
            members = list(members)
            outputs = generate(self.policy, [job.image for _, job in members], [job.conversation for _, job in members],
                               SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                              num_samples=samples, batch_size=self.config.batch_size), seed=seed)
            for (index, _), texts in zip(members, outputs):
                results[index] = texts
        return [results[index] for index in range(len(jobs))]


class ModelTable(Protocol):
    """The models a server answers for: `lookup` gives the name an answer reports and the model that makes it."""

    def lookup(self, name: str) -> tuple[str, LocalVLM]:
        """The served name and model for a request naming `name`; raises `UnknownModel`."""

    def names(self) -> list[str]:
        """What ``/v1/models`` lists."""

    async def close(self) -> None:
        """Stop every model's batcher."""


@dataclass(frozen=True)
class OneModel:
    """A table of one model, which answers whatever model a request names (as a single-model server does)."""

    vlm: LocalVLM

    def lookup(self, name: str) -> tuple[str, LocalVLM]:
        return self.vlm.config.model_name, self.vlm

    def names(self) -> list[str]:
        return [self.vlm.config.model_name]

    async def close(self) -> None:
        await self.vlm.close()


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                             headers=headers)


def _completion(model: str, contents: list[str]) -> web.Response:
    choices = [{"index": index, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
               for index, content in enumerate(contents)]
    return web.json_response({
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    })


@dataclass
class ServerStats:
    """What the server saw: chat requests, how many got each fault, the last parsed request bodies."""

    requests: int = 0
    faults: collections.Counter = field(default_factory=collections.Counter)
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))


STATS = web.AppKey("stats", ServerStats)


def create_web_app(models: ModelTable, config: ServerConfig) -> web.Application:
    """The aiohttp application answering for `models` (limits and faults from `config`); `app[STATS]` records what
    it saw."""
    counter = itertools.count()
    app = web.Application(client_max_size=config.max_image_bytes * 2)
    stats = app[STATS] = ServerStats()

    async def chat(request: web.Request) -> web.Response:
        number = next(counter)
        stats.requests = number + 1
        fault = config.faults.cycle[number % len(config.faults.cycle)]
        stats.faults[fault] += 1
        if fault == "server_error":
            return _error(500, "injected server error", "server_error")
        if fault == "rate_limited":
            return _error(429, "injected rate limit", "rate_limit_exceeded",
                          {"Retry-After": f"{config.faults.retry_after_s:g}"})
        try:
            body = await request.json()
            stats.recent.append(body)
            parsed = ChatRequest.model_validate(body)
            if parsed.stream:
                raise BadRequest("streaming is not supported by this server")
            served, vlm = models.lookup(parsed.model)
            job = vlm.job(parsed)
        except UnknownModel as exc:
            return _error(404, str(exc), "model_not_found")
        except (ValidationError, ValueError) as exc:
            return _error(400, str(exc)[:2000], "invalid_request_error")
        if fault == "invalid_json":
            return _completion(served, ["this is not JSON {"])
        if fault == "timeout":
            await asyncio.sleep(config.faults.delay_s)
        return _completion(served, await vlm.complete(job))

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "dpe"} for name in models.names()]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", listing)
    app.router.add_get("/health", health)
    return app


class LocalServer:
    """Runs the app on a loopback port in the current event loop; an async context manager. Serves one model, or
    the `ModelTable` given with its `ServerConfig`."""

    def __init__(self, models: LocalVLM | ModelTable, host: str = "127.0.0.1", port: int = 0,
                 config: ServerConfig | None = None):
        single = isinstance(models, LocalVLM)
        self.models = OneModel(models) if single else models
        self.host = host
        self.port = port
        self.app = create_web_app(self.models, models.config if single else config or ServerConfig())
        self._runner: web.AppRunner | None = None

    @property
    def stats(self) -> ServerStats:
        return self.app[STATS]

    @property
    def url(self) -> str:
        """The OpenAI base URL (``http://host:port/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> "LocalServer":
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.models.close()

    async def __aenter__(self) -> "LocalServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _policy(args: argparse.Namespace) -> Policy:
    from dpe.config import PlacementSettings
    from dpe.policy.config import TinyVLMConfig
    from dpe.policy.model import build_tiny_policy, load_policy

    if args.policy is None:
        return build_tiny_policy(TinyVLMConfig(corpus_items=args.corpus_items))
    return load_policy(args.policy, PlacementSettings(device=args.device, dtype=args.dtype))


async def _serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    config = ServerConfig(model_name=args.model_name, max_new_tokens=args.max_new_tokens,
                          faults=FaultPlan(cycle=args.faults.split(","), delay_s=args.delay))
    server = LocalServer(LocalVLM(_policy(args), config), args.host, args.port)
    async with server:
        print(f"serving {config.model_name} at {server.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command line: serve the tiny policy (or a policy folder) until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", default=None, help="Policy folder (default: a tiny random policy).")
    parser.add_argument("--corpus-items", type=int, default=20, help="Tokenizer corpus size of the tiny policy.")
    parser.add_argument("--device", default="auto", help="Where a policy folder runs: auto, cpu, cuda or cuda:N.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Its precision (auto: float32 for a tiny checkpoint, else its half precision).")
    parser.add_argument("--model-name", default="dpe-tiny")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--faults", default="ok", help="Comma-separated fault cycle, e.g. ok,server_error.")
    parser.add_argument("--delay", type=float, default=5.0, help="Seconds a `timeout` fault waits.")
    args = parser.parse_args(argv)
    run_until_stopped(lambda stop: _serve(args, stop))


if __name__ == "__main__":
    main()
