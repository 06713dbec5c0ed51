"""Agent workers through the real embedded broker: exact quotas, two workers, kill -9, new plans, routing."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumers.agents.ledger import QuotaLedger, item_slice, split_quota
from consumers.agents.service import AgentWorker
from dpe.bus.aio import AsyncPublisher
from dpe.config import with_overrides
from dpe.events import (
    AcceptedSample,
    CapabilityDiagnosis,
    Checkpoint,
    DeadLetter,
    Diagnosis,
    FailedItem,
    RejectedSample,
    UnlabeledItem,
)
from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up
from dpe.topics import topic_for
from dpe.world import question_kind, scene_of_source
from producers.ingest.service import Ingestor, paced
from producers.ingest.sources import synthetic_entries
from tests.agent_helpers import FAST_PATH, eventually, plan, publish_all, read_all

REPO = Path(__file__).resolve().parent.parent
ALL_QUOTAS = {"counting": 6, "color": 5, "spatial": 4, "existence": 5, "text_reading": 7, "chart": 7, "arithmetic": 7}


@pytest.fixture
def settings(settings):
    """Each test's workers form their own consumer group."""
    group = f"agents-{settings.kafka.topic_prefix}"
    return settings.model_copy(update={"agents": settings.agents.model_copy(update={"group_id": group})})


@pytest.fixture
def fast_path(settings):
    """Settings on the benchmarks' fast path (`FAST_PATH`); the default pixel crew fills a plan in the first test."""
    return with_overrides(settings, FAST_PATH)


async def ingest(settings, count: int, seed: int = 0, rate: float = 0.0) -> None:
    entries = synthetic_entries(count, seed, answer_key=settings.ingest.answer_key)
    async with AsyncPublisher(settings, producer_name="ingest") as publisher:
        report = await Ingestor.from_settings(settings, publisher).ingest(paced(entries, rate))
    assert report.published == count


@asynccontextmanager
async def running_worker(settings):
    stop, ready = asyncio.Event(), asyncio.Event()
    worker = AgentWorker(settings)
    task = asyncio.create_task(worker.run(stop, ready))
    await asyncio.wait_for(ready.wait(), 60)
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def counts(settings, plan_id: str) -> collections.Counter:
    accepted = {s.sample_id: s for s in await read_all(settings, AcceptedSample) if s.plan_id == plan_id}
    return collections.Counter(sample.capability for sample in accepted.values())


def test_quota_slices_sum_to_the_quota_and_reservations_never_exceed_room():
    assert all(sum(split_quota(q, p, c)) == q for q in range(0, 40) for p in (1, 3, 4) for c in ("color", "chart"))
    ledger = QuotaLedger(partitions=1)
    ledger.use_plan(plan({"counting": 2, "chart": 1}))
    held = [ledger.reserve(0, None) for _ in range(4)]
    assert sorted(r.capability for r in held[:3]) == ["chart", "counting", "counting"] and held[3] is None
    assert ledger.blocked(0, None), "room is left, but all of it is held by attempts in flight"
    ledger.release(held[0])
    again = ledger.reserve(0, None)
    assert again is not None and again.capability == held[0].capability, "a failed attempt frees its slot"
    for number, reservation in enumerate([again, *held[1:3]]):
        assert ledger.record(reservation.plan_id, reservation.capability, "item", f"sample-{number}")
        assert not ledger.record(reservation.plan_id, reservation.capability, "item", f"sample-{number}")
        ledger.release(reservation)
    assert ledger.reserve(0, None) is None and not ledger.blocked(0, None) and not ledger.open_slice(0)
    assert ledger.remaining() == {"counting": 0, "chart": 0}
    assert ledger.plan_of("sample-0") == ledger.plan.plan_id


def test_the_room_of_a_capability_out_of_reach_goes_to_the_others_and_the_slice_never_overfills():
    ledger = QuotaLedger(partitions=1)
    ledger.use_plan(plan({"arithmetic": 3, "color": 1, "counting": 1}))
    first = ledger.reserve(0, {"arithmetic"})
    ledger.record(first.plan_id, "arithmetic", "item", "sample-a")
    ledger.release(first)
    ledger.set_out_of_reach({"arithmetic"})
    assert ledger.reserve(0, {"arithmetic"}) is None and not ledger.blocked(0, {"arithmetic"})
    held = [ledger.reserve(0, {"color", "counting"}) for _ in range(5)]
    assert held[4] is None, "the slice's 5 targets: 1 arithmetic accepted, 4 left over all capabilities"
    assert sorted(r.capability for r in held[:4]) == ["color", "color", "counting", "counting"]
    assert ledger.blocked(0, {"color"})
    for number, reservation in enumerate(held[:4]):
        ledger.record(reservation.plan_id, reservation.capability, "item", f"sample-{number}")
        ledger.release(reservation)
    assert not ledger.open_slice(0) and ledger.reserve(0, None) is None
    assert sum(ledger.filled(capability) for capability in ledger.plan.quotas) == ledger.plan.budget
    ledger.set_out_of_reach(set())
    assert ledger.reserve(0, {"arithmetic"}) is None, "back in reach (a restarted worker), its room is still taken"
    assert not ledger.open_slice(0)


async def test_one_worker_fills_each_capability_exactly_follows_a_new_plan_and_dead_letters_misrouted_items(settings):
    await ingest(settings, 1, seed=99)
    misrouted = UnlabeledItem(item_id="f" * 64, image=(await read_all(settings, UnlabeledItem))[0].image, source="test")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await producer.start()
    # At the head of its partition, so the worker reads it however few items it needs to fill the plans.
    await producer.send_and_wait(topic_for(UnlabeledItem, settings.kafka.topic_prefix), misrouted.model_dump_json().encode(),
                                 key=misrouted.key().encode(), partition=(item_slice(misrouted.item_id, 4) + 1) % 4)
    await producer.stop()
    await ingest(settings, 480)
    first = plan(ALL_QUOTAS)
    await publish_all(settings, [first])

    async with running_worker(settings):
        assert await eventually(lambda: _equal(settings, first), 60)
        second = plan({"counting": 4, "chart": 3, "text_reading": 2}, round=1)
        await publish_all(settings, [second])
        assert await eventually(lambda: _equal(settings, second), 60)
        await asyncio.sleep(2)

    accepted = await read_all(settings, AcceptedSample)
    assert len(accepted) == len({s.sample_id for s in accepted}) == sum(first.quotas.values()) + sum(second.quotas.values())
    assert await counts(settings, first.plan_id) == collections.Counter(first.quotas)
    assert await counts(settings, second.plan_id) == collections.Counter(second.quotas)
    sources = {item.item_id for item in await read_all(settings, UnlabeledItem)}
    for sample in accepted:
        assert sample.source_item_id in sources and sample.policy_version == 0
        assert [v.check for v in sample.qc] == ["schema", "near_duplicate", "answerability", "agreement"]
        assert all(v.passed for v in sample.qc)
        assert {"planner", "writer", "validator", "answerer"} <= {step.role for step in sample.agents}
    edited = [s for s in accepted if any(step.role == "editor" for step in s.agents)]
    assert edited and all(s.body.image.sha256 != s.source_item_id for s in edited)
    letters = await read_all(settings, DeadLetter)
    assert [(d.error_class, d.stage) for d in letters] == [("MisroutedItem", "agents.route")]
    for rejected in await read_all(settings, RejectedSample):
        assert rejected.reason_code and not next(v for v in rejected.qc if not v.passed).passed


async def _equal(settings, quota_plan) -> bool:
    return await counts(settings, quota_plan.plan_id) == collections.Counter(quota_plan.quotas)


async def test_with_the_difficulty_band_off_a_sample_carries_the_newest_announced_version(settings):
    """Lineage: a base policy configured for the band must not pin every sample to version 0 for ever (the
    trainer drops samples more than `staleness.max_versions` behind, so the spiral would stop training)."""
    base = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    settings = with_overrides(settings, {"agents": {"qc": {"difficulty": {"enabled": False, "base_policy": str(base)}}}})
    await ingest(settings, 120)
    announced = [Checkpoint(policy_version=version, uri=str(base)) for version in (1, 2, 3)]
    wanted = plan({"counting": 3, "color": 3}, policy_version=3)
    await publish_all(settings, [*announced, wanted])
    async with running_worker(settings):
        assert await eventually(lambda: _equal(settings, wanted), 60)
    accepted = [s for s in await read_all(settings, AcceptedSample) if s.plan_id == wanted.plan_id]
    assert len(accepted) == 6 and {sample.policy_version for sample in accepted} == {3}


async def test_a_plan_is_filled_with_the_diagnosis_of_the_version_it_was_made_from(fast_path):
    """The worker follows the diagnosis topic: a plan made from version 2's evidence asks what version 2 failed
    (plain counts), not what version 1 failed (counts by colour), even though version 1's diagnosis came later."""
    settings = fast_path
    await ingest(settings, 240, seed=3)
    by_colour = failing_counts("How many red shapes are in the image?", policy_version=1)
    plain = failing_counts("How many shapes are in the image?", policy_version=2)
    wanted = plan({"counting": 12}, policy_version=2)
    await publish_all(settings, [plain, by_colour, wanted])
    async with running_worker(settings):
        assert await eventually(lambda: _equal(settings, wanted), 60)
    accepted = [s for s in await read_all(settings, AcceptedSample) if s.plan_id == wanted.plan_id]
    kinds = collections.Counter(question_kind("counting", s.body.question, s.body.answer) for s in accepted)
    assert kinds["all"] >= 8, kinds
    assert all("aimed by the diagnosis" in next(step.detail for step in s.agents if step.role == "planner")
               for s in accepted)


def failing_counts(question: str, policy_version: int) -> Diagnosis:
    """A diagnosis in which every failed counting item asked `question`."""
    failed = FailedItem(item_id="d1", suite="synthetic", question=question, expected="3", given="4")
    brief = CapabilityDiagnosis(graded=12, wrong=6, error_mix={"other": 1.0}, failures=[failed] * 6, analysis="")
    return Diagnosis(policy_version=policy_version, capabilities={"counting": brief})


async def test_two_workers_share_the_partitions_and_do_not_overshoot(fast_path):
    settings = fast_path
    async with running_worker(settings) as one, running_worker(settings) as two:
        assert await eventually(lambda: _both_assigned(one, two), 30, every_s=0.2)
        quotas = {capability: quota * 2 for capability, quota in ALL_QUOTAS.items()}
        shared = plan(quotas)
        await publish_all(settings, [shared])
        await ingest(settings, 700, seed=1)
        assert await eventually(lambda: _equal(settings, shared), 60)
        await asyncio.sleep(3)
    accepted = await read_all(settings, AcceptedSample)
    assert len(accepted) == len({s.sample_id for s in accepted}) == sum(quotas.values())
    assert await counts(settings, shared.plan_id) == collections.Counter(quotas)


async def _both_assigned(one: AgentWorker, two: AgentWorker) -> bool:
    """Both workers own partitions, none twice, all 4 of each topic; each owns the same unlabeled and lead
    partitions (co-partitioned, so a lead falls in a quota slice its worker owns)."""
    a, b = one.items.consumer.assignment(), two.items.consumer.assignment()
    if not a or not b or a & b or len(a | b) != 8:
        return False
    unlabeled, leads = one.items.topics
    return all({tp.partition for tp in owned if tp.topic == unlabeled} == {tp.partition for tp in owned
                                                                           if tp.topic == leads} for owned in (a, b))


def spawn_worker(settings, log: Path) -> subprocess.Popen:
    """`dpe serve agents` as a real child process."""
    args = [sys.executable, "-m", "dpe", "--bootstrap", settings.kafka.bootstrap_servers,
            "--topic-prefix", settings.kafka.topic_prefix, "--home", str(settings.home), "serve", "agents",
            "--group", settings.agents.group_id, "--metrics-port", "0"]
    with open(log, "ab") as out:
        env = os.environ | {"DPE_BLOB__URL": settings.blob.url,
                            "DPE_AGENTS__BACKENDS": settings.agents.backends.model_dump_json()}
        return subprocess.Popen(args, cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


FILLED = 36


async def test_a_worker_killed_with_sigkill_loses_no_item_and_the_plan_is_still_filled(fast_path, tmp_path):
    """Text and formula items are always needed (their quotas exceed the stream), so each must end as an
    accepted or rejected sample; counting and chart quotas are below the stream's 62 shape and 59 chart
    scenes, so they must end exactly filled, and large enough that the kill lands before they are."""
    settings = fast_path
    quotas = {"counting": FILLED, "chart": FILLED, "text_reading": 1000, "arithmetic": 1000}
    the_plan = plan(quotas)
    await publish_all(settings, [the_plan])
    first = spawn_worker(settings, tmp_path / "first.log")
    second = None
    try:
        stream = asyncio.create_task(ingest(settings, 240, seed=2, rate=20))
        assert await eventually(lambda: _accepted_at_least(settings, 4), 60, every_s=0.1), \
            (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = datetime.now(timezone.utc)
        at_kill = await counts(settings, the_plan.plan_id)
        second = spawn_worker(settings, tmp_path / "second.log")
        await stream
        items = await read_all(settings, UnlabeledItem)
        needed = {item.item_id for item in items if scene_of_source(item.source).kind in ("text", "formula")}

        async def finished() -> bool:
            outcomes = {s.source_item_id for s in await read_all(settings, AcceptedSample)}
            outcomes |= {r.source_item_id for r in await read_all(settings, RejectedSample)}
            done = await counts(settings, the_plan.plan_id)
            return needed <= outcomes and done["counting"] == FILLED and done["chart"] == FILLED

        assert await eventually(finished, 120, every_s=1), (tmp_path / "second.log").read_text()[-3000:]
        await asyncio.sleep(2)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    accepted = await read_all(settings, AcceptedSample)
    done = await counts(settings, the_plan.plan_id)
    assert done["counting"] == FILLED and done["chart"] == FILLED, done
    assert len(accepted) == len({s.sample_id for s in accepted}), "a redo after kill -9 publishes nothing twice"
    assert at_kill["counting"] + at_kill["chart"] < 2 * FILLED and any(s.ts > killed_at for s in accepted), \
        "the kill happened while the plan was being filled, and the second worker finished it"


async def _accepted_at_least(settings, n: int) -> bool:
    return len(await read_all(settings, AcceptedSample)) >= n


def test_a_republished_plan_continues_the_followed_one():
    ledger = QuotaLedger(partitions=2)
    first = plan({"counting": 4, "color": 2})
    assert ledger.use_plan(first)
    assert not ledger.use_plan(plan({"counting": 4, "color": 2}, round=7)), "same quotas, same version: continue"
    assert ledger.plan.plan_id == first.plan_id
    assert ledger.use_plan(plan({"counting": 4, "color": 2}, policy_version=1)), "a new policy version is a new round"
    assert ledger.use_plan(plan({"counting": 3, "color": 3}, policy_version=1)), "changed quotas are a new plan"
