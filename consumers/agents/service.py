"""The agent worker (`dpe serve agents`): follows the latest quota plan and fills it exactly from unlabeled items.

How several workers fill a plan exactly, with no overshoot and no starvation:

1. Slices. Each capability's quota is split deterministically over the P partitions of the
   unlabeled topic (`consumers.agents.ledger.split_quota`). The slice of an item, and of every sample made
   from it, is its partition: `item_slice(item_id)` is Kafka's default key partitioner (murmur2),
   so it can be recomputed from a sample's `source_item_id`. An item delivered on another partition
   than its key says (a producer with a custom partitioner) is dead-lettered as ``MisroutedItem``.
2. Ownership. Workers share the unlabeled topic in one consumer group; a worker fills only the
   slices of the partitions assigned to it, so at any time each slice has one writer.
3. Recovery. Every worker follows the whole accepted topic (`dpe.bus.follower.Follower`) into a
   `QuotaLedger` that counts distinct sample ids per (plan, capability, slice). On assignment a
   worker waits until that view is complete as of the assignment, so it sees everything the
   previous owner published: the previous owner flushed before giving the partition up (its
   revoke handler cancels in-flight attempts, flushes, and commits only finished items), or it
   died and was evicted after the session timeout, long after its last acknowledged write.
4. Determinism. Programmatic attempts are seeded by (item, capability, attempt), and `sample_id`
   is the content hash of the sample, so an item redone after kill -9 rebuilds the same sample;
   the ledger already holds its id, the attempt is recognised (`Known`) and nothing is counted
   or published twice. (A non-deterministic LLM may make a different sample on a redo; the
   ledger already counts the first one, so the plan is still never exceeded.)
5. Within a worker, items run concurrently; an attempt first reserves a slot in its slice
   (`QuotaLedger.reserve`), so in-flight attempts never exceed a slice's room; an item whose
   capabilities only have reserved room waits for the outcome instead of being dropped.
6. No starvation. Each item is offered to the neediest capability it can serve (largest share of
   its slice still open). A partition whose slices are all full is paused, so items wait in the
   log for the next plan instead of being consumed for nothing. Offsets are committed only after
   an item's samples are acknowledged, so a killed worker's items are redone by the next owner.
7. Diagnosis. Every worker follows the evaluator's `Diagnosis` topic; a plan is filled with the diagnosis of
   the policy version it was made from (`consumers.agents.diagnoses`), which the planner and the writer read.

Kafka offers no fencing without transactions: a worker stalled past the rebalance timeout while
still writing could overshoot. Revocation cancels in-flight attempts to keep the handover short.

Example:
    >>> stop = asyncio.Event()                                    # doctest: +SKIP
    >>> await AgentWorker(settings).run(stop)                     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from consumers.agents.crew import Crew, Known, Outcome, Passed, Roles
from consumers.agents.diagnoses import Diagnoses
from consumers.agents.ledger import QuotaLedger, Reservation, item_slice
from consumers.agents.llm import LLMAnswerer, LLMPlanner, LLMValidator, LLMWriter
from consumers.agents.pixels import PixelAnswerer, PixelPlanner, PixelValidator, PixelWriter, perceiving
from consumers.agents.programmatic import (
    ProgrammaticAnswerer,
    ProgrammaticPlanner,
    ProgrammaticValidator,
    ProgrammaticWriter,
)
from consumers.agents.retriever import SEARCH_BACKENDS
from consumers.agents.settings import AgentsConfig
from consumers.qc.checks import (
    BAND_VERDICTS,
    AgreementCheck,
    AnswerabilityCheck,
    Check,
    DifficultyCheck,
    NearDuplicateCheck,
    QCChain,
    SchemaCheck,
)
from consumers.agents.reach import Reach
from consumers.qc.dedup import DedupKey, NearDuplicateIndex
from consumers.qc.difficulty import PolicyHolder, PolicyPassRate
from consumers.roles import ItemContext
from dpe.blobstore import BlobError, BlobStore
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.bus.delivery import Delivery
from dpe.bus.follower import Follower, now_ms
from dpe.endpoint.client import EndpointClient
from dpe.events import (
    AcceptedSample,
    AuditLead,
    Checkpoint,
    Diagnosis,
    Event,
    FailureTypes,
    QuotaPlan,
    UnlabeledItem,
)
from dpe.imaging import PillowEditor
from dpe.inference import PolicyVersions
from dpe.policy.checkpoints import REFUSALS, allowed_roots, loadable_folder
from dpe.taxonomy import UnknownCapability
from monitoring.metrics import (
    AGENT_ITEMS,
    AGENT_LEADS,
    AGENT_OUT_OF_REACH,
    AGENT_SAMPLES,
    QUOTA_PLAN_STARTED,
    QUOTA_REMAINING,
)

log = logging.getLogger(__name__)


class MisroutedItem(ValueError):
    """An unlabeled item on another partition than Kafka's default partitioner gives its key."""


def build_roles(settings: AgentsConfig, llm: EndpointClient | None, checker: EndpointClient | None = None) -> Roles:
    """The crew's roles from `agents.backends` (`llm` needed when any role is played by a model; `checker`, when given,
    plays the model validator and answerer); pixel and fast-path planners write for the taxonomy's capabilities that
    `agents.questions` maps."""
    agents = settings.agents
    backends, tools = agents.backends, agents.toolchains
    questions = settings.served_questions()

    def pick(backend: str, pixels, programmatic, model, client: EndpointClient | None = llm):
        if backend == "pixels":
            return pixels()
        if backend == "programmatic":
            return programmatic()
        if client is None:
            raise ValueError("an LLM role needs an EndpointClient")
        return model(client)

    return Roles(
        planner=pick(backends.planner, lambda: PixelPlanner(tools.writer, agents.edit_rate, questions),
                     lambda: ProgrammaticPlanner(agents.edit_rate, questions), LLMPlanner),
        search=SEARCH_BACKENDS[backends.retriever](agents.retrieval_pool),
        editor=PillowEditor(),
        writer=pick(backends.writer, lambda: PixelWriter(tools.writer), ProgrammaticWriter, LLMWriter),
        validator=pick(backends.validator, lambda: PixelValidator(tools.checker), ProgrammaticValidator, LLMValidator,
                       checker or llm),
        answerer=pick(backends.answerer, lambda: PixelAnswerer(tools.checker), ProgrammaticAnswerer, LLMAnswerer,
                      checker or llm),
    )


def build_checks(settings: AgentsConfig, roles: Roles, index: NearDuplicateIndex,
                 estimator: PolicyPassRate | None) -> list[Check]:
    """The QC chain, the checks that turn most candidates down for the least time first; near-duplicate and
    difficulty as configured.

    The difficulty band goes before the validator and the independent answerer: its rollouts, batched across
    candidates, cost about 10 ms a candidate on the tiny policy, where the pixel validator takes about 90 ms and the
    answerer 50 ms, and it turns down most candidates (about 80 % on the default base). A candidate whose answer is
    wrong is still turned down, by the checks after it.
    """
    qc = settings.agents.qc
    checks: list[Check] = [SchemaCheck(qc.min_options, qc.max_options)]
    if qc.near_duplicate:
        checks.append(NearDuplicateCheck(index))
    if estimator is not None:
        checks.append(DifficultyCheck(estimator, qc.difficulty))
    return checks + [AnswerabilityCheck(roles.validator), AgreementCheck(roles.answerer)]


class _Rebalance(ConsumerRebalanceListener):
    """Hands partitions over cleanly: cancel and flush before giving up, catch up before taking over."""

    def __init__(self, worker: "AgentWorker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        worker = self.worker
        worker.revoking = True
        for task in list(worker.inflight):
            task.cancel()
        async with worker.lock:
            pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        worker = self.worker
        await worker.follower.synced(now_ms())
        worker.revoking = False
        log.info("agents: own unlabeled and lead partitions %s", sorted({tp.partition for tp in assigned}))


class AgentWorker:
    """One agent worker process; see the module docstring for how workers share a plan."""

    def __init__(self, settings: AgentsConfig):
        self.settings = settings
        self.store = BlobStore(settings.blob.url, settings.blob.limits)
        qc = settings.agents.qc
        self.index = NearDuplicateIndex(qc.image_distance, qc.colour_distance, qc.text_similarity)
        self.holder = PolicyHolder(qc.difficulty.base_policy, allowed_roots(settings),
                                   PolicyVersions(settings.inference, settings.placement, role="band"))
        self.lock = asyncio.Lock()
        self.inflight: set[asyncio.Task] = set()
        self.revoking = False
        self.latest_version = 0
        self.diagnoses = Diagnoses()
        self.reach = Reach(qc.difficulty.reach_evidence, qc.difficulty.reach_floor)
        self._loading: asyncio.Task | None = None
        self.ledger: QuotaLedger | None = None
        self.follower: Follower | None = None
        self.items: AsyncSubscriber | None = None
        self.publisher: AsyncPublisher | None = None
        self.crew: Crew | None = None
        band = qc.difficulty
        self._slots = asyncio.Semaphore(max(settings.agents.concurrency, band.batch_size if band.enabled else 0))

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Work until `stop` is set; `ready` is set once the worker follows the plan and has joined the group."""
        settings = self.settings
        backends = settings.agents.backends
        llm = EndpointClient(settings.agents.llm) if "llm" in (backends.planner, backends.writer) else None
        checks = "llm" in (backends.validator, backends.answerer)
        checker = EndpointClient(settings.agents.checker_endpoint()) if checks else None
        difficulty = settings.agents.qc.difficulty
        estimator = PolicyPassRate(self.holder, difficulty) if difficulty.enabled else None
        roles = build_roles(settings, llm, checker)
        questions = settings.served_questions()
        unserved = [name for name in settings.capabilities if name not in questions]
        if unserved and backends.planner != "llm":
            log.warning("agents: the %s planner writes for no question of %s (agents.questions maps none to them): "
                        "their quotas stay open until the round's timeout", backends.planner, unserved)
        pixels = "pixels" in (backends.planner, backends.writer, backends.validator, backends.answerer)
        processes = settings.agents.toolchains.processes if pixels else 0
        async with perceiving(processes), AsyncPublisher(settings, producer_name="agents") as publisher:
            self.publisher = publisher
            self.follower = Follower(settings, publisher, {QuotaPlan: self._on_plans, Diagnosis: self._on_diagnoses,
                                                           FailureTypes: self._on_failure_types,
                                                           AcceptedSample: self._on_accepted,
                                                           Checkpoint: self._on_checkpoints},
                                     service="agents", dead_letters=[QuotaPlan, Diagnosis, FailureTypes])
            self.items = AsyncSubscriber(settings, [UnlabeledItem, AuditLead], group_id=settings.agents.group_id,
                                         service="agents", publisher=publisher, subscribe=False, co_partitioned=True)
            await self.items.start()
            self.ledger = QuotaLedger(await self._partition_count())
            await self.follower.start()
            following = asyncio.Event()
            follow = asyncio.create_task(self.follower.run(following))
            try:
                if settings.agents.qc.difficulty.enabled:
                    for capability in settings.capabilities:  # every one in reach until the band judges otherwise
                        AGENT_OUT_OF_REACH.labels(capability).set(0)
                    await self.holder.start()
                await self.follower.synced(now_ms())
                if self._loading is not None:  # the newest checkpoint announced, not the base, measures from the start
                    await asyncio.gather(self._loading, return_exceptions=True)
                await self._policy_loaded(stop)
                self.crew = Crew(roles, QCChain(build_checks(settings, roles, self.index, estimator)), self.store,
                                 self.ledger.plan_of, self._policy_version)
                self.items.consumer.subscribe(self.items.topics, listener=_Rebalance(self))
                if ready is not None:
                    ready.set()
                await self._work(stop, follow)
            finally:
                await self.items.stop()
                following.set()
                await asyncio.gather(follow, return_exceptions=True)
                await self.follower.stop()
                if estimator is not None:
                    await estimator.close()
                for client in (llm, checker):
                    if client is not None:
                        await client.close()

    async def _partition_count(self) -> int:
        """The unlabeled topic's partitions: the quota slices. The leads topic must have as many (co-partitioned)."""
        counts = [await self._partitions_of(topic) for topic in self.items.topics]
        if len(set(counts)) > 1:
            raise RuntimeError(f"topics {self.items.topics} have {counts} partitions; audit leads must be "
                               "co-partitioned with unlabeled items (recreate them with as many partitions)")
        return counts[0]

    async def _partitions_of(self, topic: str) -> int:
        consumer = self.items.consumer
        for _ in range(100):
            await consumer.topics()
            found = consumer.partitions_for_topic(topic)
            if found:
                return len(found)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic} has no partitions (run `dpe topics create`)")

    def _policy_version(self) -> int:
        """The version a sample is made against: with the difficulty band on, the policy it measures with;
        with it off, the newest announced version that is not refused (0 before any)."""
        if self.settings.agents.qc.difficulty.enabled and self.holder.current is not None:
            return self.holder.current.version
        return self.latest_version

    async def _on_plans(self, plans: Sequence[Event]) -> None:
        if self.ledger.use_plan(plans[-1]):
            log.info("agents: following plan %s (round %s): %s", plans[-1].plan_id, plans[-1].round, plans[-1].quotas)
            QUOTA_PLAN_STARTED.set(plans[-1].ts.timestamp())
            QUOTA_REMAINING.clear()
            self._report_remaining()

    async def _on_diagnoses(self, diagnoses: Sequence[Event]) -> None:
        self.diagnoses.add(diagnoses)

    async def _on_failure_types(self, tallies: Sequence[Event]) -> None:
        self.diagnoses.add_failure_types(tallies)

    async def _on_accepted(self, samples: Sequence[Event]) -> None:
        for sample in samples:
            self.ledger.record(sample.plan_id, sample.capability, sample.source_item_id, sample.sample_id)
        if self.settings.agents.qc.near_duplicate:
            missing = [sample for sample in samples if sample.sample_id not in self.index]
            for sample_id, key in await asyncio.to_thread(self._dedup_keys, missing):
                self.index.add(sample_id, key)
        self._report_remaining()

    def _dedup_keys(self, samples: Sequence[AcceptedSample]) -> list[tuple[str, DedupKey]]:
        keys = []
        for sample in samples:
            try:
                image = self.store.open_image(sample.body.image)
                keys.append((sample.sample_id, DedupKey.of(image, sample.body.question)))
            except (BlobError, OSError, ValueError) as exc:
                log.warning("accepted sample %s: no near-duplicate key (%s)", sample.sample_id, exc)
        return keys

    async def _on_checkpoints(self, checkpoints: Sequence[Event]) -> None:
        loadable = [checkpoint for checkpoint in checkpoints if self._loadable(checkpoint)]
        if not loadable:
            return
        newest = max(loadable, key=lambda checkpoint: checkpoint.policy_version)
        self.latest_version = max(self.latest_version, newest.policy_version)
        if self.settings.agents.qc.difficulty.enabled:
            self._loading = asyncio.create_task(self._load_after(self._loading, newest))

    def _loadable(self, checkpoint: Checkpoint) -> bool:
        """Whether the policy loaders would load `checkpoint`; a refused one (outside the checkpoint roots, pickled
        weights only) is logged, and its version never becomes a sample's: nothing will ever evaluate it."""
        try:
            loadable_folder(checkpoint.uri, self.holder.roots)
        except REFUSALS as refused:
            log.error("agents: refusing checkpoint v%d at %s: %s", checkpoint.policy_version, checkpoint.uri, refused)
            return False
        return True

    async def _load_after(self, previous: asyncio.Task | None, checkpoint: Checkpoint) -> None:
        """Load a checkpoint's policy in the background, after any load already under way."""
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await self.holder.use(checkpoint)
        self._follow_reach()

    async def _policy_loaded(self, stop: asyncio.Event) -> None:
        """With the difficulty check on, wait for a policy (the base one or the first checkpoint's)."""
        if not self.settings.agents.qc.difficulty.enabled:
            return
        if self.holder.current is None:
            log.info("agents: waiting for a checkpoint to measure difficulty against")
        while self.holder.current is None and not stop.is_set():
            await asyncio.sleep(0.2)

    def _report_remaining(self) -> None:
        for capability, missing in self.ledger.remaining().items():
            QUOTA_REMAINING.labels(capability).set(missing)

    async def _work(self, stop: asyncio.Event, follow: asyncio.Task) -> None:
        items = self.items
        while not stop.is_set():
            if follow.done():
                raise RuntimeError("the follower of plans and accepted samples stopped") from follow.exception()
            self._pause_full_partitions()
            deliveries = await items.fetch(max_records=self.settings.agents.batch_size, timeout_ms=200)
            if not deliveries:
                continue
            async with self.lock:
                if self.revoking:  # a handover is under way: wait for it instead of fetching the same records again
                    self._rewind(deliveries, done=set())
                    await asyncio.sleep(0.2)
                    continue
                done = await self._handle_batch(deliveries)
                await self.publisher.flush()
                await self._commit(deliveries, done)

    def _pause_full_partitions(self) -> None:
        consumer = self.items.consumer
        assigned = consumer.assignment()
        full = {tp for tp in assigned if self.ledger.plan is None or not self.ledger.open_slice(tp.partition)}
        if full:
            consumer.pause(*full)
        if assigned - full:
            consumer.resume(*(assigned - full))

    async def _handle_batch(self, deliveries: list[Delivery]) -> set[tuple[str, int, int]]:
        """Handle a batch concurrently; (topic, partition, offset) of those finished (not cancelled by a revocation)."""
        tasks = {asyncio.create_task(self._guarded(delivery)): delivery for delivery in deliveries}
        self.inflight = set(tasks)
        if self.revoking:
            for task in tasks:
                task.cancel()
        try:
            await asyncio.wait(tasks)
        finally:
            self.inflight = set()
        return {_position(delivery) for task, delivery in tasks.items() if not task.cancelled()}

    async def _commit(self, deliveries: list[Delivery], done: set[tuple[str, int, int]]) -> None:
        """Commit each partition up to its first unfinished item (finished ones all: the position)."""
        consumer = self.items.consumer
        try:
            offsets = {}
            for tp in {TopicPartition(d.topic, d.partition) for d in deliveries}:
                pending = [d.offset for d in deliveries if (d.topic, d.partition) == tp and _position(d) not in done]
                offsets[tp] = min(pending) if pending else await consumer.position(tp)
            self._rewind(deliveries, done)
            await consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("agents: commit failed (%s); unfinished items will be redone", exc)

    def _rewind(self, deliveries: list[Delivery], done: set[tuple[str, int, int]]) -> None:
        """Seek back to the first unfinished record of each partition (they are fetched again)."""
        consumer = self.items.consumer
        for tp in {TopicPartition(d.topic, d.partition) for d in deliveries}:
            pending = [d.offset for d in deliveries if (d.topic, d.partition) == tp and _position(d) not in done]
            try:
                if pending and tp in consumer.assignment():
                    consumer.seek(tp, min(pending))
            except KafkaError as exc:
                log.info("agents: cannot rewind %s (%s); its next owner starts from the committed offset", tp, exc)

    async def _guarded(self, delivery: Delivery) -> None:
        async with self._slots:
            try:
                if isinstance(delivery.event, AuditLead):
                    await self._handle_lead(delivery)
                else:
                    await self._handle_item(delivery)
            except asyncio.CancelledError:
                raise
            except BlobError as exc:
                AGENT_ITEMS.labels("dead_lettered").inc()
                await self.items.dead_letter(delivery, exc, "load")
            except Exception as exc:  # noqa: BLE001 - one bad item must not stop the worker
                log.exception("agents: %s at %s failed", type(delivery.event).__name__, _position(delivery))
                AGENT_ITEMS.labels("dead_lettered").inc()
                await self.items.dead_letter(delivery, exc, "handle")

    async def _misrouted(self, delivery: Delivery, item_id: str) -> bool:
        """Dead-letter a record that arrived on another partition than Kafka's default partitioner gives `item_id`
        (its quota slice would be another worker's); whether it was."""
        keyed_to = item_slice(item_id, self.ledger.partitions)
        if keyed_to == delivery.partition:
            return False
        AGENT_ITEMS.labels("dead_lettered").inc()
        await self.items.dead_letter(delivery, MisroutedItem(
            f"{type(delivery.event).__name__} {item_id} is keyed to partition {keyed_to} by Kafka's default "
            f"partitioner but arrived on {delivery.partition}; publish it keyed by its item id with the default "
            "(murmur2) partitioner"), "route")
        return True

    async def _handle_lead(self, delivery: Delivery) -> None:
        """An audit lead: one rectification candidate for its capability, if its slice has room under the plan."""
        divergence = delivery.event.divergence
        if await self._misrouted(delivery, divergence.item_id):
            return
        if divergence.capability not in self.settings.capabilities:
            AGENT_ITEMS.labels("dead_lettered").inc()
            await self.items.dead_letter(delivery, UnknownCapability(
                f"lead for unknown capability {divergence.capability[:100]!r}; known: "
                f"{list(self.settings.capabilities)}"), "validate")
            return
        wanted = frozenset({divergence.capability})
        while (reservation := self.ledger.reserve(delivery.partition, wanted)) is None:
            if not self.ledger.blocked(delivery.partition, wanted):
                AGENT_LEADS.labels("skipped").inc()
                return
            await self.ledger.changed()
        try:
            outcome = await self.crew.rectify(delivery.event, reservation.plan_id)
            AGENT_LEADS.labels("accepted" if await self._settle(outcome) else "rejected").inc()
        finally:
            self.ledger.release(reservation)

    async def _handle_item(self, delivery: Delivery) -> None:
        item: UnlabeledItem = delivery.event
        slice_ = delivery.partition
        if await self._misrouted(delivery, item.item_id):
            return
        plan = self.ledger.plan
        ctx = await self.crew.context(item, self.diagnoses.for_version(plan.policy_version) if plan else None)
        possible = await self.crew.capabilities(ctx)
        tried: set[str] = set()
        produced = 0
        while produced < self.settings.agents.samples_per_item:
            wanted = (self._plan_capabilities() if possible is None else possible) - tried
            reservation = self.ledger.reserve(slice_, wanted)
            if reservation is None:
                if self.ledger.blocked(slice_, wanted):
                    await self.ledger.changed()
                    continue
                break
            tried.add(reservation.capability)
            try:
                produced += await self._fill(ctx, reservation)
            finally:
                self.ledger.release(reservation)
        AGENT_ITEMS.labels("used" if produced else "skipped").inc()

    def _plan_capabilities(self) -> frozenset[str]:
        return frozenset(self.ledger.plan.quotas) if self.ledger.plan else frozenset()

    async def _fill(self, ctx: ItemContext, reservation: Reservation) -> bool:
        """Attempts for one reserved slot until one is accepted, the attempts run out or the difficulty band rejects
        one (`BAND_VERDICTS`)."""
        for attempt in range(self.settings.agents.attempts_per_item):
            outcome = await self.crew.attempt(ctx, reservation.capability, reservation.plan_id, attempt)
            if await self._settle(outcome):
                return True
            if outcome.sample.reason_code in BAND_VERDICTS:
                break
        return False

    async def _settle(self, outcome: Outcome) -> bool:
        """Publish an attempt's outcome and count it (ledger, near-duplicate index, reach); whether it filled its
        slot (accepted now, or before: `Known`)."""
        if isinstance(outcome, Known):
            return True
        sample = outcome.sample
        kept = isinstance(outcome, Passed)
        if kept:
            await asyncio.shield(self.publisher.publish(sample))
            self.ledger.record(sample.plan_id, sample.capability, sample.source_item_id, sample.sample_id)
            self.index.add(sample.sample_id, outcome.key)
            self._report_remaining()
        else:
            await self.publisher.publish(sample)
        AGENT_SAMPLES.labels(sample.capability, "accepted" if kept else "rejected").inc()
        if kept or sample.reason_code in BAND_VERDICTS:
            self._judge_reach(sample.capability, sample.policy_version, kept=kept)
        return kept

    def _judge_reach(self, capability: str, version: int | None, kept: bool) -> None:
        """With the difficulty band on, count its verdict and pass the capabilities out of reach to the ledger."""
        if not self.settings.agents.qc.difficulty.enabled or version is None:
            return
        self.reach.record(capability, version, kept)
        self._follow_reach()

    def _follow_reach(self) -> None:
        """Tell the ledger (and the gauge) which capabilities are out of reach of the policy measured with now."""
        out_of_reach = self.reach.out_of_reach(self._policy_version())
        if out_of_reach != self.ledger.out_of_reach:
            log.info("agents: out of reach of policy v%d (the band keeps almost none): %s", self._policy_version(),
                     sorted(out_of_reach) or "none")
            for name in self.ledger.out_of_reach | out_of_reach:
                AGENT_OUT_OF_REACH.labels(name).set(name in out_of_reach)
        self.ledger.set_out_of_reach(out_of_reach)


def _position(delivery: Delivery) -> tuple[str, int, int]:
    """Where a record is: topic, partition, offset."""
    return delivery.topic, delivery.partition, delivery.offset
