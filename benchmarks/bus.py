"""Bus throughput and latency on the embedded broker, through dpe's own validated clients.

Measures, over several repetitions on a fresh topic each time:
- produce: ~1 KB EvalOutcome events through `AsyncPublisher` (encode + send + flush), events/s;
- consume: the same events through `AsyncSubscriber.fetch` (fetch + decode + validate), events/s;
- end-to-end latency: events published at a steady rate, time from `publish` to the consumer
  holding the validated event, p50/p99 in ms.

The embedded broker does not wake a waiting fetch when data arrives, so the latency is about
``kafka.fetch_max_wait_ms``: the benchmark sets the low-latency 10 ms (`--fetch-max-wait-ms`); the services'
default, 100 ms, spends less CPU on idle consumers.

Run: `python -m benchmarks.bus [--events 100000] [--repeats 5] [--fetch-max-wait-ms 10]`. The table goes to stderr; the
last line of stdout is one JSON object with the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from benchmarks._stats import percentile, print_table, spread
from dpe.broker import EmbeddedBroker
from dpe.bus.admin import ensure_topics
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.events import EvalOutcome
from dpe.settings import Settings

PAYLOAD_BYTES = 1024


def one_kb_event(i: int) -> EvalOutcome:
    event = EvalOutcome(policy_version=1, suite="bench", item_id=f"item-{i}", capability=f"cap{i % 8}",
                        answer_type="text", expected="a", predicted="", correct=False, score=0.0)
    padding = PAYLOAD_BYTES - len(event.model_dump_json())
    return event.model_copy(update={"predicted": "x" * max(0, padding)})


def fresh_settings(bootstrap: str, fetch_max_wait_ms: int) -> Settings:
    kafka = {"bootstrap_servers": bootstrap, "fetch_max_wait_ms": fetch_max_wait_ms,
             "topic_prefix": f"bench{uuid.uuid4().hex[:8]}."}
    settings = Settings.load(overrides={"kafka": kafka})
    ensure_topics(settings, bootstrap)
    return settings


async def throughput(settings: Settings, n: int) -> tuple[float, float]:
    events = [one_kb_event(i) for i in range(n)]
    async with AsyncPublisher(settings, producer_name="bench") as pub:
        started = time.perf_counter()
        for event in events:
            await pub.publish(event)
        await pub.flush()
        produce_s = time.perf_counter() - started
        async with AsyncSubscriber(settings, [EvalOutcome], group_id=None, service="bench", publisher=pub,
                                   subscribe=False) as sub:
            await sub.assign_all()
            got = await sub.fetch(max_records=1, timeout_ms=5000)
            received = len(got)
            started = time.perf_counter()
            while received < n:
                received += len(await sub.fetch(max_records=5000, timeout_ms=1000))
            consume_s = time.perf_counter() - started
    return n / produce_s, (n - len(got)) / consume_s


async def latency(settings: Settings, n: int, rate_per_s: float) -> list[float]:
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    async with AsyncPublisher(settings, producer_name="bench") as pub:
        async with AsyncSubscriber(settings, [EvalOutcome], group_id=None, service="bench", publisher=pub,
                                   subscribe=False) as sub:
            await sub.assign_all()
            await sub.fetch(timeout_ms=100)

            async def receive() -> None:
                while len(latencies) < n:
                    for delivery in await sub.fetch(timeout_ms=100):
                        latencies.append((time.perf_counter() - sent_at[delivery.event.item_id]) * 1000)

            receiver = asyncio.create_task(receive())
            for i in range(n):
                event = one_kb_event(i)
                sent_at[event.item_id] = time.perf_counter()
                await pub.publish(event)
                await asyncio.sleep(1 / rate_per_s)
            await asyncio.wait_for(receiver, timeout=60)
    return latencies


async def main_async(args: argparse.Namespace) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {"produce": [], "consume": [], "e2e p50": [], "e2e p99": []}
    with EmbeddedBroker() as broker:
        bootstrap, wait_ms = broker.bootstrap_servers, args.fetch_max_wait_ms
        for _ in range(args.repeats):
            produce, consume = await throughput(fresh_settings(bootstrap, wait_ms), args.events)
            lat = await latency(fresh_settings(bootstrap, wait_ms), args.latency_events, args.rate)
            rows["produce"].append(produce)
            rows["consume"].append(consume)
            rows["e2e p50"].append(percentile(lat, 50))
            rows["e2e p99"].append(percentile(lat, 99))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--latency-events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=500.0, help="events/s for the latency run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=10, help="the consumer's fetch wait (see above)")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    units = {"produce": "events/s", "consume": "events/s", "e2e p50": "ms", "e2e p99": "ms"}
    targets = {"produce": ">= 50,000", "e2e p99": "<= 20"}
    print_table(f"bus: {args.events:,} x 1 KB events, {args.repeats} runs, embedded broker", rows, units, targets)
    produce = spread(rows["produce"])
    print(json.dumps({
        "produce_events_per_s": round(produce["median"]),
        "produce_spread": round(produce["spread"], 3),
        "consume_events_per_s": round(spread(rows["consume"])["median"]),
        "e2e_p50_ms": round(spread(rows["e2e p50"])["median"], 2),
        "e2e_p99_ms": round(spread(rows["e2e p99"])["median"], 2),
        "events": args.events,
        "repeats": args.repeats,
        "fetch_max_wait_ms": args.fetch_max_wait_ms,
    }))


if __name__ == "__main__":
    main()
