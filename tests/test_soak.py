"""The chaos soak (`benchmarks.soak`): its invariants catch what they are there to catch, its observer
follows a bus that moves, and (slow) a six-minute chaos soak of the real spiral keeps every invariant."""

from __future__ import annotations

import asyncio
import doctest
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from benchmarks.soak.chaos import GROUP_MEMBERS, schedule
from benchmarks.soak.invariants import (
    AcceptedRecord,
    Frontier,
    busy_share,
    evidence_of,
    lineage,
    plan_fills,
    sample_fates,
    stalls,
    trained_twice,
    version_gaps,
    weakness_diffs,
)
from benchmarks.soak.observer import BUS_FILE, Observations, observe
from benchmarks.soak.processes import SERVICES
from benchmarks.soak.rss import MIB, growth_mb
from dpe.broker import EmbeddedBroker
from dpe.bus.admin import ensure_topics
from dpe.bus.aio import AsyncPublisher
from dpe.bus.delivery import Delivery
from dpe.config import with_overrides
from dpe.events import AcceptedSample, AgentStep, BlobRef, Checkpoint, EvalOutcome, Event, QuotaPlan, SampleBody
from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up
from streams.contracts import CapabilityReport
from streams.merger import build_snapshot
from streams.scoring import replay, summarise
from streams.settings import ScoringSettings
from tests.agent_helpers import QUICK_EVAL

REPO = Path(__file__).resolve().parent.parent
SOAK_MODULES = ("chaos", "disk", "invariants", "observer", "processes", "rss", "__main__")


def checkpoint(version: int, sample_ids: list[str], parent: int | None = None) -> Checkpoint:
    return Checkpoint(policy_version=version, parent_version=version - 1 if parent is None and version else parent,
                      uri=f"/c/{version}", sample_ids=sample_ids)


def record(sample_id: str, offset: int, plan_id: str = "p", capability: str = "color", epoch: int = 0) -> AcceptedRecord:
    return AcceptedRecord(sample_id, plan_id, capability, partition=0, offset=offset, epoch=epoch)


def plan(version: int, quotas: dict[str, int]) -> QuotaPlan:
    return QuotaPlan(round=version, strategy="uniform", budget=sum(quotas.values()), quotas=quotas, weights={},
                     snapshot_id="s", policy_version=version)


@pytest.mark.parametrize("module", SOAK_MODULES)
def test_the_soak_modules_examples_hold(module: str) -> None:
    """The docstrings' examples (benchmarks/ is outside pytest's doctest paths)."""
    failed, _ = doctest.testmod(importlib.import_module(f"benchmarks.soak.{module}"))
    assert failed == 0


def test_a_sample_trained_by_two_versions_of_the_lineage_is_caught_and_one_off_it_is_not() -> None:
    chain = lineage([checkpoint(0, []), checkpoint(1, ["a", "b"]), checkpoint(2, ["c", "a"]),
                     checkpoint(3, ["b"], parent=1)])
    assert [c.policy_version for c in chain] == [0, 1, 3]
    assert trained_twice(chain) == {"b": [1, 3]}
    assert trained_twice([checkpoint(0, []), checkpoint(1, ["a", "a"])]) == {"a": [1, 1]}


def test_a_missing_version_is_a_gap() -> None:
    assert version_gaps([0, 1, 2, 3]) == []
    assert version_gaps([0, 1, 3, 5]) == [2, 4]
    assert version_gaps([]) == []


def test_an_accepted_sample_neither_trained_nor_skipped_before_the_frontier_is_lost() -> None:
    chain = [checkpoint(0, []), checkpoint(1, ["a"]), checkpoint(2, ["c"])]
    records = [record("a", 0), record("b", 1), record("c", 2), record("d", 3), record("a", 4), record("e", 5)]
    frontier = Frontier(epoch=0, positions={0: 5})
    fates = sample_fates(records, chain, {1: {}, 2: {"duplicate": ["a"], "stale_dropped": ["d"]}}, frontier)
    assert fates.trained == {"a", "c"}
    assert dict(fates.skipped) == {"d": "stale_dropped"}
    assert fates.pending == {"e"}
    assert set(fates.lost) == {"b"}


def test_samples_read_on_a_later_bus_than_the_newest_checkpoint_are_pending_and_nothing_trained_means_pending() -> None:
    chain = [checkpoint(0, []), checkpoint(1, ["a"])]
    records = [record("a", 0), record("x", 0, epoch=1)]
    assert sample_fates(records, chain, {1: {}}, Frontier(epoch=0, positions={0: 1})).pending == {"x"}
    assert sample_fates([record("y", 0)], [checkpoint(0, [])], {}, None).pending == {"y"}


def test_a_plan_short_of_its_quotas_is_unfilled_unless_its_round_is_open_or_closed_by_timeout() -> None:
    first, second, third = plan(0, {"color": 2, "chart": 1}), plan(1, {"color": 1, "chart": 2}), plan(2, {"color": 3})
    records = [record("a", 0, first.plan_id), record("b", 1, first.plan_id, "chart"),
               record("c", 2, second.plan_id), record("d", 3, third.plan_id)]
    chain = [checkpoint(0, []), checkpoint(1, ["a", "b"]), checkpoint(2, ["c", "d", "e"])]
    fills = {fill.policy_version: fill for fill in plan_fills([first, second, third], records, chain, round_samples=3)}
    assert (fills[0].status, fills[1].status, fills[2].status) == ("timed_out", "unfilled", "open")
    assert [fill.failed for fill in fills.values()] == [False, True, False]


def test_a_plan_filled_exactly_passes_its_repeats_count_for_it_and_overfilling_or_replanning_fails() -> None:
    first = plan(0, {"color": 2})
    repeat = first.model_copy(update={"plan_id": "repeat"})
    records = [record("a", 0, first.plan_id), record("b", 1, "repeat"), record("b", 2, "repeat")]
    chain = [checkpoint(0, []), checkpoint(1, ["a", "b"])]
    assert [f.status for f in plan_fills([first, repeat], records, chain, round_samples=2)] == ["filled"]
    over = [*records, record("c", 3, first.plan_id)]
    assert [f.status for f in plan_fills([first, repeat], over, chain, round_samples=2)] == ["overfilled"]
    replanned = plan(0, {"color": 1, "chart": 1})
    statuses = [f.status for f in plan_fills([first, replanned], records[:1], [checkpoint(0, [])], round_samples=2)]
    assert statuses == ["replanned", "open"]


def test_a_plan_whose_out_of_reach_room_went_to_others_is_spilled_and_its_budget_is_still_a_hard_limit() -> None:
    mixed = plan(0, {"color": 1, "arithmetic": 1})
    chain = [checkpoint(0, []), checkpoint(1, ["a", "b"])]
    spilled = [record("a", 0, mixed.plan_id), record("b", 1, mixed.plan_id)]
    assert [f.status for f in plan_fills([mixed], spilled, chain, round_samples=2)] == ["spilled"]
    beyond = [*spilled, record("c", 2, mixed.plan_id)]
    assert [f.status for f in plan_fills([mixed], beyond, chain, round_samples=2)] == ["overfilled"]
    elsewhere = [record("a", 0, mixed.plan_id), record("b", 1, mixed.plan_id, "chart")]
    assert [f.status for f in plan_fills([mixed], elsewhere, chain, round_samples=2)] == ["overfilled"]


def test_the_weakness_of_a_snapshot_missing_evidence_differs_from_the_recomputation() -> None:
    params = ScoringSettings(taxonomy=("color", "chart"))
    outcomes = [EvalOutcome(policy_version=0, suite="synthetic", item_id=f"i{i}", capability="color",
                            answer_type="text", expected="red", predicted="red", correct=i % 2 == 0,
                            score=float(i % 2 == 0)) for i in range(6)]
    evidence = [evidence_of(outcome, params) for outcome in outcomes]
    heldout = outcomes[0].model_copy(update={"suite": "heldout"})
    assert evidence_of(heldout, params) is None
    state = replay(evidence, params)["color"]
    report = CapabilityReport(revision=1, policy_version=0, weakness=summarise(state, params))
    snapshot = build_snapshot({"color": report}, params, seq=1)
    assert weakness_diffs(snapshot, evidence, params) == []
    diffs = weakness_diffs(snapshot, evidence[:-1], params)
    assert {diff.field for diff in diffs} >= {"events", "error_rate"} and {d.capability for d in diffs} == {"color"}


def test_stalls_busy_share_and_rss_growth() -> None:
    assert stalls([5.0, 30.0, 60.0], start=5.0, end=400.0, after_s=180.0) == [(60.0, 400.0)]
    assert stalls([5.0, 30.0, 60.0], start=5.0, end=200.0, after_s=180.0) == []
    chain = [checkpoint(0, []), Checkpoint(policy_version=1, parent_version=0, uri="1", metrics={"train_s": 6.0})]
    assert busy_share(chain, wall_s=30.0) == pytest.approx(0.2)
    flat = [(float(t), 500 * MIB) for t in range(20)]
    assert growth_mb(flat, after=0.0) == 0.0
    assert growth_mb([(0.0, MIB)], after=0.0) is None


def test_the_fault_schedule_kills_each_service_in_turn_and_is_seeded() -> None:
    faults = schedule(seed=11, window_s=450.0, disk=True)
    assert [f.service for f in faults if f.kind == "kill"] == list(SERVICES)
    kinds = sorted(f.kind for f in faults)
    assert kinds.count("kill") == 6 and {"kill_mid_checkpoint", "stop", "disk_full"} <= set(kinds)
    assert next(f for f in faults if f.kind == "stop").service in GROUP_MEMBERS
    assert schedule(seed=11, window_s=450.0, disk=True) == faults != schedule(seed=12, window_s=450.0, disk=True)
    assert "disk_full" not in {f.kind for f in schedule(seed=11, window_s=450.0, disk=False)}


def accepted(sample_id: str) -> AcceptedSample:
    image = BlobRef(sha256="0" * 64, media_type="image/png", size_bytes=1, width=1, height=1)
    return AcceptedSample(sample_id=sample_id, capability="color", source_item_id="i", plan_id="p",
                          body=SampleBody(image=image, question="Which colour?", answer="red", answer_type="text"),
                          agents=[AgentStep(role="writer", backend="programmatic")], qc=[], policy_version=0)


def test_observations_de_duplicate_by_event_id_and_keep_where_an_accepted_sample_was_last_seen() -> None:
    seen = Observations(ScoringSettings(taxonomy=("color",)), clock=lambda: 1.0)
    sample, base = accepted("s1"), Checkpoint(policy_version=0, uri="/b")

    def at(event: Event, offset: int) -> Delivery:
        return Delivery(event, SimpleNamespace(topic="t", partition=0, offset=offset))

    seen.add(at(sample, 7), epoch=0)
    seen.add(at(base, 0), epoch=0)
    seen.add(at(sample, 0), epoch=1)
    seen.add(at(base, 0), epoch=1)
    assert [(r.offset, r.epoch) for r in seen.accepted.values()] == [(0, 1)]
    assert seen.checkpoint_epochs == {0: 0} and seen.version_seen_at == {0: 1.0}


async def test_the_observer_follows_bus_json_to_a_new_broker_and_reads_carried_records_once(settings, tmp_path):
    """Epoch 0 on the session broker; then bus.json names a fresh broker (epoch 1) that holds a carried copy of
    the first checkpoint and a new one."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base, first = Checkpoint(policy_version=0, uri="/b"), Checkpoint(policy_version=1, parent_version=0, uri="/1")
    async with AsyncPublisher(settings) as publisher:
        await publisher.publish_and_wait(base)
    (run_dir / BUS_FILE).write_text(json.dumps({"bootstrap_servers": settings.kafka.bootstrap_servers, "epoch": 0}))
    seen = Observations(settings.stream.scoring, clock=lambda: 0.0)
    stop = asyncio.Event()
    task = asyncio.create_task(observe(settings, run_dir, seen, stop))
    try:
        await _until(lambda: 0 in seen.checkpoints)
        with EmbeddedBroker() as fresh:
            moved = with_overrides(settings, {"kafka": {"bootstrap_servers": fresh.bootstrap_servers}})
            ensure_topics(moved, fresh.bootstrap_servers)
            async with AsyncPublisher(moved) as publisher:
                await publisher.publish_and_wait(base)
                await publisher.publish_and_wait(first)
            (run_dir / BUS_FILE).write_text(json.dumps({"bootstrap_servers": fresh.bootstrap_servers, "epoch": 1}))
            await _until(lambda: 1 in seen.checkpoints)
            assert seen.epoch == 1 and seen.checkpoint_epochs == {0: 0, 1: 1}
    finally:
        stop.set()
        await task


async def _until(condition: Callable[[], bool], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.spiral
def test_a_six_minute_chaos_soak_keeps_every_invariant(tmp_path: Path) -> None:
    """The real spiral, one pass of faults (every service killed, the trainer mid-checkpoint, a SIGSTOP, a full
    checkpoint disk where mount works), then the invariants from the topics and the checkpoints.

    The default pixel crew makes the samples; the base model is the quickly warmed one and the evaluator grades
    `QUICK_EVAL`'s small suites, as in the other tests of `dpe run`: the soak is about faults and bookkeeping, and
    its six minutes go to the spiral rather than to warming the default model. The faults come closer together than in
    a longer soak (one pass of them, in about four minutes)."""
    config = tmp_path / "dpe.yaml"
    config.write_text(yaml.safe_dump({"evaluator": QUICK_EVAL}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("DPE_")} | {"DPE_CONFIG": str(config)}
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    done = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--minutes", "6", "--chaos", "--seed", "0",
                           "--runs-dir", str(tmp_path / "runs"), "--base-model", str(base_model)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1400, check=False)
    assert done.returncode == 0, done.stderr[-6000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["versions_advanced"] > 0
    assert summary["kills"] >= 6
    assert summary["trained_twice"] == 0 and summary["lost_samples"] == 0
    assert summary["weakness_mismatch"] == 0 and summary["plans_unfilled"] == 0
    assert summary["version_gaps"] == 0 and summary["stalls"] == 0 and summary["faults_failed"] == 0
    assert summary["run_exit_code"] == 0
