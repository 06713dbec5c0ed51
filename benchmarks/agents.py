"""Agent crew throughput and acceptance on the embedded broker.

Measures, over several repetitions, each on fresh topics fed the same pre-ingested synthetic images:

- accepted samples/s with the programmatic agents (the fast path that reads the answer key) and no
  difficulty check: one worker that has
  already joined its group, from publishing a quota plan to the plan being filled;
- accepted samples/s with the difficulty check at its defaults (the reference band, as `dpe run` has it): the
  default base policy (`dpe.policy.warmup`, cached by recipe) rolls out up to k=9 answers per sample, stopping
  once the verdict is certain, and keeps those it solves 3-7 times; in steady state, with quotas no run fills
  (some capabilities rarely land in the band), over a fixed time, with the candidates/s and rollouts per
  candidate behind it;
- the LLM path's scaling with concurrency 1, 2, 4, 8: validator and answerer behind the local
  OpenAI-compatible server (its own process, serving the tiny random model, which writes
  nonsense, so every candidate ends as a rejection): candidates/s and requests/s, after a
  warm-up run that is not counted;
- the acceptance rate by reason code on the programmatic and the difficulty runs.

With `--teacher` it measures the default roles instead, the pixel stand-ins (`consumers.agents.pixels`)
on items without metadata: accepted samples/s, and the share of accepted samples whose answer is right,
graded against the synthetic world's hidden truth by `benchmarks.teacher` (per capability and level,
with the rejection reasons). Only the grader reads the truth.

Run: `python -m benchmarks.agents [--items 3000] [--repeats 3]`, or
`python -m benchmarks.agents --teacher --items 600 --per-capability 40 --repeats 3`. Tables go to stderr; the last
line of stdout is one JSON object with the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
from prometheus_client import REGISTRY
from rich.console import Console
from rich.table import Table

from benchmarks._stats import print_table, spread
from benchmarks.teacher import grade_samples, teacher_report
from consumers.agents.service import AgentWorker
from dpe.broker import EmbeddedBroker
from dpe.bus.admin import ensure_topics
from dpe.bus.aio import AsyncPublisher
from dpe.bus.follower import read_topic
from dpe.policy.threads import cap_torch_threads
from dpe.events import AcceptedSample, Checkpoint, Event, QuotaPlan, RejectedSample, UnlabeledItem
from dpe.settings import Settings
from dpe.world import CAPABILITIES
from producers.ingest.service import Ingestor
from producers.ingest.sources import synthetic_entries

CONCURRENCY = (1, 2, 4, 8)


@dataclass(frozen=True)
class Run:
    """One repetition: samples accepted per second, and every candidate's outcome (accepted or a reason), over
    `seconds` from the plan's publication to its filling (or the time cap)."""

    outcomes: collections.Counter
    seconds: float
    by_capability: collections.Counter
    """(capability, outcome) counts."""

    @property
    def rate(self) -> float:
        return self.outcomes["accepted"] / self.seconds

    @property
    def candidates_per_s(self) -> float:
        return sum(self.outcomes.values()) / self.seconds


def fresh_settings(bootstrap: str, work: Path, answer_key: bool = False, **agents: Any) -> Settings:
    """Settings on new topics and a new consumer group, sharing one blob store; ingest keeps the world's answer key
    in the items' metadata when `answer_key` (for the fast path only)."""
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    settings = Settings.load(overrides={
        "home": str(work / "home"), "blob": {"url": str(work / "blobs")},
        "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": prefix},
        "ingest": {"answer_key": answer_key},
        "agents": {"group_id": f"{prefix}agents", "metrics_port": 0, **agents},
    })
    ensure_topics(settings, bootstrap)
    return settings


async def publish(settings: Settings, events: list[Event]) -> None:
    async with AsyncPublisher(settings, producer_name="bench") as publisher:
        for event in events:
            await publisher.publish(event)
        await publisher.flush()


async def prepare_items(bootstrap: str, work: Path, count: int, answer_key: bool,
                        seed: int = 11) -> tuple[list[UnlabeledItem], float]:
    """Ingest `count` synthetic scenes of the world's `seed` once (with the answer key for the programmatic fast
    path, pixels only for the stand-ins); their events (re-published to each run) and ingest items/s."""
    settings = fresh_settings(bootstrap, work, answer_key)
    async with AsyncPublisher(settings, producer_name="bench") as publisher:
        started = time.perf_counter()
        entries = synthetic_entries(count, seed=seed, answer_key=answer_key)
        report = await Ingestor.from_settings(settings, publisher).ingest(entries)
        seconds = time.perf_counter() - started
    return await read_topic(settings, UnlabeledItem), report.published / seconds


@contextlib.asynccontextmanager
async def joined_worker(settings: Settings) -> AsyncIterator[AgentWorker]:
    """A worker that follows the topics and owns its partitions (the group join is not timed)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    worker = AgentWorker(settings)
    task = asyncio.create_task(worker.run(stop, ready))
    await asyncio.wait_for(ready.wait(), 300)
    while not worker.items.consumer.assignment() or worker.revoking:
        await asyncio.sleep(0.05)
    try:
        yield worker
    finally:
        stop.set()
        await task


def quota_plan(per_capability: int) -> QuotaPlan:
    quotas = {capability: per_capability for capability in CAPABILITIES}
    return QuotaPlan(round=0, strategy="bench", budget=sum(quotas.values()), quotas=quotas, weights={},
                     snapshot_id="bench", policy_version=0)


async def fill(settings: Settings, items: list[UnlabeledItem], per_capability: int, limit_s: float,
               before: list[Event] = ()) -> Run:
    """Time from publishing a plan to its being filled (or `limit_s`); the outcomes of every candidate."""
    await publish(settings, [*before, *items])
    plan = quota_plan(per_capability)
    async with joined_worker(settings) as worker:
        started = time.perf_counter()
        await publish(settings, [plan])
        while time.perf_counter() - started < limit_s:
            ledger = worker.ledger
            if ledger.plan is not None and ledger.plan.plan_id == plan.plan_id and not any(ledger.remaining().values()):
                break
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - started
        accepted = {capability: worker.ledger.filled(capability, plan_id=plan.plan_id) for capability in plan.quotas}
    rejected = await read_topic(settings, RejectedSample)
    by_capability = collections.Counter((sample.capability, sample.reason_code) for sample in rejected)
    by_capability.update({(capability, "accepted"): n for capability, n in accepted.items()})
    outcomes = collections.Counter(sample.reason_code for sample in rejected)
    outcomes["accepted"] = sum(accepted.values())
    return Run(outcomes, seconds, by_capability)


def _metric_total(name: str, skip: dict[str, str] | None = None) -> float:
    """Sum of a counter over its labels, leaving out samples whose labels match `skip`."""
    return sum(sample.value for metric in REGISTRY.collect() for sample in metric.samples
               if sample.name == name and not (skip and skip.items() <= sample.labels.items()))


def _http_requests() -> float:
    """Requests sent to the endpoint (an invalid reply is counted once more under result=invalid_output)."""
    return _metric_total("dpe_agent_llm_requests_total", skip={"result": "invalid_output"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def llm_server(max_new_tokens: int) -> AsyncIterator[str]:
    """The local OpenAI-compatible server as its own process; yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dpe.endpoint.server", "--port", str(port),
                             "--max-new-tokens", str(max_new_tokens)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                try:
                    if (await client.get(f"{url}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the local LLM server did not start")
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


async def llm_run(bootstrap: str, work: Path, items: list[UnlabeledItem], url: str, concurrency: int,
                  max_new_tokens: int) -> tuple[float, float]:
    """Candidates/s and requests/s of the LLM validator and answerer at `concurrency` requests in flight."""
    settings = fresh_settings(
        bootstrap, work, concurrency=concurrency, attempts_per_item=1,
        backends={"planner": "programmatic", "writer": "programmatic", "validator": "llm", "answerer": "llm"},
        llm={"base_url": url, "concurrency": concurrency, "output_retries": 1, "max_tokens": max_new_tokens},
    )
    await publish(settings, list(items))
    async with joined_worker(settings):
        handled, made, requests = (_metric_total("dpe_agent_items_total"), _metric_total("dpe_agent_samples_total"),
                                   _http_requests())
        started = time.perf_counter()
        await publish(settings, [quota_plan(len(items))])
        while _metric_total("dpe_agent_items_total") - handled < len(items):
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - started
        candidates = _metric_total("dpe_agent_samples_total") - made
        sent = _http_requests() - requests
    return candidates / seconds, sent / seconds


def reasons_table(title: str, outcomes: collections.Counter) -> Table:
    table = Table("outcome", "candidates", "share", title=title)
    total = sum(outcomes.values()) or 1
    for reason, n in sorted(outcomes.items(), key=lambda kv: (kv[0] != "accepted", -kv[1])):
        table.add_row(reason, str(n), f"{n / total:.1%}")
    return table


def capabilities_table(title: str, by_capability: collections.Counter) -> Table:
    """Candidates per capability: accepted, and the two commonest rejection reasons' shares."""
    table = Table("capability", "candidates", "accepted", "too_hard", "too_easy", title=title)
    for capability in CAPABILITIES:
        counts = {outcome: n for (name, outcome), n in by_capability.items() if name == capability}
        total = sum(counts.values()) or 1
        table.add_row(capability, str(sum(counts.values())),
                      *(f"{counts.get(outcome, 0) / total:.1%}" for outcome in ("accepted", "too_hard", "too_easy")))
    return table


def shares(outcomes: collections.Counter) -> dict[str, float]:
    total = sum(outcomes.values()) or 1
    return {reason: round(n / total, 4) for reason, n in outcomes.most_common()}


def warmed_policy_folder(steps: int | None, cache_dir: str | None) -> str:
    """The default warm-up recipe's policy (the default base), with `steps` SFT steps if given."""
    from dpe.policy.config import WarmupConfig
    from dpe.policy.warmup import warm_up

    config = WarmupConfig() if steps is None else WarmupConfig(steps=steps)
    return str(warm_up(config, cache_dir=cache_dir, show_progress=False).folder)


PROGRAMMATIC = {"backends": dict.fromkeys(("planner", "writer", "validator", "answerer"), "programmatic")}
"""The benchmarks' fast path: roles that read the answer key from the items' metadata."""


async def teacher_bench(args: argparse.Namespace, bootstrap: str, work: Path) -> dict[str, Any]:
    """The pixel stand-ins (the default roles) on items without metadata: accepted/s and accuracy against the truth."""
    console = Console(stderr=True)
    runs, graded, rejected = [], [], []
    for repeat in range(args.repeats):
        items, _ = await prepare_items(bootstrap, work, args.items, answer_key=False, seed=11 + repeat)
        console.print(f"ingested {len(items)} synthetic images of seed {11 + repeat}, pixels only (new images each "
                      "run: the toolchains remember what they read)")
        settings = fresh_settings(bootstrap, work, samples_per_item=4)
        runs.append(await fill(settings, items, args.per_capability, limit_s=args.teacher_seconds))
        graded += grade_samples(await read_topic(settings, AcceptedSample), items)
        rejected += await read_topic(settings, RejectedSample)
        console.print(f"pixel stand-ins: {runs[-1].rate:,.1f} accepted/s")
    report = teacher_report(graded, rejected)
    print_table("pixel stand-ins", {"accepted/s": [run.rate for run in runs]}, {"accepted/s": "samples/s"},
                {"accepted/s": ">= 20"})
    table = Table("capability", "accepted", "right", title="accepted samples graded against the hidden truth")
    for capability, accuracy in report["teacher_accuracy_by_capability"].items():
        table.add_row(capability, str(report["teacher_accepted_by_capability"][capability]), f"{accuracy:.3f}")
    table.add_row("all", str(len(graded)), f"{report['teacher_answer_accuracy'] or 0:.3f}")
    console.print(table)
    console.print(reasons_table("acceptance by reason, pixel stand-ins",
                                sum((run.outcomes for run in runs), collections.Counter())))
    return {"accepted_per_s_teacher": _median([run.rate for run in runs]), **report}


async def bench(args: argparse.Namespace, bootstrap: str, work: Path) -> dict[str, Any]:
    console = Console(stderr=True)
    items, ingest_rate = await prepare_items(bootstrap, work, args.items, answer_key=True)
    console.print(f"ingested {len(items)} synthetic images ({ingest_rate:,.0f} items/s)")
    programmatic = []
    for _ in range(args.repeats):
        settings = fresh_settings(bootstrap, work, samples_per_item=4, **PROGRAMMATIC)
        programmatic.append(await fill(settings, items, args.per_capability, limit_s=120))
        console.print(f"programmatic: {programmatic[-1].rate:,.0f} accepted/s")

    difficulty = []
    if args.difficulty_repeats:
        checkpoint = Checkpoint(policy_version=1, uri=warmed_policy_folder(args.warmup_steps, args.model_cache))
    rollouts = []
    for _ in range(args.difficulty_repeats):
        settings = fresh_settings(bootstrap, work, samples_per_item=4, qc={"difficulty": {"enabled": True}},
                                  **PROGRAMMATIC)
        cap_torch_threads(settings.agents.qc.difficulty.torch_threads)
        sampled = _metric_total("dpe_agent_band_rollouts_total")
        difficulty.append(await fill(settings, items, args.difficulty_per_capability, args.difficulty_seconds,
                                     before=[checkpoint]))
        rollouts.append((_metric_total("dpe_agent_band_rollouts_total") - sampled) / difficulty[-1].seconds)
        console.print(f"with difficulty: {difficulty[-1].rate:,.2f} accepted/s, {rollouts[-1]:,.0f} rollouts/s, "
                      f"{difficulty[-1].candidates_per_s:,.1f} candidates/s")

    llm_items = items[: args.llm_items]
    candidates: dict[int, list[float]] = collections.defaultdict(list)
    requests: dict[int, list[float]] = collections.defaultdict(list)
    async with llm_server(args.max_new_tokens) if args.llm_repeats else contextlib.nullcontext() as url:
        if args.llm_repeats:
            await llm_run(bootstrap, work, llm_items[:8], url, max(CONCURRENCY), args.max_new_tokens)
        for _ in range(args.llm_repeats):
            for concurrency in CONCURRENCY:
                rate, sent = await llm_run(bootstrap, work, llm_items, url, concurrency, args.max_new_tokens)
                candidates[concurrency].append(rate)
                requests[concurrency].append(sent)
                console.print(f"LLM path, concurrency {concurrency}: {rate:,.2f} candidates/s, {sent:,.2f} requests/s")

    rows = {"accepted/s, programmatic": [run.rate for run in programmatic],
            "accepted/s, difficulty band 3-7 of 9": [run.rate for run in difficulty],
            "candidates/s, difficulty band": [run.candidates_per_s for run in difficulty],
            "band rollouts/s": rollouts,
            "band rollouts per candidate": [r / run.candidates_per_s for r, run in zip(rollouts, difficulty)],
            "ingest (synthetic)": [ingest_rate]}
    units = {"accepted/s, programmatic": "samples/s", "accepted/s, difficulty band 3-7 of 9": "samples/s",
             "candidates/s, difficulty band": "candidates/s", "band rollouts/s": "rollouts/s",
             "band rollouts per candidate": "of k = 9",
             "ingest (synthetic)": "items/s"}
    for concurrency in CONCURRENCY:
        rows[f"LLM candidates, concurrency {concurrency}"] = candidates[concurrency]
        rows[f"LLM requests, concurrency {concurrency}"] = requests[concurrency]
        units[f"LLM candidates, concurrency {concurrency}"] = "candidates/s"
        units[f"LLM requests, concurrency {concurrency}"] = "requests/s"
    print_table("agent crew", {name: values for name, values in rows.items() if values}, units,
                {"accepted/s, programmatic": ">= 200", "accepted/s, difficulty band 3-7 of 9": ">= 30"})
    programmatic_outcomes = sum((run.outcomes for run in programmatic), collections.Counter())
    difficulty_outcomes = sum((run.outcomes for run in difficulty), collections.Counter())
    for title, outcomes in (("programmatic", programmatic_outcomes), ("difficulty band 3-7 of 9", difficulty_outcomes)):
        if outcomes:
            console.print(reasons_table(f"acceptance by reason, {title}", outcomes))
    if difficulty:
        console.print(capabilities_table("difficulty band 3-7 of 9, by capability",
                                         sum((run.by_capability for run in difficulty), collections.Counter())))
    return {
        "accepted_per_s": _median([run.rate for run in programmatic]),
        "accepted_per_s_with_difficulty": _median([run.rate for run in difficulty]),
        "band_rollouts_per_s": _median(rollouts),
        "band_candidates_per_s": _median([run.candidates_per_s for run in difficulty]),
        "ingest_items_per_s": ingest_rate,
        "llm_candidates_per_s": {str(c): _median(candidates[c]) for c in CONCURRENCY},
        "llm_requests_per_s": {str(c): _median(requests[c]) for c in CONCURRENCY},
        "acceptance_by_reason": {"programmatic": shares(programmatic_outcomes),
                                 "difficulty": shares(difficulty_outcomes)},
    }


def _median(values: list[float]) -> float | None:
    return spread(values)["median"] if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3000, help="Synthetic images ingested once, fed to every run.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-capability", type=int, default=300, help="Quota per capability, programmatic runs.")
    parser.add_argument("--difficulty-repeats", type=int, default=3)
    parser.add_argument("--difficulty-per-capability", type=int, default=100_000,
                        help="Quota per capability of a difficulty run (the default is never filled: steady state).")
    parser.add_argument("--difficulty-seconds", type=float, default=30.0, help="Duration of a difficulty run.")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="SFT steps of the warmed policy (cached; default: the default base's).")
    parser.add_argument("--model-cache", default=None, help="Warm-up cache folder (default $DPE_MODEL_CACHE).")
    parser.add_argument("--llm-items", type=int, default=24)
    parser.add_argument("--llm-repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--teacher", action="store_true",
                        help="Measure the pixel stand-ins instead: accepted/s and accuracy against the hidden truth.")
    parser.add_argument("--teacher-seconds", type=float, default=120.0, help="Time cap of a stand-in run.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpe-bench-agents-"))
    try:
        with EmbeddedBroker() as broker:
            result = asyncio.run((teacher_bench if args.teacher else bench)(args, broker.bootstrap_servers, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
