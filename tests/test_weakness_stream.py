"""The weakness stream end to end: real embedded broker, workers started as `python -m dpe serve weakness`.

Every expectation is recomputed from the published log with the pure scoring functions, so "right
numbers" means: what `streams.scoring.replay` + `summarise` give for the events on the topics.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import faust
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP
from PIL import Image

from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.bus.codec import encode
from dpe.events import BlobRef, DeadLetter, Divergence, EvalOutcome, Event, QuotaPlan, WeaknessSnapshot
from dpe.settings import Settings
from dpe.topics import topic_for
from producers.evaluator.loaders import load_benchmark
from streams.aggregator import Aggregator
from streams.beta import credible_interval
from streams.contracts import PartialWeakness, partial_topic
from streams.ordering import PartitionOrder
from streams.runtime import broker_credentials, fetched_end_offsets
from streams.scoring import divergence_evidence, load_state, outcome_evidence, replay, summarise
from streams.settings import StreamConfig
from streams.strategies import dpe_step

REPO = Path(__file__).resolve().parent.parent
TAXONOMY = ("counting", "color", "spatial", "chart")

pytestmark = pytest.mark.timeout(300)


def outcome(version: int, item: str, correct: bool, capability: str = "counting", suite: str = "diag") -> EvalOutcome:
    return EvalOutcome(policy_version=version, suite=suite, item_id=item, capability=capability,
                       answer_type="number", expected="3", predicted="3" if correct else "4", correct=correct,
                       score=1.0 if correct else 0.0)


def divergence(version: int, probe: str, capability: str, strength: float = 1.0) -> Divergence:
    image = BlobRef(sha256="b" * 64, media_type="image/png", size_bytes=10, width=8, height=8)
    return Divergence(policy_version=version, item_id="img", probe_id=probe, capability=capability, question="?",
                      image=image, target_answer="3", reference_answers={"r1": "4", "r2": "4"},
                      consensus_answer="4", consensus_strength=strength)


class Worker:
    """One stream worker process."""

    def __init__(self, config: Path, log: Path, flags: tuple[str, ...] = ()):
        self.log = log.open("ab")
        command = [sys.executable, "-m", "dpe", "--config", str(config), "serve", "weakness", *flags]
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()


@pytest.fixture
def stream_settings(settings: Settings, tmp_path: Path) -> tuple[Settings, Path]:
    """Test settings plus a YAML file of them for worker processes (small taxonomy, budget 100)."""
    config = {
        "home": str(settings.home),
        "log_level": "WARNING",
        "kafka": {"bootstrap_servers": settings.kafka.bootstrap_servers, "topic_prefix": settings.kafka.topic_prefix},
        "blob": {"url": settings.blob.url},
        "capabilities": list(TAXONOMY),
        "stream": {"metrics_port": 0, "snapshot_every_s": 0.2, "quotas": {"budget": 100}},
    }
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(config))
    return Settings.load(path), path


@pytest.fixture
def start_worker(stream_settings, tmp_path):
    """Starts worker processes; all are stopped at teardown."""
    started: list[Worker] = []

    def start(*flags: str) -> Worker:
        worker = Worker(stream_settings[1], tmp_path / f"worker{len(started)}.log", flags)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


class Watch:
    """Follows snapshots, plans and dead letters from the beginning of their topics."""

    def __init__(self, subscriber: AsyncSubscriber):
        self.subscriber = subscriber
        self.snapshots: dict[str, WeaknessSnapshot] = {}
        self.plans: list[QuotaPlan] = []
        self.letters: list[DeadLetter] = []

    @property
    def latest(self) -> tuple[WeaknessSnapshot, QuotaPlan] | None:
        """The newest plan with the snapshot it names."""
        if not self.plans or self.plans[-1].snapshot_id not in self.snapshots:
            return None
        return self.snapshots[self.plans[-1].snapshot_id], self.plans[-1]

    async def until(self, done: Callable[["Watch"], bool], timeout_s: float = 90.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; latest: {self.latest}")
            for delivery in await self.subscriber.fetch(timeout_ms=100):
                event = delivery.event
                if isinstance(event, WeaknessSnapshot):
                    self.snapshots[event.snapshot_id] = event
                elif isinstance(event, QuotaPlan):
                    self.plans.append(event)
                else:
                    self.letters.append(event)


def follow(settings: Settings, publisher: AsyncPublisher) -> AsyncSubscriber:
    """A subscriber to snapshots, plans and dead letters (no group: every partition from the start)."""
    return AsyncSubscriber(settings, [WeaknessSnapshot, QuotaPlan, DeadLetter], group_id=None, service="test",
                           publisher=publisher)


async def publish(settings: Settings, events: list[Event]) -> None:
    async with AsyncPublisher(settings, producer_name="test") as publisher:
        for event in events:
            await publisher.publish(event)
        await publisher.flush()


async def read_all(settings: Settings, topic: str, quiet_s: float = 1.5) -> list:
    """Every record of `topic`, per partition in offset order (read until nothing new for `quiet_s`)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False,
                                fetch_max_wait_ms=10)
    await consumer.start()
    try:
        assert topic in await consumer.topics(), f"topic {topic} not found"
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list = []
        last_new = time.monotonic()
        while time.monotonic() - last_new < quiet_s:
            batch = await consumer.getmany(timeout_ms=200)
            for tp_records in batch.values():
                records.extend(tp_records)
                last_new = time.monotonic()
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


async def recomputed(settings: Settings) -> dict:
    """Capability states recomputed from the evidence topics' logs."""
    params = settings.stream.scoring
    evidence = []
    for model, to_evidence in ((EvalOutcome, outcome_evidence), (Divergence, divergence_evidence)):
        for record in await read_all(settings, topic_for(model, settings.kafka.topic_prefix)):
            evidence.append(to_evidence(model.model_validate_json(record.value), params))
    return replay([e for e in evidence if e is not None], params)


def matches(expected: dict, settings: Settings) -> Callable[[Watch], bool]:
    """The latest plan's snapshot reports exactly the recomputed weakness of every capability."""
    params = settings.stream.scoring
    summaries = {name: summarise(state, params) for name, state in expected.items()}

    def done(w: Watch) -> bool:
        latest = w.latest
        return latest is not None and all(latest[0].capabilities.get(n) == s for n, s in summaries.items())

    return done


async def test_outcomes_in_snapshot_and_plan_out_with_the_right_numbers(stream_settings, start_worker):
    settings, _ = stream_settings
    counting = [outcome(1, f"n{i}", correct=i >= 8) for i in range(10)]  # 8 of 10 wrong
    color = [outcome(1, f"c{i}", correct=i >= 1, capability="color") for i in range(10)]  # 1 of 10 wrong
    rerun = outcome(1, "c9", correct=False, capability="color")  # re-graded: now 2 of 10 wrong
    await publish(settings, [*counting, *color, counting[0], counting[1], rerun])
    start_worker()
    async with AsyncPublisher(settings) as pub, follow(settings, pub) as sub:
        w = Watch(sub)
        await w.until(lambda w: w.latest is not None and w.latest[0].capabilities["color"].error_rate == 0.2
                      and w.latest[0].capabilities["counting"].events == 10, what="a plan with every outcome")
    snapshot, plan = w.latest
    assert snapshot.capabilities["counting"].error_rate == 0.8
    assert snapshot.capabilities["counting"].effective_n == 10
    low, high = credible_interval(1 + 8, 1 + 2, 0.9)
    assert (snapshot.capabilities["counting"].ci_low, snapshot.capabilities["counting"].ci_high) == (low, high)
    assert snapshot.capabilities["color"].events == 10, "the duplicate and the re-run add nothing"
    for unseen in ("spatial", "chart"):
        assert snapshot.capabilities[unseen].events == 0 and snapshot.capabilities[unseen].error_rate == 0.5
    assert (snapshot.policy_version, snapshot.events_total) == (1, 20)
    # dpe_step: counting acc 0.2 -> 2.0, color acc 0.8 -> 1.0, unseen (prior 0.5) -> 2.0; sum 7.0, budget 100
    assert plan.weights == {"chart": 2.0, "color": 1.0, "counting": 2.0, "spatial": 2.0}
    assert plan.quotas == {"chart": 29, "color": 14, "counting": 29, "spatial": 28}
    assert (plan.snapshot_id, plan.strategy, plan.budget, plan.policy_version) == \
        (snapshot.snapshot_id, "dpe_step", 100, 1)
    assert [p.round for p in w.plans] == list(range(len(w.plans))), "plan rounds count up from 0"


async def test_with_round_evidence_each_version_is_planned_once_after_its_diagnosis(stream_settings,
                                                                                  start_worker):
    settings, path = stream_settings
    config = yaml.safe_load(path.read_text())
    config["stream"]["quotas"]["round_evidence"] = 8
    path.write_text(yaml.safe_dump(config))
    heldout = [outcome(0, f"h{i}", correct=False, capability="chart", suite="heldout") for i in range(6)]
    await publish(settings, [outcome(0, f"a{i}", correct=i % 2 == 0) for i in range(5)] + heldout)
    start_worker()
    async with AsyncPublisher(settings) as pub, follow(settings, pub) as sub:
        w = Watch(sub)

        def snapshot_with(events: int, version: int) -> Callable[[Watch], bool]:
            return lambda w: any(s.events_total == events and s.policy_version == version
                                 for s in w.snapshots.values())

        await w.until(snapshot_with(5, 0), what="a snapshot of the 5 round outcomes (held-out ones measure only)")
        assert not w.plans, "5 graded outcomes of version 0 are not yet its diagnosis"
        await publish(settings, [outcome(0, f"b{i}", correct=False, capability="color") for i in range(3)])
        await w.until(lambda w: len(w.plans) == 1, what="the plan of round 0")
        await publish(settings, [outcome(1, f"c{i}", correct=True) for i in range(4)])
        await w.until(snapshot_with(12, 1), what="a snapshot with half the diagnosis of version 1")
        await publish(settings, [outcome(0, "late", correct=True, capability="spatial"), *heldout])
        await w.until(snapshot_with(13, 1), what="a snapshot with the late version-0 outcome")
        assert len(w.plans) == 1, "version 1 has 4 of 8 outcomes, version 0 is planned already"
        await publish(settings, [outcome(1, f"d{i}", correct=False, capability="color") for i in range(4)])
        await w.until(lambda w: len(w.plans) == 2, what="the plan of round 1")
        await w.until(snapshot_with(17, 1), timeout_s=5, what="the last snapshot")
    assert [(p.round, p.policy_version) for p in w.plans] == [(0, 0), (1, 1)]
    assert w.snapshots[w.plans[0].snapshot_id].capabilities["chart"].events == 0, "held-out outcomes never steer"
    assert w.plans[1].quotas["color"] > w.plans[1].quotas["counting"], "round 1 is planned from version 1's errors"


async def test_the_static_arm_plans_every_round_with_its_first_weights_even_after_a_kill9(stream_settings,
                                                                                         start_worker):
    settings, path = stream_settings
    config = yaml.safe_load(path.read_text())
    config["stream"]["quotas"] |= {"round_evidence": 8, "strategy": "static"}
    path.write_text(yaml.safe_dump(config))
    await publish(settings, [outcome(0, f"a{i}", correct=True, capability="chart") for i in range(8)])
    first = start_worker()
    async with AsyncPublisher(settings) as pub, follow(settings, pub) as sub:
        w = Watch(sub)
        await w.until(lambda w: len(w.plans) == 1, what="the plan of round 0")
        first.kill9()
        await publish(settings, [outcome(1, f"b{i}", correct=False, capability="chart") for i in range(8)])
        start_worker()
        await w.until(lambda w: len(w.plans) == 2, what="the plan of round 1, by the restarted worker")
    round0, round1 = w.plans
    params = settings.stream.quotas
    assert (round0.strategy, round1.strategy, round1.policy_version) == ("static", "static", 1)
    assert round0.weights == dpe_step(w.snapshots[round0.snapshot_id], params), "the step weights of version 0"
    assert dpe_step(w.snapshots[round1.snapshot_id], params) != round0.weights, \
        "version 1 fails on chart: a re-planning arm would weigh it more now"
    assert (round1.weights, round1.quotas) == (round0.weights, round0.quotas), "never re-planned"


async def test_bad_events_are_dead_lettered_and_the_stream_goes_on(stream_settings, start_worker):
    settings, _ = stream_settings
    prefix = settings.kafka.topic_prefix
    outcomes, divergences = topic_for(EvalOutcome, prefix), topic_for(Divergence, prefix)
    nan_score = json.loads(outcome(1, "nan", True).model_dump_json()) | {"score": float("nan")}
    bad = {
        "MalformedJSON": (outcomes, b"counting", b"{not json"),
        "UnknownCapability": (outcomes, b"juggling", outcome(1, "j", False, "juggling").model_dump_json().encode()),
        "SchemaViolation": (outcomes, b"counting", json.dumps(nan_score).encode()),
        "UnsupportedSchemaVersion": (outcomes, b"counting",
                                     outcome(1, "v", False).model_copy(update={"schema_version": 99})
                                     .model_dump_json().encode()),
        "UnknownDivergenceCapability": (divergences, b"juggling",
                                        divergence(1, "p", "juggling").model_dump_json().encode()),
        "OversizedEvent": (outcomes, b"counting", b'{"padding": "' + b"x" * (6 << 20) + b'"}'),
        "VersionTooFarAhead": (outcomes, b"counting", outcome(10**6, "far", False).model_dump_json().encode()),
    }
    good = [outcome(1, "first", False), outcome(1, "last", True)]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, max_request_size=8 << 20)
    await producer.start()
    try:
        await producer.send_and_wait(outcomes, good[0].model_dump_json().encode(), key=b"counting")
        for topic, key, value in bad.values():
            await producer.send_and_wait(topic, value, key=key)
        await producer.send_and_wait(outcomes, good[1].model_dump_json().encode(), key=b"counting")
    finally:
        await producer.stop()

    start_worker("--strategy", "uniform", "--budget", "40")
    async with AsyncPublisher(settings) as pub, follow(settings, pub) as sub:
        w = Watch(sub)
        await w.until(lambda w: len({(d.origin_topic, d.origin_partition, d.origin_offset) for d in w.letters})
                      == len(bad) and w.latest is not None and w.latest[0].capabilities["counting"].events == 2,
                      what="dead letters and a plan")
    by_hash = {letter.payload_sha256: letter for letter in w.letters}
    assert len(by_hash) == len(bad), "one dead letter per bad record (repeats allowed: at least once)"
    for expected_class, (topic, key, value) in bad.items():
        letter = by_hash[hashlib.sha256(value).hexdigest()]
        payload = base64.b64decode(letter.payload_b64)
        assert payload == value or (letter.truncated and value.startswith(payload)), "payload untouched or cut"
        assert letter.error_class == expected_class.replace("Divergence", "")
        assert (letter.origin_topic, letter.origin_key) == (topic, key.decode())
        assert letter.origin_partition is not None and letter.origin_offset is not None
        assert letter.producer == "weakness" and letter.error_message
    def letter_of(expected_class: str) -> DeadLetter:
        return by_hash[hashlib.sha256(bad[expected_class][2]).hexdigest()]

    assert letter_of("UnknownCapability").stage == "weakness.score"
    assert "juggling" in letter_of("UnknownCapability").error_message
    assert "score" in letter_of("SchemaViolation").error_message
    assert letter_of("OversizedEvent").truncated and letter_of("OversizedEvent").payload_bytes == len(
        bad["OversizedEvent"][2]), "a record too big for a dead letter of its own goes truncated, with its size"
    assert letter_of("VersionTooFarAhead").stage == "weakness.score", "a version far ahead is refused, not adopted"
    assert w.latest[0].capabilities["counting"].error_rate == 0.5, "the valid events around the bad ones count"
    plan = w.latest[1]
    assert (plan.strategy, plan.budget, set(plan.quotas.values())) == ("uniform", 40, {10}), "flags reach the planner"


def workload(versions: range, per_version: int, seed_offset: int = 0) -> list[Event]:
    """Outcomes and divergences for every taxonomy capability over several versions, with duplicates and re-runs."""
    events: list[Event] = []
    for version in versions:
        batch = [outcome(version, f"i{i}", (i * 7 + version + seed_offset) % 3 == 0, TAXONOMY[i % len(TAXONOMY)])
                 for i in range(per_version)]
        reruns = [outcome(version, f"i{i}", True, TAXONOMY[i % len(TAXONOMY)]) for i in range(0, per_version, 17)]
        divergences = [divergence(version, f"p{i}", TAXONOMY[i % len(TAXONOMY)], strength=0.5 + (i % 3) / 4)
                       for i in range(per_version // 50)]
        events += batch + batch[::50] + reruns + divergences + divergences[::3]
    return events


async def latest_changelog_states(settings: Settings) -> dict:
    topic = f"{settings.kafka.topic_prefix}{settings.stream.app_id}-capability_states-changelog"
    latest = {}
    for record in await read_all(settings, topic):
        latest[json.loads(record.key)] = record.value
    return {name: load_state(raw) for name, raw in latest.items()}


async def test_recovery_after_kill9_equals_recomputation_from_the_log(stream_settings, start_worker):
    settings, _ = stream_settings
    await publish(settings, workload(range(6), per_version=4000))
    first = start_worker()
    async with AsyncPublisher(settings) as pub, follow(settings, pub) as sub:
        w = Watch(sub)
        await w.until(lambda w: w.latest is not None, what="the first plan")
        first.kill9()
        killed_at = w.latest[0].events_total
        await publish(settings, workload(range(5, 8), per_version=800, seed_offset=1))
        expected = await recomputed(settings)
        assert killed_at < sum(summarise(s, settings.stream.scoring).events for s in expected.values()), \
            "the worker must die mid-stream for this test to mean anything"
        start_worker()
        await w.until(matches(expected, settings), what="the recomputed weakness after restart")
    changelog = await latest_changelog_states(settings)
    assert changelog == expected, "the table after recovery equals the recomputation from the log"
    assert all(len(ledger.window) <= settings.stream.scoring.keep_versions
               for state in changelog.values() for ledger in state.ledgers.values())


async def group_members(settings: Settings) -> tuple[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        group = f"{settings.kafka.topic_prefix}{settings.stream.app_id}"
        (description,) = (await admin.describe_consumer_groups([group]))[0].groups
        return description[2], len(description[5])
    finally:
        await admin.close()


async def reports_by_worker(settings: Settings) -> dict[str, set[str]]:
    by_worker: dict[str, set[str]] = defaultdict(set)
    for record in await read_all(settings, partial_topic(settings.kafka.topic_prefix)):
        partial = PartialWeakness.model_validate_json(record.value)
        by_worker[partial.worker] |= set(partial.reports)
    return by_worker


async def test_two_workers_share_partitions_and_one_takes_over(stream_settings, start_worker):
    settings, _ = stream_settings
    partitioner = DefaultPartitioner()
    assert {partitioner(name.encode(), [0, 1, 2, 3], [0, 1, 2, 3]) for name in TAXONOMY} == {0, 1, 2, 3}, \
        "precondition: the capabilities cover every partition, so both workers get some"
    first, second = start_worker(), start_worker()
    deadline = time.monotonic() + 60
    while await group_members(settings) != ("Stable", 2):
        assert time.monotonic() < deadline, "the two workers never formed a stable group"
        await asyncio.sleep(0.5)

    await publish(settings, workload(range(3), per_version=400))
    async with AsyncPublisher(settings) as pub, follow(settings, pub) as sub:
        w = Watch(sub)
        await w.until(matches(await recomputed(settings), settings), what="the global snapshot of two workers")
        by_worker = await reports_by_worker(settings)
        assert len(by_worker) == 2, f"both workers report: {dict(by_worker)}"
        assert set.union(*by_worker.values()) == set(TAXONOMY)
        assert not set.intersection(*by_worker.values()), "each capability has exactly one owner"

        first.kill9()
        await publish(settings, workload(range(2, 5), per_version=400, seed_offset=2))
        await w.until(matches(await recomputed(settings), settings), what="the survivor's global snapshot")
    assert second.proc.poll() is None


def benchmark_file(path: Path, categories: list[str]) -> Path:
    """A VLMEvalKit-style TSV with one multiple-choice row per category (a red 8-pixel PNG each)."""
    image = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(image, format="PNG")
    encoded = base64.b64encode(image.getvalue()).decode()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "answer", "category", "image"])
        writer.writerows([i, f"Question {i}?", "yes", "no", "A", category, encoded]
                         for i, category in enumerate(categories))
    return path


async def test_a_benchmark_category_mapped_in_the_settings_is_scored_never_dead_lettered(stream_settings, start_worker,
                                                                                        tmp_path):
    """The taxonomy is one setting, `capabilities`: a benchmark whose categories map to an image type of the DPE
    paper (outside the synthetic world) loads with that capability, and the stream scores its outcomes rather
    than dead-lettering them as unknown. Without it in `capabilities` the settings refuse the mapping."""
    settings, path = stream_settings
    suite = {"name": "bench", "path": str(benchmark_file(tmp_path / "bench.tsv", ["math"] * 4 + ["spatial"] * 2)),
             "format": "vlmeval_tsv", "categories": {"math": "math_formula", "spatial": "spatial"}}
    config = yaml.safe_load(path.read_text())
    with pytest.raises(ValueError, match="math_formula"):
        Settings(**config | {"evaluator": {"benchmarks": [suite]}})
    config |= {"capabilities": [*TAXONOMY, "math_formula"], "evaluator": {"benchmarks": [suite]}}
    path.write_text(yaml.safe_dump(config))
    deployment = Settings.load(path)
    assert deployment.stream.scoring.taxonomy == deployment.evaluator.capabilities == deployment.capabilities
    loaded = load_benchmark(deployment.evaluator.benchmarks[0], deployment.evaluator.capabilities)
    assert sorted(item.capability for item in loaded.items) == ["math_formula"] * 4 + ["spatial"] * 2
    await publish(deployment, [
        EvalOutcome(policy_version=0, suite=item.suite, item_id=item.item_id, capability=item.capability,
                    answer_type=item.answer_type, expected=item.answer, predicted="A" if i % 2 else "B",
                    correct=bool(i % 2), score=float(i % 2))
        for i, item in enumerate(loaded.items)
    ])
    start_worker()
    async with AsyncPublisher(deployment) as pub, follow(deployment, pub) as sub:
        w = Watch(sub)
        await w.until(lambda w: w.latest is not None and w.latest[0].capabilities["math_formula"].events == 4
                      and w.latest[0].capabilities["spatial"].events == 2, what="the mapped capabilities scored")
    assert w.latest[1].quotas.keys() == set(deployment.capabilities), "the plan covers the whole taxonomy"
    assert not w.letters, f"nothing dead-lettered: {[letter.error_class for letter in w.letters]}"


class SlowChangelogTable:
    """Stands in for a Faust table whose changelog records the broker has not acknowledged yet (the producer
    flush before a commit can return in that state); `acknowledge` lets them through."""

    def __init__(self) -> None:
        self.data: dict = {}
        self.pending: list[asyncio.Future] = []

    def send_changelog(self, partition: int, key: str, value: bytes) -> asyncio.Future:
        self.pending.append(asyncio.get_running_loop().create_future())
        return self.pending[-1]

    def acknowledge(self) -> None:
        for future in self.pending:
            future.set_result(None)


class ReportSink:
    """Stands in for the stream's topics: keeps what the aggregator sends."""

    def __init__(self) -> None:
        self.sent: list[Event] = []

    async def send(self, event: Event) -> None:
        self.sent.append(event)

    async def dead_letter(self, letter: DeadLetter) -> None:
        self.sent.append(letter)


async def test_a_batch_ends_only_once_the_broker_has_its_state_writes():
    """Faust acknowledges a batch's events when the agent asks for the next batch, and may commit them right
    after; a state write still unacknowledged then is lost to a kill -9 (the restarted worker never reads those
    events again). So `Aggregator.consume` returns only after the changelog records are acknowledged."""
    settings = StreamConfig.load(overrides={"capabilities": list(TAXONOMY)})
    table, sink = SlowChangelogTable(), ReportSink()
    aggregator = Aggregator(settings, table, sink, worker="test", order=PartitionOrder(lambda: None))
    batch = [SimpleNamespace(value=encode(outcome(0, f"i{i}", i % 2 == 0, capability), 1 << 20),
                             message=SimpleNamespace(topic="outcomes", partition=2, tp=("outcomes", 2), offset=i))
             for i, capability in enumerate(("counting", "color", "counting"))]
    consuming = asyncio.create_task(aggregator.consume(batch, EvalOutcome, outcome_evidence))
    await asyncio.sleep(0.2)
    assert len(table.pending) == 2, "one changelog write per changed capability"
    assert not consuming.done(), "the batch must not end before the broker has its state writes"
    table.acknowledge()
    await asyncio.wait_for(consuming, 5)
    assert {name: load_state(raw).ledgers["outcome"].events for name, raw in table.data.items()} == \
        {"counting": 2, "color": 1}


class RecordingConsumer:
    """Stands in for the stream's consumer: a resume point per partition, and the seeks asked of it."""

    def __init__(self, resume: dict) -> None:
        self.resume = resume
        self.seeks: list[tuple[str, int]] = []

    def resume_point(self, tp: str) -> int | None:
        return self.resume.get(tp)

    async def seek(self, partition: str, offset: int) -> None:
        self.seeks.append((partition, offset))


async def test_the_partition_order_gate_holds_records_behind_a_hole_and_seeks_back_to_it():
    """Faust may hand over a partition's records with the first ones after a seek missing (cleared from its
    queues); the gate applies nothing past the hole, seeks back once (again only after a while), and applies
    the re-delivered records in log order, skipping what it applied already."""
    clock = [0.0]
    consumer = RecordingConsumer({"p0": 30})
    order = PartitionOrder(lambda: consumer, clock=lambda: clock[0])
    first = [order.admit("p0", offset).value for offset in (34, 35)]
    assert first == ["held_back", "held_back"], "the resume point is 30: 30..33 are missing"
    await order.rewind()
    await order.rewind()
    assert consumer.seeks == [("p0", 30)], "one seek per hole, not one per held-back record"
    clock[0] += 10
    await order.rewind()
    assert consumer.seeks == [("p0", 30), ("p0", 30)], "a hole still open after a while is sought again"
    again = [order.admit("p0", offset).value for offset in range(30, 36)] + [order.admit("p0", 33).value]
    assert again == ["apply"] * 6 + ["redelivered"]
    assert order.holes == {}
    order.forget()
    assert order.admit("p1", 7).value == "apply", "a partition without a resume point starts where it starts"


async def test_end_offsets_come_from_the_fetch_high_water_mark(settings):
    """Table recovery reads changelogs up to their end offsets: they must count every record."""
    topic = topic_for(EvalOutcome, settings.kafka.topic_prefix)
    bootstrap = settings.kafka.bootstrap_servers
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for size in (5, 1, 3):  # record batches of several records, as a producer with linger writes them
            batch = producer.create_batch()
            for i in range(size):
                batch.append(key=None, value=b"%d" % i, timestamp=None)
            await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        listed = await consumer.end_offsets([TopicPartition(topic, 0), TopicPartition(topic, 1)])
    finally:
        await consumer.stop()
    reported = {TP(topic, p): listed[TopicPartition(topic, p)] for p in (0, 1)}
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=10)
    assert await fetched_end_offsets(probe, reported) == {TP(topic, 0): 9, TP(topic, 1): 0}


def test_faust_gets_the_configured_security_settings():
    kafka = Settings.load(overrides={"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                               "sasl_username": "stream", "sasl_password": "s3cret"}}).kafka
    credentials = broker_credentials(kafka, "k1:9093")
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password, credentials.mechanism.value) == \
        ("stream", "s3cret", "SCRAM-SHA-512")
    assert credentials.ssl_context is not None and credentials.protocol.value == "SASL_SSL"
    ssl_only = kafka.model_copy(update={"security_protocol": "SSL"})
    assert isinstance(broker_credentials(ssl_only, "k1:9093"), faust.SSLCredentials)
    assert broker_credentials(kafka.model_copy(update={"security_protocol": "PLAINTEXT"}), "k1:9092") is None
