"""The policy server: the newest policy versions behind the OpenAI-compatible API of `dpe.endpoint.server`.

It follows the checkpoints topic in full (no consumer group: every replica serves every version), loads each newer
version from inside the checkpoint roots where ``placement`` puts it (a LoRA adapter merged onto its base) while
the current one keeps answering, and keeps the newest `keep_versions`. A request for ``model_name`` is answered by
the newest version, one for ``model_name@vN`` by version N, and every answer's ``model`` names the version that made
it, so an outcome is never attributed to another version. A version that is not loaded (not yet, or no longer) is
HTTP 404 (``model_not_found``) naming the loaded ones. Requests that arrive together are generated as one batch,
``n`` completions each. With ``policy.engine: vllm`` a vLLM server answers instead, and this service hot-loads each
version's LoRA adapter into it under the same names (`consumers.policy.vllm`).

Example:
    >>> table = VersionedModels(PolicyServerSettings())
    >>> table.lookup("dpe-policy")
    Traceback (most recent call last):
    ...
    dpe.endpoint.server.UnknownModel: policy version newest is not loaded here (loaded: none yet)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from dpe.bus.aio import AsyncPublisher
from dpe.bus.follower import Follower
from dpe.config import PlacementSettings, model_version
from dpe.endpoint.server import LocalServer, LocalVLM, ServerConfig, UnknownModel
from dpe.events import Checkpoint
from dpe.policy.checkpoints import REFUSALS, allowed_roots, load_checkpoint
from dpe.policy.model import Policy
from dpe.policy.placement import resolve_placement
from monitoring.metrics import POLICY_SERVER_LOAD_SECONDS, POLICY_SERVER_LOADS, POLICY_SERVER_VERSION
from consumers.policy.settings import PolicyServerConfig, PolicyServerSettings
from consumers.policy.vllm import NotHotLoadable, VllmAdapters

log = logging.getLogger(__name__)

SERVICE = "policy"
RETIRE_AFTER_S = 30.0
"""A version dropped from the table still finishes the answers in flight for this long."""


class VersionedModels:
    """The loaded policy versions, by version; the `dpe.endpoint.server.ModelTable` the server answers from."""

    def __init__(self, settings: PolicyServerSettings):
        self.settings = settings
        self.config = ServerConfig(model_name=settings.model_name, max_new_tokens=settings.max_new_tokens,
                                   batch_size=settings.batch_size, batch_window_s=settings.batch_window_s)
        self.loaded: dict[int, LocalVLM] = {}
        self._retiring: set[asyncio.Task] = set()

    @property
    def newest(self) -> int | None:
        return max(self.loaded, default=None)

    def lookup(self, name: str) -> tuple[str, LocalVLM]:
        """``model_name``: the newest version; ``model_name@vN``: version N; anything else is unknown."""
        try:
            base, version = model_version(name)
        except ValueError:
            base = ""
        if base != self.settings.model_name:
            raise UnknownModel(f"model {name!r} is not served here: ask for {self.settings.model_name} (the newest "
                               f"version) or {self.settings.model_name}@vN (version N)")
        wanted = self.newest if version is None else version
        if wanted not in self.loaded:
            shown = ", ".join(map(str, sorted(self.loaded))) or "none yet"
            raise UnknownModel(f"policy version {'newest' if wanted is None else wanted} is not loaded here "
                               f"(loaded: {shown})")
        return self.settings.versioned(wanted), self.loaded[wanted]

    def names(self) -> list[str]:
        loaded = [self.settings.versioned(version) for version in sorted(self.loaded)]
        return [self.settings.model_name, *loaded] if loaded else []

    def add(self, version: int, policy: Policy) -> None:
        """Serve `policy` as `version`; the oldest versions beyond `keep_versions` retire."""
        self.loaded[version] = LocalVLM(policy, self.config)
        for old in sorted(self.loaded)[:-self.settings.keep_versions]:
            retiring = asyncio.create_task(_retire(self.loaded.pop(old)))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for vlm in self.loaded.values():
            await vlm.close()


async def _retire(vlm: LocalVLM) -> None:
    try:
        await asyncio.sleep(RETIRE_AFTER_S)
    finally:
        await vlm.close()


class LocalEngine:
    """The ``local`` engine: each version is loaded in this process, where ``placement`` says, into the table the
    HTTP server answers from."""

    def __init__(self, models: VersionedModels, placement: PlacementSettings):
        self.models = models
        self.placement = placement

    @property
    def newest(self) -> int | None:
        return self.models.newest

    async def load(self, version: int, uri: str, roots: Sequence[Path] | None) -> None:
        self.models.add(version, await asyncio.to_thread(load_checkpoint, uri, roots=roots, placement=self.placement))


class Engine(Protocol):
    """What serves the loaded versions: `LocalEngine`, or `consumers.policy.vllm.VllmAdapters`."""

    @property
    def newest(self) -> int | None:
        """The newest version served (None: none yet)."""

    async def load(self, version: int, uri: str, roots: Sequence[Path] | None) -> None:
        """Serve the checkpoint at `uri` as `version` (refused outside `roots`, when given)."""


NOT_LOADABLE = (*REFUSALS, NotHotLoadable)
"""Checkpoints refused for what they are, not for a failure while loading them."""


class CheckpointLoader:
    """Loads each newer announced checkpoint into the engine (one at a time; the current version keeps answering)."""

    def __init__(self, settings: PolicyServerConfig, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.roots = allowed_roots(settings)

    async def load(self, version: int, uri: str, *, roots: Sequence[Path] | None) -> None:
        """Load `uri` as `version` and serve it (raises what the engine raises)."""
        started = time.perf_counter()
        await self.engine.load(version, uri, roots)
        POLICY_SERVER_LOAD_SECONDS.observe(time.perf_counter() - started)
        POLICY_SERVER_LOADS.labels("loaded").inc()
        POLICY_SERVER_VERSION.set(self.engine.newest)
        log.info("serving policy v%d (%s), loaded in %.1fs", version, uri, time.perf_counter() - started)

    async def on_checkpoints(self, batch: Sequence[Checkpoint]) -> None:
        """Handler of the followed checkpoints: the newest `keep_versions` that load, of those newer than what is
        served, newest first (after a restart the versions just before the newest are served too, for a caller
        that has not graded them yet). A refused or broken checkpoint is logged and the next newest tried; the
        evaluator, which owns the topic, dead-letters it."""
        served = self.engine.newest
        newer = [checkpoint for checkpoint in batch if served is None or checkpoint.policy_version > served]
        loaded = 0
        for checkpoint in sorted(newer, key=lambda checkpoint: checkpoint.policy_version, reverse=True):
            if loaded == self.settings.policy.keep_versions:
                return
            try:
                await self.load(checkpoint.policy_version, checkpoint.uri, roots=self.roots)
                loaded += 1
            except NOT_LOADABLE as refused:
                POLICY_SERVER_LOADS.labels("refused").inc()
                log.error("refusing checkpoint v%d: %s", checkpoint.policy_version, refused)
            except Exception as error:  # noqa: BLE001 - a bad checkpoint must not stop serving the current version
                POLICY_SERVER_LOADS.labels("failed").inc()
                log.error("cannot load checkpoint v%d at %s (%s)", checkpoint.policy_version, checkpoint.uri, error)


async def serve_policy(settings: PolicyServerConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set: version 0 from ``policy.base_policy`` (if set), then each announced checkpoint;
    with the vLLM engine, load each checkpoint's adapter into vLLM, which serves them."""
    if settings.policy.engine == "vllm":
        adapters = VllmAdapters(settings.policy)
        try:
            await _follow(settings, CheckpointLoader(settings, adapters), stop, ready)
        finally:
            await adapters.close()
        return
    resolve_placement(settings.placement)
    models = VersionedModels(settings.policy)
    loader = CheckpointLoader(settings, LocalEngine(models, settings.placement))
    if settings.policy.base_policy:
        await loader.load(0, settings.policy.base_policy, roots=None)
    async with LocalServer(models, settings.policy.host, settings.policy.port, models.config) as server:
        log.info("policy server at %s", server.url)
        await _follow(settings, loader, stop, ready)


async def _follow(settings: PolicyServerConfig, loader: CheckpointLoader, stop: asyncio.Event,
                  ready: asyncio.Event | None) -> None:
    """Hand every announced checkpoint to `loader` until `stop` is set (`ready` is set once following)."""
    async with AsyncPublisher(settings, producer_name=SERVICE) as publisher:
        follower = await Follower(settings, publisher, {Checkpoint: loader.on_checkpoints}, service=SERVICE).start()
        try:
            if ready is not None:
                ready.set()
            await follower.run(stop)
        finally:
            await follower.stop()
