"""Helpers for the ingest, agents, QC, LLM-agents and export tests: topics read in full, events, images."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable, Sequence

from PIL import Image

from dpe.bus.aio import AsyncPublisher
from dpe.bus.follower import read_topic
from dpe.events import Event, QuotaPlan
from dpe.settings import Settings


FAST_PATH = {"agents": {"backends": {"planner": "programmatic", "writer": "programmatic", "validator": "programmatic",
                                      "answerer": "programmatic", "retriever": "metadata"}},
             "ingest": {"answer_key": True}}
"""Settings for the benchmarks' fast path: ingest keeps the synthetic world's answer key on the items, and the
agents' roles read it (the auditor never does: its references read the pixels). Tests of mechanics that do not
depend on who writes the samples (the ledger under kill -9, signals, resume, the bus roll, the dashboards' short run)
use it for speed; the default pixel crew has its own tests and runs in the chaos soak."""

QUICK_EVAL = {"synthetic": {"round_items": 28, "heldout_items": 28}}
"""Evaluator settings for `dpe run` in tests: 4 items per capability in each synthetic suite (the default is 20 and
30), so a version is graded in seconds; the tests are about the spiral's mechanics, not the accuracy figures."""


async def read_all(settings: Settings, model: type[Event]) -> list[Event]:
    """Every event of `model`'s topic written so far."""
    return await read_topic(settings, model)


async def publish_all(settings: Settings, events: Sequence[Event]) -> None:
    async with AsyncPublisher(settings, producer_name="test") as publisher:
        for event in events:
            await publisher.publish(event)
        await publisher.flush()


def plan(quotas: dict[str, int], **changes) -> QuotaPlan:
    """A quota plan for the test (budget: the quotas' sum)."""
    fields = dict(round=0, strategy="test", budget=sum(quotas.values()), quotas=quotas, weights={},
                  snapshot_id="snapshot", policy_version=0)
    return QuotaPlan(**(fields | changes))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.5) -> bool:
    """Poll `check` until it is true or `timeout_s` passed; its last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every_s)
