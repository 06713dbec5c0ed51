"""Hostile input at every door, against the real broker: the whole matrix in one place.

Ingest (`dpe ingest`'s `Ingestor` over a folder and a manifest): every hostile input ends as one outcome with
its reason code and is not published; odd but valid images are published as decoded; the valid input behind
them all is published.

Records: every topic a service consumes (`dpe stages`, plus the weakness stream's internal report topic). Each
service runs once: it handles a valid record on every topic it consumes (the warm-up), gets every hostile record
on each of them with a valid record behind, and is stopped once those are handled. A cell then says what became of
one hostile record:

- DEAD: the service dead-lettered it, with its origin (topic, partition, offset), error class and message;
- LOGGED: the service follows the topic without a consumer group, so it skipped the record with the reason in its
  log; the topic's owning group dead-letters it (the evaluator's checkpoints, the trainer's accepted samples);
- SKIPPED: the service only looks at the topic (read-only) and skipped it; the owning group dead-letters it;
- HANDLED: legal input (an unknown capability where capabilities are open, an announcement never loaded).

Per service and topic, the valid record behind the hostile ones was handled; per service, it is still running and
its memory (RSS) grew by less than `MAX_RSS_GROWTH` over the batch. `dpe eval`, which reads the checkpoints topic
for the newest one, finds it behind the whole batch.

The trainer's doors are read as `run_trainer` reads them (a `RoundCollector` on the accepted samples, the
base's `announce_if_missing` on the checkpoints) without a GRPO round, which no input reaches. Deeper checks of
some cells live beside their service: `test_bus.py` (every codec error class, strict types, truncated letters of
oversized records), `test_weakness_stream.py::test_bad_events_are_dead_lettered_and_the_stream_goes_on` (a version
far ahead), `test_checkpoint_roots.py` (symlinked and ``file://`` checkpoint URIs), `test_ingest.py` (URL roots,
CLI reports) and `test_blobstore.py` (bombs refused before any pixel is decoded).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, AsyncIterator, TypeVar

import psutil
import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image

from consumers.agents.service import AgentWorker
from dpe.blobstore import BlobStore
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.config import with_overrides
from dpe.events import (
    AcceptedSample,
    AuditLead,
    AuditorCheckpoint,
    BlobRef,
    CapabilityDiagnosis,
    CapabilityWeakness,
    Checkpoint,
    DeadLetter,
    Diagnosis,
    Divergence,
    EvalOutcome,
    Event,
    FailedItem,
    FailureType,
    FailureTypes,
    QuotaPlan,
    RejectedSample,
    SampleBody,
    UnlabeledItem,
    WeaknessSnapshot,
)
from dpe.policy.checkpoints import latest_checkpoint
from dpe.policy.config import TinyVLMConfig
from dpe.policy.model import build_tiny_policy
from dpe.recent import RecentIds
from dpe.settings import Settings
from dpe.topics import topic_for
from producers.auditor.service import serve_auditor
from producers.auditor.settings import CHECKPOINTS
from producers.evaluator.service import serve_evaluator
from producers.ingest.paths import Roots
from producers.ingest.service import PUBLISHED, Ingestor, Outcome
from producers.ingest.sources import Input, folder_entries, manifest_entries, synthetic_entries
from streams.contracts import CapabilityReport, PartialWeakness, partial_topic
from tests.agent_helpers import plan, png, read_all
from tests.oracle import AnswerKeyAuditor, OracleAnswerer
from tests.test_auditor import audit_settings, scene_item
from tests.test_blobstore import bilevel_png
from tests.test_ingest import noisy
from tests.test_weakness_stream import Watch, divergence, follow, outcome, start_worker, stream_settings  # noqa: F401
from trainer.rounds import RoundCollector
from trainer.service import announce_if_missing
from trainer.task import PolicyTask

pytestmark = pytest.mark.timeout(300)

E = TypeVar("E", bound=Event)

MAX_RSS_GROWTH = 128 << 20
"""Most a service's resident memory may grow over the hostile batch (6 MB records included). The agents read two
topics in one group (unlabeled items and audit leads), so one fetch may bring two 6 MB records at once: 71-102 MiB
measured for them (29-41 MiB with one topic), at most 31 MiB for the others."""
SETTLE_S = 90.0
"""Longest wait for a service to handle the valid records behind the batch and file its dead letters."""


class Fate(str, Enum):
    """What becomes of a hostile record at a service (see the module docstring)."""

    DEAD = "dead-lettered"
    LOGGED = "skipped, reason logged"
    SKIPPED = "skipped (read-only)"
    HANDLED = "handled"


@dataclass(frozen=True)
class Expect:
    """A cell's expected fate, with the dead letter's error class for DEAD."""

    fate: Fate
    error_class: str | None = None


UNDECODABLE: dict[str, str] = {
    "oversized": "OversizedEvent",
    "broken_json": "MalformedJSON",
    "json_array": "MalformedJSON",
    "json_null": "MalformedJSON",
    "no_value": "EmptyMessage",
    "future_schema": "UnsupportedSchemaVersion",
    "nan": "SchemaViolation",
    "infinity": "SchemaViolation",
    "wrong_type": "SchemaViolation",
}
"""The rows every topic gets, in the order they are sent, with the error class the codec gives each. The 6 MB
record comes first: a fetch then brings it alone, which a reader must not take for the end of the topic."""
CHECKPOINT_ROWS = ("outside_roots", "pickled_weights")
"""Rows of the checkpoints topic: valid events naming a folder outside the roots, or with pickled weights only."""


@dataclass(frozen=True)
class Shape:
    """Where a model's hostile variants go: a number (made NaN or infinite), a field given a string, and the
    capability (path and unknown value), for models that name one."""

    number: tuple[str, ...]
    typed: tuple[str, ...]
    capability: tuple[tuple[str, ...], Any] | None = None


SHAPES: dict[type[Event], Shape] = {
    EvalOutcome: Shape(("score",), ("policy_version",), (("capability",), "astrology")),
    Divergence: Shape(("consensus_strength",), ("policy_version",), (("capability",), "astrology")),
    AuditLead: Shape(("divergence", "consensus_strength"), ("divergence", "policy_version"),
                     (("divergence", "capability"), "astrology")),
    FailureTypes: Shape(("audited_probes",), ("policy_version",),
                        (("types", "counting/all/mirror/too_high", "capability"), "astrology")),
    PartialWeakness: Shape(("reports", "spatial", "weakness", "trend"), ("seq",)),
    UnlabeledItem: Shape(("image", "width"), ("image", "size_bytes"), (("metadata", "capabilities"), ["astrology"])),
    QuotaPlan: Shape(("weights", "counting"), ("budget",), (("quotas",), {"astrology": 1})),
    AcceptedSample: Shape(("body", "tolerance"), ("policy_version",), (("capability",), "astrology")),
    Checkpoint: Shape(("metrics", "loss"), ("policy_version",)),
    AuditorCheckpoint: Shape(("metrics", "reward_mean"), ("target_version",)),
    Diagnosis: Shape(("capabilities", "counting", "error_mix", "other"), ("policy_version",),
                     (("capabilities",), {"astrology": {"graded": 1, "wrong": 0, "error_mix": {}, "failures": [],
                                                         "analysis": ""}})),
}


@dataclass(frozen=True)
class Door:
    """A topic one service consumes: the fate of a record that does not decode there (how the service reads the
    topic decides it), who signs the service's dead letters, and the fates of the topic's own rows."""

    service: str
    model: type[Event]
    undecodable: Fate
    producer: str
    special: Mapping[str, Expect] = field(default_factory=dict)

    @property
    def rows(self) -> list[str]:
        """Every hostile row this door gets."""
        shape = SHAPES[self.model]
        return [*UNDECODABLE, *(["unknown_capability"] if shape.capability else []),
                *(CHECKPOINT_ROWS if issubclass(self.model, Checkpoint) else [])]

    def expect(self, row: str) -> Expect:
        if row in self.special:
            return self.special[row]
        return Expect(self.undecodable, UNDECODABLE[row] if self.undecodable is Fate.DEAD else None)

    def __str__(self) -> str:
        return f"{self.service}:{self.model.__name__}"


def dead(error_class: str) -> Expect:
    return Expect(Fate.DEAD, error_class)


REFUSED_CHECKPOINTS = {"outside_roots": dead("CheckpointOutsideRoots"), "pickled_weights": dead("PickledWeights")}
HANDLED = Expect(Fate.HANDLED)

DOORS: tuple[Door, ...] = (
    Door("weakness", EvalOutcome, Fate.DEAD, "weakness", {"unknown_capability": dead("UnknownCapability")}),
    Door("weakness", Divergence, Fate.DEAD, "weakness", {"unknown_capability": dead("UnknownCapability")}),
    Door("weakness", PartialWeakness, Fate.DEAD, "weakness"),
    Door("evaluator", Checkpoint, Fate.DEAD, "evaluator", REFUSED_CHECKPOINTS),
    Door("auditor", UnlabeledItem, Fate.DEAD, "auditor", {"unknown_capability": dead("UnknownCapability")}),
    Door("auditor", Checkpoint, Fate.SKIPPED, "auditor", REFUSED_CHECKPOINTS),
    Door("auditor", AuditorCheckpoint, Fate.SKIPPED, "auditor", REFUSED_CHECKPOINTS),
    Door("agents", UnlabeledItem, Fate.DEAD, "agents", {"unknown_capability": HANDLED}),
    Door("agents", AuditLead, Fate.DEAD, "agents", {"unknown_capability": dead("UnknownCapability")}),
    Door("agents", FailureTypes, Fate.DEAD, "agents", {"unknown_capability": HANDLED}),
    Door("agents", QuotaPlan, Fate.DEAD, "agents", {"unknown_capability": HANDLED}),
    Door("agents", Diagnosis, Fate.DEAD, "agents", {"unknown_capability": HANDLED}),
    Door("agents", AcceptedSample, Fate.LOGGED, "agents", {"unknown_capability": HANDLED}),
    Door("agents", Checkpoint, Fate.LOGGED, "agents",
         {row: Expect(Fate.LOGGED) for row in CHECKPOINT_ROWS}),
    Door("trainer", AcceptedSample, Fate.DEAD, "trainer", {"unknown_capability": HANDLED}),
    Door("trainer", Checkpoint, Fate.SKIPPED, "trainer", {row: HANDLED for row in CHECKPOINT_ROWS}),
)
SERVICES = tuple(dict.fromkeys(door.service for door in DOORS))
CELLS = [pytest.param(door, row, id=f"{door}-{row}") for door in DOORS for row in door.rows]


# --- hostile records -------------------------------------------------------------------------------------------


def _replaced(document: dict, path: Sequence[str], value: Any) -> dict:
    """A deep copy of `document` with the field at `path` set to `value`."""
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def _json(document: Any) -> bytes:
    """`document` as JSON, NaN and infinity written as the literals a careless writer emits."""
    return json.dumps(document, allow_nan=True).encode()


def hostile_values(event: Event) -> dict[str, bytes | None]:
    """The undecodable variants of a valid event in the order of `UNDECODABLE` (and its unknown-capability one, if
    its model names one)."""
    shape = SHAPES[type(event)]
    document = json.loads(event.model_dump_json())
    values: dict[str, bytes | None] = {
        "oversized": _json(document | {"padding": "x" * (6 << 20)}),
        "broken_json": json.dumps(document).encode()[:-9],
        "json_array": _json([document]),
        "json_null": b"null",
        "no_value": None,
        "future_schema": _json(document | {"schema_version": 99}),
        "nan": _json(_replaced(document, shape.number, math.nan)),
        "infinity": _json(_replaced(document, shape.number, math.inf)),
        "wrong_type": _json(_replaced(document, shape.typed, "7")),
    }
    if shape.capability is not None:
        values["unknown_capability"] = _json(_replaced(document, *shape.capability))
    return values


@dataclass(frozen=True)
class Sent:
    """Where one record went, and what a log line about it names (for records a service skips)."""

    topic: str
    partition: int
    offset: int
    mark: str

    @property
    def origin(self) -> tuple[str, int, int]:
        return self.topic, self.partition, self.offset


Send = Callable[[str, bytes, bytes | None], Awaitable[Sent]]


def topic_of(model: type[Event], settings: Settings) -> str:
    prefix = settings.kafka.topic_prefix
    return partial_topic(prefix) if model is PartialWeakness else topic_for(model, prefix)


@asynccontextmanager
async def raw_producer(settings: Settings) -> AsyncIterator[Send]:
    """Sends raw records (any bytes, or none) with Kafka's default partitioner, as a careless writer would."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, max_request_size=8 << 20)
    await producer.start()

    async def send(topic: str, key: bytes, value: bytes | None) -> Sent:
        meta = await producer.send_and_wait(topic, value, key=key)
        return Sent(topic, meta.partition, meta.offset, f"{topic}[{meta.partition}]@{meta.offset}")

    try:
        yield send
    finally:
        await producer.stop()


async def send_event(send: Send, settings: Settings, event: Event) -> Sent:
    return await send(topic_of(type(event), settings), event.key().encode(), event.model_dump_json().encode())


async def send_hostile(send: Send, settings: Settings, base: Event,
                       refused: Mapping[str, Checkpoint] = {}) -> dict[tuple[type[Event], str], Sent]:
    """Every hostile record of `base`'s topic, keyed like `base`, then the `refused` checkpoints: valid events
    that no loader may load (a log line about one names its URI)."""
    model, topic, key = type(base), topic_of(type(base), settings), base.key().encode()
    sent = {(model, row): await send(topic, key, value) for row, value in hostile_values(base).items()}
    for row, checkpoint in refused.items():
        record = await send_event(send, settings, checkpoint)
        sent[(model, row)] = Sent(record.topic, record.partition, record.offset, checkpoint.uri)
    return sent


# --- one run per service -----------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one service did with its batch."""

    hostile: dict[tuple[type[Event], str], Sent]
    letters: list[DeadLetter]
    logs: list[str]
    handled: dict[type[Event], bool]
    alive: bool
    rss_growth: int


def rss(pid: int | None = None) -> int:
    return psutil.Process(pid).memory_info().rss


class Tail:
    """Every event of some topics from their beginning, read as it comes (no group, read-only)."""

    def __init__(self, subscriber: AsyncSubscriber):
        self.subscriber = subscriber
        self.events: list[Event] = []

    def of(self, model: type[E]) -> list[E]:
        return [event for event in self.events if isinstance(event, model)]

    async def until(self, done: Callable[[], bool], timeout_s: float = SETTLE_S) -> bool:
        """Read until `done()`; False when `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            self.events += [delivery.event for delivery in await self.subscriber.fetch(timeout_ms=100)]
        return True


@asynccontextmanager
async def tailing(settings: Settings, models: Sequence[type[Event]]) -> AsyncIterator[Tail]:
    async with AsyncPublisher(settings, producer_name="test") as publisher, AsyncSubscriber(
        settings, models, group_id=None, service="test", publisher=publisher, subscribe=False, read_only=True
    ) as subscriber:
        await subscriber.assign_all()
        yield Tail(subscriber)


def lettered(sent: Mapping[tuple[type[Event], str], Sent], service: str) -> Callable[[Sequence[DeadLetter]], bool]:
    """Whether `letters` hold one for every record `service` must dead-letter."""
    wanted = {sent[(door.model, row)].origin for door in DOORS if door.service == service for row in door.rows
              if door.expect(row).fate is Fate.DEAD}
    return lambda letters: wanted <= {origin(letter) for letter in letters}


def origin(letter: DeadLetter) -> tuple[str, int | None, int | None]:
    return letter.origin_topic, letter.origin_partition, letter.origin_offset


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny policy: what the trainer announces."""
    folder = tmp_path_factory.mktemp("policy") / "v1"
    build_tiny_policy(TinyVLMConfig(corpus_items=5)).save(folder)
    return folder


@dataclass(frozen=True)
class Folders:
    """Checkpoint folders of one service's run: inside its roots, outside them, and one with pickled weights only."""

    inside: Path
    outside: Path
    pickled: Path

    def refused(self, policy_version: int, model: type[Checkpoint] = Checkpoint) -> dict[str, Checkpoint]:
        """The checkpoints (announced as `model`) every loader refuses, at versions from `policy_version` on."""
        return {"outside_roots": model(policy_version=policy_version, uri=str(self.outside)),
                "pickled_weights": model(policy_version=policy_version + 1, uri=f"file://{self.pickled}")}


def checkpoint_folders(request: pytest.FixtureRequest, settings: Settings, root: str = "checkpoints") -> Folders:
    """The tiny policy copied inside the run's checkpoint root `root` (under its home), outside the roots, and
    inside without its safetensors but with a pickle."""
    policy, scratch = request.getfixturevalue("policy_folder"), request.getfixturevalue("tmp_path")
    roots = settings.home / root
    inside = shutil.copytree(policy, roots / "v1")
    pickled = shutil.copytree(policy, roots / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": "would run code as they load"}))
    return Folders(inside, shutil.copytree(policy, scratch / "elsewhere" / root / "v1"), pickled)


def capture_logs(request: pytest.FixtureRequest) -> pytest.LogCaptureFixture:
    caplog = request.getfixturevalue("caplog")
    caplog.set_level(logging.INFO)
    return caplog


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


async def run_weakness(request: pytest.FixtureRequest) -> Run:
    """A `dpe serve weakness` process; evidence and another worker's reports in, snapshots and dead letters
    watched."""
    settings, _ = request.getfixturevalue("stream_settings")
    worker = request.getfixturevalue("start_worker")()
    warm = {EvalOutcome: outcome(1, "warm", False), Divergence: divergence(1, "p-warm", "color"),
            PartialWeakness: report(10**6, 0.25)}
    behind = {EvalOutcome: outcome(1, "behind", True), Divergence: divergence(1, "p-behind", "color"),
              PartialWeakness: report(10**6 + 2, 0.75)}
    hostile = {EvalOutcome: outcome(1, "hostile", False), Divergence: divergence(1, "p-hostile", "color"),
               PartialWeakness: report(10**6 + 1, 0.5)}
    async with AsyncPublisher(settings) as publisher, follow(settings, publisher) as subscriber, \
            raw_producer(settings) as send:
        watch = Watch(subscriber)
        for model in (EvalOutcome, Divergence):
            await send_event(send, settings, warm[model])
        await watched(watch, evidence(1, 1))
        await send_event(send, settings, warm[PartialWeakness])
        await watched(watch, reported(warm[PartialWeakness]))
        before = rss(worker.proc.pid)
        sent = {}
        for event in hostile.values():
            sent |= await send_hostile(send, settings, event)
        for event in behind.values():
            await send_event(send, settings, event)
        handled = {EvalOutcome: await watched(watch, lambda w: latest(w).capabilities["counting"].events == 2),
                   Divergence: await watched(watch, lambda w: latest(w).capabilities["color"].events == 2),
                   PartialWeakness: await watched(watch, reported(behind[PartialWeakness]))}
        complete = lettered(sent, "weakness")
        await watched(watch, lambda w: complete(w.letters))
        return Run(sent, watch.letters, [], handled, worker.proc.poll() is None, rss(worker.proc.pid) - before)


def report(revision: int, error_rate: float) -> PartialWeakness:
    """Another worker's report of the spatial capability, at `revision`."""
    weakness = CapabilityWeakness(error_rate=error_rate, effective_n=4.0, ci_low=0.1, ci_high=0.9, events=4)
    spatial = CapabilityReport(revision=revision, policy_version=1, weakness=weakness)
    return PartialWeakness(producer="weakness", worker="elsewhere:1", seq=revision, reports={"spatial": spatial})


def latest(watch: Watch) -> WeaknessSnapshot:
    """The newest snapshot (by sequence number)."""
    return max(watch.snapshots.values(), key=lambda snapshot: snapshot.seq)


def evidence(outcomes: int, divergences: int) -> Callable[[Watch], bool]:
    return lambda w: bool(w.snapshots) and (latest(w).capabilities["counting"].events,
                                            latest(w).capabilities["color"].events) == (outcomes, divergences)


def reported(partial: PartialWeakness) -> Callable[[Watch], bool]:
    return lambda w: bool(w.snapshots) and latest(w).capabilities["spatial"] == partial.reports["spatial"].weakness


async def watched(watch: Watch, done: Callable[[Watch], bool]) -> bool:
    """Whether `done` came true within `SETTLE_S`."""
    try:
        await watch.until(done, SETTLE_S)
    except AssertionError:
        return False
    return True


async def run_evaluator(request: pytest.FixtureRequest) -> Run:
    """`serve_evaluator` in this process, on two synthetic items per checkpoint."""
    settings = request.getfixturevalue("settings")
    settings = with_overrides(settings, {"evaluator": {
        "synthetic": {"round_items": 2, "heldout_items": 0}, "max_new_tokens": 4,
        "group_id": f"evaluator-{settings.kafka.topic_prefix}"}})
    folders = checkpoint_folders(request, settings)
    warm, behind = (Checkpoint(policy_version=version, uri=str(folders.inside)) for version in (1, 2))
    stop = asyncio.Event()
    service = asyncio.create_task(serve_evaluator(settings, stop))
    try:
        async with tailing(settings, [EvalOutcome, DeadLetter]) as tail, raw_producer(settings) as send:

            def evaluated(version: int) -> Callable[[], bool]:
                return lambda: sum(o.policy_version == version for o in tail.of(EvalOutcome)) == 2

            await send_event(send, settings, warm)
            await tail.until(evaluated(1))
            before = rss()
            sent = await send_hostile(send, settings, Checkpoint(policy_version=6, uri=str(folders.inside)),
                                      folders.refused(7))
            await send_event(send, settings, behind)
            handled = {Checkpoint: await tail.until(evaluated(2))}
            complete = lettered(sent, "evaluator")
            await tail.until(lambda: complete(tail.of(DeadLetter)))
            return Run(sent, tail.of(DeadLetter), [], handled, not service.done(), rss() - before)
    finally:
        stop.set()
        await service


def audited(tail: Tail, item: UnlabeledItem) -> Callable[[], bool]:
    return lambda: any(item.item_id in (d.item_id, d.counterfactual_of) for d in tail.of(Divergence))


async def run_auditor(request: pytest.FixtureRequest) -> Run:
    """`serve_auditor` in this process with the oracle (a test fixture) as its reference: it diverges wherever the
    random tiny target is wrong. Checkpoints go first, so that the items behind them are audited by the newest
    target (and the newest auditor model's probes: the tiny policy stands in for one)."""
    settings = request.getfixturevalue("settings")
    auditor = audit_settings(edits_per_item=1, group_id=f"auditor-{settings.kafka.topic_prefix}")
    settings = settings.model_copy(update={"auditor": auditor})
    caplog = capture_logs(request)
    folders = checkpoint_folders(request, settings)
    auditor_models = checkpoint_folders(request, settings, CHECKPOINTS)
    store = BlobStore(settings.blob.url, settings.blob.limits)
    warm_item, hostile_item, behind_item = (scene_item(store, seed=seed) for seed in (3, 6, 5))
    stop = asyncio.Event()
    oracle = AnswerKeyAuditor(settings.auditor, store, [OracleAnswerer()])
    service = asyncio.create_task(serve_auditor(settings, stop, oracle))
    try:
        async with tailing(settings, [Divergence, DeadLetter]) as tail, raw_producer(settings) as send:
            await send_event(send, settings, Checkpoint(policy_version=1, uri=str(folders.inside)))
            await send_event(send, settings, warm_item)
            await tail.until(audited(tail, warm_item))
            before = rss()
            sent = await send_hostile(send, settings, Checkpoint(policy_version=6, uri=str(folders.inside)),
                                      folders.refused(7))
            await send_event(send, settings, Checkpoint(policy_version=2, uri=str(folders.inside)))
            moved = await tail.until(lambda: any("auditing policy v2 " in line for line in logged(caplog)))
            model = AuditorCheckpoint(policy_version=1, uri=str(auditor_models.inside))
            sent |= await send_hostile(send, settings, model, auditor_models.refused(6, AuditorCheckpoint))
            await send_event(send, settings, model.model_copy(update={"policy_version": 3}))
            chosen = await tail.until(lambda: any("auditor model v3 " in line for line in logged(caplog)))
            sent |= await send_hostile(send, settings, hostile_item)
            await send_event(send, settings, behind_item)
            handled = {Checkpoint: moved, AuditorCheckpoint: chosen,
                       UnlabeledItem: await tail.until(audited(tail, behind_item))}
            complete = lettered(sent, "auditor")
            await tail.until(lambda: complete(tail.of(DeadLetter)))
            return Run(sent, tail.of(DeadLetter), logged(caplog), handled, not service.done(), rss() - before)
    finally:
        stop.set()
        await service


def accepted_sample(ref: BlobRef, name: str, plan_id: str) -> AcceptedSample:
    """An accepted sample about a stored image whose answer grades as correct against itself."""
    body = SampleBody(image=ref, question=f"What colour is the {name}?", answer="red", answer_type="text")
    return AcceptedSample(sample_id=f"sample-{name}", capability="color", body=body, source_item_id=f"item-{name}",
                          plan_id=plan_id, agents=[], qc=[], policy_version=0)


def lead(ref: BlobRef, name: str) -> AuditLead:
    """An audit lead about a stored image: a counting probe two references agreed on (QC judges whether it is right)."""
    return AuditLead(divergence=Divergence(
        policy_version=1, item_id=f"view-{name}", probe_id=f"p-{name}", capability="counting",
        question="How many shapes are in the image?", image=ref, target_answer="7",
        reference_answers={"regions": "2", "contours": "2"}, consensus_answer="2", consensus_strength=1.0,
        consensus_agreeing=2, answer_type="number"))


def failure_types(policy_version: int) -> FailureTypes:
    """The auditor's tally of one counting failure type on `policy_version`."""
    found = FailedItem(item_id="view/cf/mirror", suite="audit", question="How many shapes are in the image?",
                       expected="2", given="3", reason="counting/all/mirror/too_high")
    return FailureTypes(policy_version=policy_version, audited_probes=5, types={
        "counting/all/mirror/too_high": FailureType(capability="counting", count=1, exemplars=[found])})


def rectified(tail: Tail, made: AuditLead) -> Callable[[], bool]:
    """Whether the agents made a sample, accepted or rejected, from the lead `made`."""
    wanted = made.divergence.divergence_id
    return lambda: any(s.divergence_id == wanted for s in tail.of(AcceptedSample) + tail.of(RejectedSample))


async def ingest_scene(settings: Settings, tail: Tail, index: int) -> UnlabeledItem:
    """Synthetic scene `index` (seed 11), ingested as `dpe ingest --synthetic` does, as the tail reads it back."""
    outcomes: list[Outcome] = []
    async with AsyncPublisher(settings, producer_name="ingest") as publisher:
        await Ingestor.from_settings(settings, publisher).ingest(synthetic_entries(1, 11, start=index),
                                                                  outcomes.append)
    await tail.until(lambda: any(item.item_id == outcomes[0].item_id for item in tail.of(UnlabeledItem)))
    return next(item for item in tail.of(UnlabeledItem) if item.item_id == outcomes[0].item_id)


def diagnosis(policy_version: int) -> Diagnosis:
    """A brief of one failed counting item."""
    brief = CapabilityDiagnosis(graded=2, wrong=1, error_mix={"other": 1.0}, failures=[], analysis="1 of 2 wrong")
    return Diagnosis(policy_version=policy_version, capabilities={"counting": brief})


def sampled(tail: Tail, item: UnlabeledItem) -> Callable[[], bool]:
    """Whether the agents made a sample, accepted or rejected, from `item`."""
    return lambda: any(s.source_item_id == item.item_id for s in tail.of(AcceptedSample) + tail.of(RejectedSample))


async def run_agents(request: pytest.FixtureRequest) -> Run:
    """An `AgentWorker` in this process with the default (pixel) crew, following plans with room for every item."""
    settings = request.getfixturevalue("settings")
    settings = with_overrides(settings, {"agents": {"group_id": f"agents-{settings.kafka.topic_prefix}"}})
    caplog = capture_logs(request)
    folders = checkpoint_folders(request, settings)
    roomy = dict.fromkeys(("counting", "color", "spatial", "existence", "text_reading", "chart", "arithmetic"), 50)
    plans = plan(roomy), plan(roomy | {"color": 60}, round=1)
    async with tailing(settings, [UnlabeledItem, AcceptedSample, RejectedSample, DeadLetter]) as tail, \
            raw_producer(settings) as send:
        warm_item = await ingest_scene(settings, tail, 0)
        samples = [accepted_sample(warm_item.image, name, plans[0].plan_id) for name in ("warm", "hostile", "behind")]
        leads = [lead(warm_item.image, name) for name in ("warm", "hostile", "behind")]
        for event in (plans[0], diagnosis(1), samples[0], Checkpoint(policy_version=1, uri=str(folders.inside)),
                      leads[0], failure_types(1)):
            await send_event(send, settings, event)
        stop, ready = asyncio.Event(), asyncio.Event()
        worker = AgentWorker(settings)
        service = asyncio.create_task(worker.run(stop, ready))
        try:
            await asyncio.wait_for(ready.wait(), 60)
            await tail.until(sampled(tail, warm_item))
            await tail.until(rectified(tail, leads[0]))
            before = rss()
            sent = {}
            for base, refused in ((warm_item.model_copy(update={"item_id": "e" * 64}), {}), (plans[0], {}),
                                  (diagnosis(2), {}), (samples[1], {}), (leads[1], {}), (failure_types(2), {}),
                                  (Checkpoint(policy_version=6, uri=str(folders.inside)), folders.refused(7))):
                sent |= await send_hostile(send, settings, base, refused)
            for event in (plans[1], diagnosis(5), samples[2], Checkpoint(policy_version=5, uri=str(folders.inside)),
                          leads[2], failure_types(5)):
                await send_event(send, settings, event)
            behind_item = await ingest_scene(settings, tail, 1)
            followed = {UnlabeledItem: sampled(tail, behind_item),
                        QuotaPlan: lambda: worker.ledger.plan.plan_id == plans[1].plan_id,
                        Diagnosis: lambda: worker.diagnoses.newest == 5,
                        AcceptedSample: lambda: worker.ledger.plan_of(samples[2].sample_id) == plans[0].plan_id,
                        Checkpoint: lambda: worker.latest_version == 5,
                        AuditLead: rectified(tail, leads[2]),
                        FailureTypes: lambda: worker.diagnoses.newest_failure_types == 5}
            handled = {model: await tail.until(done) for model, done in followed.items()}
            complete = lettered(sent, "agents")
            await tail.until(lambda: complete(tail.of(DeadLetter)))
            return Run(sent, tail.of(DeadLetter), logged(caplog), handled, not service.done(), rss() - before)
        finally:
            stop.set()
            await asyncio.wait_for(service, 60)


async def run_trainer(request: pytest.FixtureRequest) -> Run:
    """The trainer's reads, set up as `run_trainer` sets them up: the base's `announce_if_missing` on a checkpoints
    topic that holds only the batch and a valid announcement, then a `RoundCollector` on the accepted samples."""
    settings = request.getfixturevalue("settings")
    settings = with_overrides(settings, {"trainer": {"rounds": {"max_seconds": 1.0}}})
    folders = checkpoint_folders(request, settings)
    store = BlobStore(settings.blob.url, settings.blob.limits)
    ref = store.put_image(png(Image.new("RGB", (32, 32), "red")))
    warm, hostile, behind = (accepted_sample(ref, name, "plan") for name in ("warm", "hostile", "behind"))
    async with AsyncPublisher(settings, producer_name=PolicyTask.name) as publisher, raw_producer(settings) as send, \
            tailing(settings, [Checkpoint, DeadLetter]) as tail:
        sent = await send_hostile(send, settings, Checkpoint(policy_version=6, uri=str(folders.inside)),
                                  folders.refused(7))
        await send_event(send, settings, Checkpoint(policy_version=3, uri=str(folders.inside)))
        base = Checkpoint(producer=PolicyTask.name, policy_version=0, uri=str(folders.inside))
        announced = await announce_if_missing(settings, publisher, base)
        async with AsyncSubscriber(settings, [AcceptedSample], group_id=settings.trainer.group_id,
                                   service=PolicyTask.name, publisher=publisher, subscribe=False) as subscriber:
            await subscriber.assign_all()
            collector = RoundCollector(subscriber, store, settings.trainer, RecentIds(1000),
                                        PolicyTask(settings.trainer))
            await collector.start()
            await send_event(send, settings, warm)
            await collected(collector, warm)
            before = rss()
            sent |= await send_hostile(send, settings, hostile)
            await send_event(send, settings, behind)
            handled = {Checkpoint: not announced, AcceptedSample: await collected(collector, behind)}
        complete = lettered(sent, "trainer")
        await tail.until(lambda: complete(tail.of(DeadLetter)))
        return Run(sent, tail.of(DeadLetter), [], handled, True, rss() - before)


async def collected(collector: RoundCollector, sample: AcceptedSample) -> bool:
    """Read rounds (each one checkpointed at once) until `sample` is in one, or for `SETTLE_S`."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        round_ = await collector.collect(policy_version=0, stop=asyncio.Event())
        collector.committed()
        if sample.sample_id in round_.sample_ids():
            return True
    return False


# --- ingest -------------------------------------------------------------------------------------------------------

INGESTED: dict[str, str] = {
    "empty_file": "empty",
    "truncated_image": "corrupt",
    "not_an_image": "corrupt",
    "decompression_bomb": "too_many_pixels",
    "random_12_mb": "corrupt",
    "one_pixel_image": PUBLISHED,
    "cmyk_image": PUBLISHED,
    "exif_rotated_image": PUBLISHED,
    "animated_gif": "unsupported_format",
    "animated_png": "unsupported_format",
    "symlink_out_of_the_folder": "path_outside_roots",
    "dot_dot_escape": "path_outside_roots",
    "absolute_path_outside": "path_outside_roots",
    "symlinked_folder_escape": "path_outside_roots",
    "file_url_outside": "path_outside_roots",
    "file_url_inside": PUBLISHED,
    "unknown_url_scheme": "path_outside_roots",
    "unknown_scheme_under_a_root": "unreadable",
    "chained_protocols": "path_outside_roots",
    "named_pipe": "unreadable",
    "valid_image_behind": PUBLISHED,
}
"""Each input's outcome: folder inputs first (`dpe ingest DIR`), then manifest lines (`--manifest`), in this order."""


def encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def animated(fmt: str) -> bytes:
    """Two frames: an animation, which no consumer can use."""
    first, second = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    return encoded(first, fmt, save_all=True, append_images=[second])


def rotated_exif() -> bytes:
    """EXIF saying the picture is to be shown turned by 90 degrees (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def folder_files() -> dict[str, tuple[str, bytes]]:
    """The folder's hostile and odd files: row -> (file name, bytes)."""
    whole = png(noisy(1))
    return {
        "empty_file": ("empty.png", b""),
        "truncated_image": ("truncated.png", whole[: len(whole) * 6 // 10]),
        "not_an_image": ("page.png", b"<html><body>not an image</body></html>\n" * 50),
        "decompression_bomb": ("bomb.png", bilevel_png(10_000, 10_000, rows=10_000)),
        "random_12_mb": ("noise.jpg", os.urandom(12 << 20)),
        "one_pixel_image": ("pixel.png", png(Image.new("RGB", (1, 1), "red"))),
        "cmyk_image": ("cmyk.jpg", encoded(Image.new("CMYK", (32, 16), (0, 255, 0, 0)), "JPEG")),
        "exif_rotated_image": ("rotated.jpg", encoded(noisy(2).resize((48, 24)), "JPEG", exif=rotated_exif())),
        "animated_gif": ("moving.gif", animated("GIF")),
        "animated_png": ("moving.png", animated("PNG")),
    }


def manifest_lines(root: Path, outside: Path) -> dict[str, str]:
    """The manifest's entries (relative ones are relative to `root`, its folder): row -> entry."""
    return {
        "dot_dot_escape": "../outside/secret.png",
        "absolute_path_outside": str(outside / "secret.png"),
        "symlinked_folder_escape": "dirlink/secret.png",
        "file_url_outside": f"file://{outside}/secret.png",
        "file_url_inside": f"file://{root}/inside.png",
        "unknown_url_scheme": "gopher://example.com/a.png",
        "unknown_scheme_under_a_root": "nosuch://bucket/a.png",
        "chained_protocols": f"simplecache::file://{root}/inside.png",
        "named_pipe": "pipe.png",
        "valid_image_behind": "valid.png",
    }


def release(fifo: Path) -> None:
    """Open a named pipe for writing and close it again, so that a reader blocked on it returns."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@dataclass
class IngestRun:
    """What ingest made of each input, what it published (source -> item) and the decoded size of each item."""

    outcomes: dict[str, Outcome]
    published: dict[str, UnlabeledItem]
    decoded: dict[str, tuple[int, int]]
    alive: bool
    rss_growth: int


async def run_ingest(request: pytest.FixtureRequest) -> IngestRun:
    """One `Ingestor` over a folder (with a symlink out of it) and a manifest confined to its folder and to one
    URL root whose protocol no filesystem implements."""
    settings = request.getfixturevalue("settings")
    tmp = request.getfixturevalue("tmp_path")
    root, outside = tmp / "root", tmp / "outside"
    drop = root / "drop"
    drop.mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(noisy(3)))
    (root / "inside.png").write_bytes(png(noisy(4)))
    (root / "valid.png").write_bytes(png(noisy(5)))
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "pipe.png")
    request.addfinalizer(lambda: release(root / "pipe.png"))
    sources = {}
    for row, (name, data) in folder_files().items():
        (drop / name).write_bytes(data)
        sources[row] = str(drop / name)
    (drop / "link.png").symlink_to(outside / "secret.png")
    sources["symlink_out_of_the_folder"] = str(drop / "link.png")
    lines = manifest_lines(root, outside)
    sources |= lines
    max_bytes = settings.blob.limits.max_bytes
    inputs: list[Input] = [*folder_entries(drop, Roots.of([]), max_bytes),
                           *manifest_entries([json.dumps({"image": line}) for line in lines.values()], root,
                                             Roots.of([root, "nosuch://bucket"]), max_bytes)]
    outcomes: list[Outcome] = []
    before = rss()
    async with AsyncPublisher(settings, producer_name="ingest") as publisher:
        ingestor = Ingestor.from_settings(settings, publisher)
        await asyncio.wait_for(ingestor.ingest(inputs, outcomes.append), SETTLE_S)
    growth = rss() - before
    by_source = {outcome.source: outcome for outcome in outcomes}
    published = {item.source: item for item in await read_all(settings, UnlabeledItem)}
    store = BlobStore(settings.blob.url, settings.blob.limits)
    decoded = {source: store.open_image(item.image).size for source, item in published.items()}
    return IngestRun({row: by_source[source] for row, source in sources.items()}, published, decoded, True, growth)


RUNNERS: dict[str, Callable[[pytest.FixtureRequest], Awaitable[Any]]] = {
    "weakness": run_weakness,
    "evaluator": run_evaluator,
    "auditor": run_auditor,
    "agents": run_agents,
    "trainer": run_trainer,
    "ingest": run_ingest,
}


class Runs:
    """Each service's one run in this module, made by the first test that needs it; a failed run fails them all."""

    def __init__(self) -> None:
        self._done: dict[str, Any] = {}

    async def of(self, service: str, request: pytest.FixtureRequest) -> Any:
        if service not in self._done:
            try:
                self._done[service] = await RUNNERS[service](request)
            except Exception as error:
                self._done[service] = error
                raise
        done = self._done[service]
        if isinstance(done, Exception):
            pytest.fail(f"the {service} run failed: {done!r}")
        return done


@pytest.fixture(scope="module")
def runs() -> Runs:
    return Runs()


@pytest.mark.parametrize("row", INGESTED)
async def test_ingest_refuses_a_hostile_input_with_its_reason_and_publishes_the_valid_ones(row: str, runs: Runs,
                                                                                           request):
    run = await runs.of("ingest", request)
    outcome = run.outcomes[row]
    assert outcome.reason == INGESTED[row], outcome.detail
    item = run.published.get(outcome.source)
    if outcome.published:
        assert item is not None and item.item_id == outcome.item_id, "published means on the bus"
        assert run.decoded[outcome.source] == (item.image.width, item.image.height), \
            "the ref describes the pixels every consumer decodes"
    else:
        assert item is None and outcome.detail, "a refused input is never published, and says why"


# --- the record cells -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("door,row", CELLS)
async def test_a_hostile_record_is_dead_lettered_or_refused_with_a_reason(door: Door, row: str, runs: Runs, request):
    run = await runs.of(door.service, request)
    sent = run.hostile[(door.model, row)]
    expect = door.expect(row)
    letters = [letter for letter in run.letters if letter.producer == door.producer and origin(letter) == sent.origin]
    if expect.fate is Fate.DEAD:
        assert letters, f"{door.service} filed no dead letter for {row} at {sent.mark}"
        reasons = {letter.error_class: letter.error_message for letter in letters}
        assert set(reasons) == {expect.error_class} and all(reasons.values()), reasons
        return
    assert not letters, f"{door.service} dead-lettered {row} ({letters[0].error_class}), expected: {expect.fate.value}"
    if expect.fate is Fate.LOGGED:
        assert any(sent.mark in line for line in run.logs), f"no log line names {sent.mark}"


@pytest.mark.parametrize("door", [pytest.param(door, id=str(door)) for door in DOORS])
async def test_the_valid_record_behind_the_hostile_ones_is_handled(door: Door, runs: Runs, request):
    run = await runs.of(door.service, request)
    assert run.handled[door.model]


@pytest.mark.parametrize("service", ["ingest", *SERVICES])
async def test_the_service_survives_the_batch_with_bounded_memory(service: str, runs: Runs, request):
    run = await runs.of(service, request)
    assert run.alive, f"the {service} service stopped"
    assert run.rss_growth < MAX_RSS_GROWTH, f"{service} grew by {run.rss_growth / 2**20:.0f} MiB"


async def test_dpe_eval_reads_past_hostile_records_to_the_newest_checkpoint(settings: Settings):
    """`dpe eval` without ``--checkpoint`` evaluates the newest announced checkpoint: a topic that starts with
    records it cannot decode (the 6 MB one alone in a fetch) still has one."""
    async with raw_producer(settings) as send:
        await send_hostile(send, settings, Checkpoint(policy_version=6, uri="/checkpoints/v6"))
        await send_event(send, settings, Checkpoint(policy_version=3, uri="/checkpoints/v3"))
    newest = await latest_checkpoint(settings, service="evaluator")
    assert newest is not None and newest.policy_version == 3
