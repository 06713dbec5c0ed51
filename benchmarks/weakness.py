"""Benchmark of the weakness stream: eval events/s through one Faust worker, and failure-to-plan latency.

Each repetition uses fresh topics on an embedded broker (or ``--bootstrap``):

1. throughput: ``--events`` eval outcomes (12 capabilities, ``--items-per-version`` items per policy
   version) are put in the topic first, then one worker process starts; events/s is the slope of
   the snapshots' ``events_total`` over their timestamps, from the first snapshot to the one that
   covers every event. On these shared 2-core machines wall-clock rates swing with whatever else
   runs, so the worker's own CPU time over the same window is reported too (``events_per_cpu_s``:
   events/s the worker would reach with a core to itself);
2. latency: with the worker idle, one failing outcome at a time is published; the latency is the
   time from just before publishing it to the arrival of the first quota plan whose snapshot counts
   it (``--latency-samples`` per repetition, random gaps so publishes fall anywhere in the worker's
   report cycle).

The table (median, min, max, spread over repetitions) goes to stderr; the last line of stdout is one
JSON object with at least ``events_per_s``, ``plan_latency_p50_s`` and ``plan_latency_p99_s``
(medians over repetitions).

Run: ``python -m benchmarks.weakness [--events 60000] [--repetitions 3]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import click
import yaml
from rich.console import Console

from benchmarks._stats import percentile, print_table
from dpe.broker import EmbeddedBroker
from dpe.bus.admin import ensure_topics
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.events import EvalOutcome, QuotaPlan, WeaknessSnapshot
from dpe.settings import Settings

CAPABILITIES = (
    "geometric", "medical", "chart_graph", "text_dense", "diagram", "math_formula",
    "map", "natural_scene", "artistic", "everyday_object", "architectural", "mixed",
)
"""The DPE paper's twelve image types."""

REPO = Path(__file__).resolve().parent.parent


def outcome(index: int, items_per_version: int, capability: str | None = None,
            version: int | None = None) -> EvalOutcome:
    """The index-th synthetic outcome: every third one fails."""
    correct = index % 3 != 0 if capability is None else False
    return EvalOutcome(
        producer="benchmark",
        policy_version=index // items_per_version if version is None else version,
        suite="bench",
        item_id=f"item-{index}",
        capability=capability or CAPABILITIES[index % len(CAPABILITIES)],
        answer_type="choice",
        expected="A",
        predicted="A" if correct else "B",
        correct=correct,
        score=1.0 if correct else 0.0,
    )


def bench_settings(bootstrap: str, home: Path) -> dict:
    """Settings (as YAML-ready data) of one repetition: fresh topic prefix, the 12 image types."""
    return {
        "home": str(home),
        "log_level": "INFO",
        "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": f"bench{uuid.uuid4().hex[:8]}."},
        "capabilities": list(CAPABILITIES),
        "stream": {"metrics_port": 0},
    }


async def produce(settings: Settings, events: list[EvalOutcome]) -> None:
    async with AsyncPublisher(settings, producer_name="benchmark") as publisher:
        for event in events:
            await publisher.publish(event)
        await publisher.flush()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_throughput(subscriber: AsyncSubscriber, total: int, worker_pid: int,
                             timeout_s: float) -> tuple[float, float, float]:
    """(events/s, seconds, events per worker CPU second) while a worker chews through `total` queued events."""
    points: list[tuple[float, int, float]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for delivery in await subscriber.fetch(timeout_ms=200):
            if isinstance(delivery.event, WeaknessSnapshot):
                points.append((delivery.event.ts.timestamp(), delivery.event.events_total, cpu_seconds(worker_pid)))
        if points and points[-1][1] >= total:
            (t0, n0, cpu0), (t1, n1, cpu1) = points[0], points[-1]
            return (n1 - n0) / (t1 - t0), t1 - t0, (n1 - n0) / (cpu1 - cpu0)
    raise TimeoutError(f"the worker did not process {total} events within {timeout_s:.0f} s (saw {points[-1:]})")


async def measure_latency(settings: Settings, subscriber: AsyncSubscriber, samples: int, start_index: int,
                          version: int, counts: dict[str, int]) -> list[float]:
    """Seconds from publishing one failure to the first quota plan whose snapshot counts it.

    A plan and its snapshot travel on two topics and may arrive in either order: a plan counts once
    both are here.
    """
    snapshots: dict[str, WeaknessSnapshot] = {}
    plans: list[QuotaPlan] = []
    latencies = []
    async with AsyncPublisher(settings, producer_name="benchmark") as publisher:
        for sample in range(samples):
            await asyncio.sleep(random.uniform(0.05, 0.3))
            capability = CAPABILITIES[sample % len(CAPABILITIES)]
            counts[capability] += 1
            started = time.monotonic()
            await publisher.publish_and_wait(outcome(start_index + sample, 1, capability, version))
            while True:
                deliveries = await subscriber.fetch(timeout_ms=50)
                arrived = time.monotonic()
                for delivery in deliveries:
                    if isinstance(delivery.event, WeaknessSnapshot):
                        snapshots[delivery.event.snapshot_id] = delivery.event
                    else:
                        plans.append(delivery.event)
                if any(_counts(snapshots.get(plan.snapshot_id), capability, counts) for plan in plans):
                    latencies.append(arrived - started)
                    plans.clear()
                    break
                if arrived - started > 30:
                    raise TimeoutError(f"no plan reflected the failure for {capability} within 30 s")
    return latencies


def _counts(snapshot: WeaknessSnapshot | None, capability: str, counts: dict[str, int]) -> bool:
    return snapshot is not None and snapshot.capabilities[capability].events >= counts[capability]


async def repetition(bootstrap: str, workdir: Path, events: int, items_per_version: int, samples: int) -> dict:
    """One full measurement on fresh topics with a fresh worker process."""
    config = bench_settings(bootstrap, workdir / "home")
    config_path = workdir / "settings.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = Settings.load(config_path)
    ensure_topics(settings, bootstrap)
    backlog = [outcome(i, items_per_version) for i in range(events)]
    await produce(settings, backlog)
    counts = {c: sum(1 for e in backlog if e.capability == c) for c in CAPABILITIES}

    log = open(workdir / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "dpe", "--config", str(config_path), "serve", "weakness"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with AsyncPublisher(settings) as quiet, AsyncSubscriber(
            settings, [WeaknessSnapshot, QuotaPlan], group_id=None, service="benchmark", publisher=quiet
        ) as subscriber:
            rate, seconds, cpu_rate = await measure_throughput(subscriber, events, worker.pid, timeout_s=300)
            latencies = await measure_latency(settings, subscriber, samples, events,
                                              (events - 1) // items_per_version, counts)
    except Exception:
        sys.stderr.write("worker log (tail):\n" + "\n".join((workdir / "worker.log").read_text().splitlines()[-40:]))
        raise
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
    return {
        "events_per_s": rate,
        "events_per_cpu_s": cpu_rate,
        "throughput_window_s": seconds,
        "plan_latency_p50_s": percentile(latencies, 50),
        "plan_latency_p99_s": percentile(latencies, 99),
        "plan_latency_max_s": max(latencies),
    }


UNITS = {"events_per_s": "events/s", "events_per_cpu_s": "events/cpu-s", "throughput_window_s": "s",
         "plan_latency_p50_s": "s", "plan_latency_p99_s": "s", "plan_latency_max_s": "s"}
TARGETS = {"events_per_s": ">= 5,000", "plan_latency_p99_s": "<= 1"}


@click.command()
@click.option("--events", default=60_000, show_default=True, help="Outcomes queued before the worker starts.")
@click.option("--items-per-version", default=2_000, show_default=True, help="Outcomes per policy version.")
@click.option("--latency-samples", default=100, show_default=True, help="Failures timed per repetition.")
@click.option("--repetitions", default=3, show_default=True)
@click.option("--bootstrap", default=None, help="Use this Kafka instead of starting an embedded broker.")
def main(events: int, items_per_version: int, latency_samples: int, repetitions: int, bootstrap: str | None) -> None:
    """Measure events/s and failure-to-plan latency of the weakness stream."""
    console = Console(stderr=True)
    results = []
    with ExitStack() as stack:
        if bootstrap is None:
            bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap_servers
        for number in range(repetitions):
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dpe-bench-")))
            result = asyncio.run(repetition(bootstrap, workdir, events, items_per_version, latency_samples))
            console.print(f"repetition {number + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items()))
            results.append(result)
    rows = {metric: [r[metric] for r in results] for metric in UNITS}
    print_table(f"weakness stream: {events:,} queued outcomes, {latency_samples} timed failures per run",
                rows, UNITS, TARGETS)
    medians = {metric: statistics.median(values) for metric, values in rows.items()}
    print(json.dumps({**medians, "repetitions": repetitions, "events": events, "runs": rows}))


if __name__ == "__main__":
    main()
