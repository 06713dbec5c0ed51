"""Watching the run from outside: its bus, read-only, and its checkpoint folder.

`observe` reads every partition of the topics the invariants need from the beginning, without a
consumer group (as `dpe run`'s own watcher does), and folds what it reads into `Observations`. It
finds the bus in ``<run>/bus.json`` (``{"bootstrap_servers": ..., "epoch": N}``, written by `dpe run`
whenever its bus starts or is replaced by a fresh one), else in the run's ``config.yaml``; when the
epoch changes it reads the new bus from the beginning, where records carried over are seen again:
events are de-duplicated by event id (an accepted sample keeps the place it was last seen at).

`Manifests` reads the manifest of every checkpoint as it appears (the trainer keeps only the last
few): the ids each round skipped, with the reason, and where it stopped reading.

Example:
    >>> import tempfile
    >>> run_dir = Path(tempfile.mkdtemp())
    >>> bus_address(run_dir) is None
    True
    >>> _ = (run_dir / "config.yaml").write_text("kafka:\\n  bootstrap_servers: 127.0.0.1:9092\\n")
    >>> bus_address(run_dir)
    BusAddress(bootstrap='127.0.0.1:9092', epoch=0)
    >>> _ = (run_dir / "bus.json").write_text('{"bootstrap_servers": "127.0.0.1:9300", "epoch": 2}')
    >>> bus_address(run_dir)
    BusAddress(bootstrap='127.0.0.1:9300', epoch=2)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from benchmarks.soak.invariants import AcceptedRecord, evidence_of
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.bus.delivery import Delivery
from dpe.config import CoreSettings
from dpe.events import AcceptedSample, Checkpoint, Divergence, EvalOutcome, QuotaPlan, WeaknessSnapshot
from streams.scoring import Evidence
from streams.settings import ScoringSettings
from trainer.checkpoints import MANIFEST, CheckpointStore, Manifest

log = logging.getLogger(__name__)

OBSERVED = [EvalOutcome, Divergence, AcceptedSample, Checkpoint, WeaknessSnapshot, QuotaPlan]
BUS_FILE = "bus.json"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class BusAddress:
    """Where the run's bus is: its bootstrap servers, and how many times it was replaced so far."""

    bootstrap: str
    epoch: int


def bus_address(run_dir: Path) -> BusAddress | None:
    """The run's bus now, from ``bus.json`` or else ``config.yaml`` (epoch 0); None before either says."""
    try:
        data = json.loads((run_dir / BUS_FILE).read_text())
        return BusAddress(str(data["bootstrap_servers"]), int(data["epoch"]))
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        return None
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return None
    servers = (config.get("kafka") or {}).get("bootstrap_servers")
    return BusAddress(servers, 0) if servers else None


@dataclass
class Observations:
    """What the invariants need from the bus, de-duplicated by event id.

    Times are seconds on `clock` (the soak's). An accepted sample's record is where it was last read
    (`AcceptedRecord.epoch`); a checkpoint keeps the epoch it was first read on.
    """

    params: ScoringSettings
    clock: Callable[[], float]
    accepted: dict[str, AcceptedRecord] = field(default_factory=dict)
    """Accepted-sample event id -> its record."""
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    checkpoint_epochs: dict[int, int] = field(default_factory=dict)
    version_seen_at: dict[int, float] = field(default_factory=dict)
    plans: dict[str, QuotaPlan] = field(default_factory=dict)
    evidence: list[Evidence] = field(default_factory=list)
    snapshot: WeaknessSnapshot | None = None
    epoch: int | None = None
    caught_up: bool = False
    """Whether the last fetch left nothing behind on any partition."""
    _seen: set[str] = field(default_factory=set)

    def add(self, delivery: Delivery, epoch: int) -> None:
        """Fold in one delivery read on bus `epoch`."""
        event = delivery.event
        if isinstance(event, AcceptedSample):
            self.accepted[event.event_id] = AcceptedRecord(event.sample_id, event.plan_id, event.capability,
                                                           delivery.partition, delivery.offset, epoch)
            return
        if event.event_id in self._seen:
            return
        self._seen.add(event.event_id)
        if isinstance(event, Checkpoint):
            if event.policy_version not in self.checkpoints:
                self.version_seen_at[event.policy_version] = self.clock()
                self.checkpoint_epochs[event.policy_version] = epoch
            self.checkpoints[event.policy_version] = event
        elif isinstance(event, WeaknessSnapshot):
            self.snapshot = event
        elif isinstance(event, QuotaPlan):
            self.plans[event.plan_id] = event
        elif (evidence := evidence_of(event, self.params)) is not None:
            self.evidence.append(evidence)

    @property
    def newest_version(self) -> int | None:
        return max(self.checkpoints, default=None)


async def observe(settings: CoreSettings, run_dir: Path, observations: Observations, stop: asyncio.Event) -> None:
    """Follow the run's bus into `observations` until `stop` is set, reconnecting when it moves."""
    while not stop.is_set():
        address = bus_address(run_dir)
        if address is None:
            await asyncio.sleep(0.5)
            continue
        try:
            await _follow(settings, run_dir, address, observations, stop)
        except (KafkaError, OSError, RuntimeError) as error:
            log.warning("soak observer: bus %s failed (%s); reconnecting", address.bootstrap, error)
            await asyncio.sleep(1.0)


BUS_CALL_TIMEOUT_S = 10.0
"""Longest wait for one call on the bus before the observer looks at ``bus.json`` again."""


async def _follow(settings: CoreSettings, run_dir: Path, address: BusAddress, observations: Observations,
                  stop: asyncio.Event) -> None:
    """Read bus `address` from the beginning until `stop`, or until ``bus.json`` names another one.

    A rolled bus is stopped before ``bus.json`` names its successor: every call on it is bounded by
    `BUS_CALL_TIMEOUT_S`, so a dead broker never holds the observer (its clients retry for ever).
    """
    publisher = AsyncPublisher(settings, producer_name="soak", bootstrap=address.bootstrap)
    subscriber = AsyncSubscriber(settings, OBSERVED, group_id=None, service="soak", publisher=publisher,
                                 bootstrap=address.bootstrap, subscribe=False, read_only=True)
    try:
        await asyncio.wait_for(_start(publisher, subscriber), BUS_CALL_TIMEOUT_S)
        observations.epoch = address.epoch
        while not stop.is_set() and bus_address(run_dir) in (address, None):
            with contextlib.suppress(asyncio.TimeoutError):
                deliveries = await asyncio.wait_for(subscriber.fetch(max_records=5000, timeout_ms=250),
                                                    BUS_CALL_TIMEOUT_S)
                for delivery in deliveries:
                    observations.add(delivery, address.epoch)
                lags = await asyncio.wait_for(subscriber.lag(), BUS_CALL_TIMEOUT_S)
                observations.caught_up = not any(lags.values())
    finally:
        for client in (subscriber, publisher):  # aiokafka's fetcher raises its own cancellation on a dead broker
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, KafkaError, OSError):
                await asyncio.wait_for(client.stop(), BUS_CALL_TIMEOUT_S)


async def _start(publisher: AsyncPublisher, subscriber: AsyncSubscriber) -> None:
    await publisher.start()
    await subscriber.start()
    await subscriber.assign_all()


class Manifests:
    """The manifests of the trainer's checkpoints, read as they appear in its folder."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.by_version: dict[int, Manifest] = {}
        self._read: set[str] = set()

    def poll(self) -> None:
        """Read the manifests of the complete checkpoints not read yet (one pruned meanwhile is passed over)."""
        for path in self.store.complete():
            if path.name in self._read:
                continue
            try:
                manifest = Manifest.model_validate_json((path / MANIFEST).read_bytes())
            except (FileNotFoundError, ValidationError):
                continue
            self._read.add(path.name)
            self.by_version[manifest.policy_version] = manifest
