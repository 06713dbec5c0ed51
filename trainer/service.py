"""The trainer service: micro-rounds of GRPO from a task's events (accepted samples), each trained exactly once.

Every round: read samples (`RoundCollector`), train (`GRPOEngine`), write the checkpoint atomically
with the weights, optimiser state, next offsets and trained ids (`CheckpointStore`), then announce it
on the checkpoints topic. On start the newest checkpoint that verifies is loaded and the partitions
are sought to its offsets, so after a kill at any point the samples of an unfinished round are read
again and those of a finished round never are. A checkpoint on disk whose announcement was not
acknowledged is announced again (the same event, so consumers see a duplicate at worst).

With several processes (the accelerate or DeepSpeed launcher), rank 0 alone talks to Kafka and the
checkpoint folder; the others receive each round's samples from it and join the collective saves.

What is trained is a `trainer.task.TrainingTask`: the policy on accepted samples by default, the auditor model on
unlabeled images under ``dpe serve auditor-trainer``; the loop, checkpoints and metrics are the same.

Example:
    >>> import asyncio                                                    # doctest: +SKIP
    >>> [r.version for r in asyncio.run(run_trainer(TrainerConfig.load(), max_rounds=1))]  # doctest: +SKIP
    [1]
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpe.blobstore import BlobStore
from dpe.broker import resolve_bootstrap
from dpe.bus.admin import cluster_id
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.events import Checkpoint
from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import RECIPE_FILE, cached_folder
from dpe.recent import RecentIds
from monitoring.metrics import (
    TRAINER_CHECKPOINT_SECONDS,
    TRAINER_KL,
    TRAINER_LOSS,
    TRAINER_POLICY_VERSION,
    TRAINER_REWARD,
    TRAINER_REWARD_STD,
    TRAINER_ROUND_SECONDS,
    TRAINER_ROUNDS,
    TRAINER_SAMPLES,
    TRAINER_STEP_SECONDS,
    TRAINER_TOKENS_PER_SECOND,
    TRAINER_ZERO_STD,
    serve_metrics,
)
from trainer.checkpoints import CheckpointStore, Manifest, StoredCheckpoint, folder_name
from trainer.distributed import launched_rank, leave_world, share_from_main
from trainer.engine import GRPOEngine, RoundStats
from trainer.rounds import Round, RoundCollector, positions_by_topic, positions_from_topics
from trainer.settings import TrainerConfig, checkpoint_root
from trainer.task import PolicyTask, TrainingTask

log = logging.getLogger(__name__)


def base_model_folder(settings: TrainerConfig) -> Path:
    """The model folder of policy version 0: ``trainer.base_model``, else the embedded default's
    warmed tiny model in dpe.policy's cache; a clear error when it is not there."""
    folder = settings.trainer.base_model
    if folder is None:
        folder = cached_folder(WarmupConfig())
        if not (folder / RECIPE_FILE).is_file():
            raise FileNotFoundError(
                f"trainer.base_model is not set and the default warmed model is not cached at {folder}: "
                "set trainer.base_model to a local model folder, or warm the tiny model up first (dpe.policy.warmup)"
            )
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"trainer.base_model {folder} is not a model folder (no config.json)")
    return Path(folder)


ROUND_PHASES = ("consume", "train", "checkpoint", "announce")
"""A round's timed phases: `RoundReport`'s ``<phase>_s`` and ``dpe_trainer_round_seconds``' ``phase`` label."""


@dataclass(frozen=True)
class RoundReport:
    """One checkpointed round: its version, size, phase times, and each GRPO step's time and tokens."""

    version: int
    samples: int
    consume_s: float
    train_s: float
    checkpoint_s: float
    announce_s: float
    step_seconds: tuple[float, ...]
    step_tokens: tuple[int, ...]


def round_metrics(stats: RoundStats, rnd: Round) -> dict[str, float]:
    """The metrics a checkpoint announces: training summary, consume time, down-weighted and skipped counts."""
    skipped = {f"skipped_{reason}": float(len(ids)) for reason, ids in rnd.skipped.items()}
    downweighted = float(sum(sample.row().get("weight", 1.0) < 1.0 for sample in rnd.samples))
    return stats.summary() | {"consume_s": rnd.consume_seconds, "stale_downweighted": downweighted} | skipped


def observe_round(stats: RoundStats) -> None:
    """Export a trained round's figures as Prometheus metrics."""
    summary = stats.summary()
    for step in stats.steps:
        TRAINER_STEP_SECONDS.observe(step.seconds)
    gauges = {
        "reward_mean": TRAINER_REWARD, "reward_std": TRAINER_REWARD_STD, "frac_zero_std": TRAINER_ZERO_STD,
        "kl": TRAINER_KL, "loss": TRAINER_LOSS, "tokens_per_s": TRAINER_TOKENS_PER_SECOND,
    }
    for name, gauge in gauges.items():
        if name in summary:
            gauge.set(summary[name])
    TRAINER_SAMPLES.labels("trained").inc(stats.samples)


async def run_trainer(
    settings: TrainerConfig, stop: asyncio.Event | None = None, *, max_rounds: int | None = None,
    task: TrainingTask | None = None,
) -> list[RoundReport]:
    """Run the trainer of `task` (the policy's by default) until `stop` is set or `max_rounds` rounds are
    checkpointed; one report per round.

    Serves metrics on ``trainer.metrics_port`` (9105) unless ``metrics.port`` overrides it. Loading,
    training and checkpointing block the event loop on purpose:
    nothing else needs it meanwhile (the consumer is assigned by hand, without group heartbeats, and
    paused during a round), and torch in a worker thread measured 4-10% slower per step here.
    """
    stop = stop or asyncio.Event()
    trainer_settings = settings.trainer
    task = task or PolicyTask(trainer_settings)
    base = base_model_folder(settings)
    main = launched_rank() == 0
    store = CheckpointStore(checkpoint_root(settings, task.checkpoints), trainer_settings.checkpoints.keep_last,
                            task.announces) if main else None
    latest = store.latest() if store is not None else None
    if main and latest is None:
        await announce_base_model(settings, base, task)
    engine = GRPOEngine(base, trainer_settings, settings.home / task.name,
                        rewards=task.rewards(trainer_settings.grpo.resolved(base)))
    if store is None:
        _follow(engine)
        leave_world(engine.num_processes)
        return []
    for phase in ROUND_PHASES:
        TRAINER_ROUND_SECONDS.labels(phase)  # every phase's series exists (zero) before the first round ends
    serve_metrics(settings.metrics.port_for(trainer_settings.metrics_port), settings.metrics.addr)
    share_from_main(latest, engine.num_processes)
    if latest is not None:
        engine.load_checkpoint(latest.path, latest.manifest.global_step)
        log.info("continuing from checkpoint %s (policy version %d)", latest.path, latest.version)
    else:
        log.info("no checkpoint in %s: starting from the base model %s (policy version 0)", store.folder, base)
    bus = cluster_id(settings, resolve_bootstrap(settings))
    try:
        async with AsyncPublisher(settings, producer_name=task.name) as publisher, AsyncSubscriber(
            settings, [task.reads], group_id=trainer_settings.group_id, service=task.name, publisher=publisher,
            subscribe=False
        ) as subscriber, task.running(settings):
            leader = _Leader(settings, task, engine, store, publisher, subscriber, latest, bus)
            return await leader.run(stop, max_rounds)
    finally:
        share_from_main(None, engine.num_processes)
        leave_world(engine.num_processes)


async def announce_base_model(settings: TrainerConfig, base: Path, task: TrainingTask) -> None:
    """Announce the base model as version 0 (unless the topic has a version), before the engine is built: on a fresh
    machine building it includes DeepSpeed's op (minutes), and the evaluator diagnoses the base meanwhile."""
    async with AsyncPublisher(settings, producer_name=task.name) as publisher:
        await announce_if_missing(settings, publisher, task.announces(producer=task.name, policy_version=0,
                                                                      uri=str(base)))


async def newest_announced(settings: TrainerConfig, publisher: AsyncPublisher,
                           announces: type[Checkpoint] = Checkpoint) -> int | None:
    """The newest version on the topic of `announces` (None: the topic is empty)."""
    newest: int | None = None
    async with AsyncSubscriber(settings, [announces], group_id=None, service="trainer", publisher=publisher,
                               subscribe=False, read_only=True) as reader:
        await reader.assign_all()
        async for deliveries in reader.until_end(max_records=5000, timeout_ms=2000):
            for delivery in deliveries:
                newest = max(delivery.event.policy_version, newest or 0)
    return newest


async def announce_if_missing(settings: TrainerConfig, publisher: AsyncPublisher, event: Checkpoint) -> bool:
    """Announce `event` unless the checkpoints topic already holds its version or a newer one.

    The base model is announced as version 0 on an empty topic, so that the evaluator diagnoses it and
    the first round gets a plan; the newest checkpoint is announced again on a bus that has not seen
    it (a resumed run whose saved bus is older than its checkpoints).
    """
    newest = await newest_announced(settings, publisher, type(event))
    if newest is not None and newest >= event.policy_version:
        return False
    await publisher.publish_and_wait(event)
    log.info("announced policy version %d (%s) on a bus whose newest was %s", event.policy_version, event.uri, newest)
    return True


class _Leader:
    """Rank 0's round loop."""

    def __init__(self, settings: TrainerConfig, task: TrainingTask, engine: GRPOEngine, store: CheckpointStore,
                 publisher: AsyncPublisher, subscriber: AsyncSubscriber, latest: StoredCheckpoint | None, bus: str):
        self.settings = settings
        self.task = task
        self.engine = engine
        self.store = store
        self.publisher = publisher
        self.subscriber = subscriber
        self.latest = latest
        self.bus = bus
        self.version = latest.version if latest else 0
        recent = RecentIds(settings.trainer.checkpoints.dedup_window, latest.manifest.recent_ids if latest else ())
        blobs = BlobStore(settings.blob.url, settings.blob.limits)
        self.collector = RoundCollector(subscriber, blobs, settings.trainer, recent, task)

    async def run(self, stop: asyncio.Event, max_rounds: int | None) -> list[RoundReport]:
        latest = self.latest
        if latest is not None and not latest.announced:
            await self.announce(latest)
        elif latest is not None:
            await announce_if_missing(self.settings, self.publisher, latest.manifest.event)
        same_bus = latest is not None and latest.manifest.cluster_id == self.bus
        if latest is not None and not same_bus:
            log.info("checkpoint %d was read on bus %s, this is %s: going on from group %s's committed offsets",
                     latest.version, latest.manifest.cluster_id, self.bus, self.settings.trainer.group_id)
        await self.subscriber.assign_all(positions_from_topics(latest.manifest.positions) if same_bus else {})
        await self.collector.start()
        TRAINER_POLICY_VERSION.set(self.version)
        start = {f"{tp.topic}/{tp.partition}": offset for tp, offset in self.collector.pending.start.items()}
        log.info("reading %s events at %s", self.task.reads.__name__, start)
        written: list[RoundReport] = []
        while not stop.is_set() and (max_rounds is None or len(written) < max_rounds):
            rnd = await self.collector.collect(self.version, stop)
            if stop.is_set():
                break
            if rnd.samples:
                self.collector.pause()
                fields = await self.task.before_round(stop)
                if stop.is_set():
                    break
                written.append(await self.train(rnd, fields))
                self.collector.resume()
            else:
                share_from_main([], self.engine.num_processes)  # idle: keeps the other ranks' waits short
        return written

    async def train(self, rnd: Round, fields: dict[str, Any]) -> RoundReport:
        """Train the round, write its checkpoint, announce it (with the task's `fields`)."""
        engine, store = self.engine, self.store
        num = engine.num_processes
        share_from_main(rnd.samples, num)
        log.info("round: training version %d on %d samples", self.version, len(rnd.samples))
        started = time.perf_counter()
        stats = engine.train_round(rnd.samples)
        trained = time.perf_counter()
        version = store.next_version()
        staging = share_from_main(store.begin(version), num)
        log.info("round: writing checkpoint %d to %s", version, staging)
        engine.save(staging)
        share_from_main(None, num)
        event = self.task.announces(
            producer=self.task.name,
            policy_version=version,
            parent_version=self.version,
            uri=str((store.folder / folder_name(version)).resolve()),
            trained_on=rnd.trained_on(),
            sample_ids=rnd.sample_ids(),
            metrics=round_metrics(stats, rnd),
            **fields,
        )
        recent = RecentIds(self.collector.recent.capacity, [*self.collector.recent.ids(), *rnd.sample_ids()])
        manifest = Manifest(
            event=event,
            positions=positions_by_topic(rnd.end),
            cluster_id=self.bus,
            global_step=engine.global_step,
            skipped=dict(rnd.skipped),
            recent_ids=recent.ids(),
        )
        checkpoint = store.commit(staging, manifest)
        TRAINER_POLICY_VERSION.set(version)
        written = time.perf_counter()
        log.info("round: checkpoint %d written to %s", version, checkpoint.path)
        await self.announce(checkpoint)
        await self.subscriber.commit(dict(rnd.end))
        announced = time.perf_counter()
        self.collector.committed()
        self.version = version
        observe_round(stats)
        report = RoundReport(version, len(rnd.samples), rnd.consume_seconds, trained - started, written - trained,
                             announced - written, tuple(step.seconds for step in stats.steps),
                             tuple(step.tokens for step in stats.steps))
        for phase in ROUND_PHASES:
            TRAINER_ROUND_SECONDS.labels(phase).observe(getattr(report, f"{phase}_s"))
        TRAINER_CHECKPOINT_SECONDS.observe(report.checkpoint_s)
        TRAINER_ROUNDS.inc()
        return report

    async def announce(self, checkpoint: StoredCheckpoint) -> None:
        """Publish the checkpoint's stored event and wait for the broker, then mark it announced."""
        await self.publisher.publish_and_wait(checkpoint.manifest.event)
        self.store.mark_announced(checkpoint)
        log.info("announced policy version %d", checkpoint.version)


def _follow(engine: GRPOEngine) -> None:
    """A rank other than 0: load what rank 0 loads, train what it trains, join its saves, until it stops."""
    latest: StoredCheckpoint | None = share_from_main(None, engine.num_processes)
    if latest is not None:
        engine.load_checkpoint(latest.path, latest.manifest.global_step)
    while (samples := share_from_main(None, engine.num_processes)) is not None:
        if not samples:
            continue
        engine.train_round(samples)
        staging = share_from_main(None, engine.num_processes)
        engine.save(staging)
        share_from_main(None, engine.num_processes)
