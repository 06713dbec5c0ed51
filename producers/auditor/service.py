"""The divergence auditor (after AuditDM): where reference models agree and the target does not.

For a configurable share of unlabeled items (chosen by a hash of the item id, so a redelivered item
gets the same decision), the auditor asks the target model (the latest checkpoint on the bus) and
every reference model the same probe questions, about the item's image and about counterfactual
edits of it. Each probe where the references reach a consensus that the target's answer does not
match becomes a Divergence event: the answers, the consensus and its strength, the capability, and
the edit. Divergences are evidence that needs no label; the weakness stream reads them beside the
eval outcomes. Those on which the references agree strongly (`auditor.leads`) are also published as
`AuditLead`s: the agents turn them into training samples through their QC chain (rectification).
Each divergence is named by its failure type (`producers.auditor.failures`), and the tally of the
target version's failure types, with exemplars, is published as `FailureTypes` as it grows.

Probes are written from what the probe writer's toolchain sees in the pixels (`probe_writer`); the
items' metadata is read only for capability hints, never for a scene: no part of the auditor reads
the synthetic world's answer key (the oracle that does is a test fixture, ``tests/oracle.py``).

Items that cannot be audited (an image missing or corrupt in the blob store, capability hints that
are not a list of names or name unknown capabilities) are dead-lettered with the reason; the service keeps
going. Until the first checkpoint is announced there is no target, and unlabeled items wait. A
checkpoint outside the checkpoint roots or with pickled weights only is never loaded: it is
dead-lettered with the reason and the current target stays.

Example:
    >>> Auditor.selected_fraction("some-item", 0.0, seed=0), Auditor.selected_fraction("some-item", 1.0, seed=0)
    (False, True)
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka.errors import KafkaError
from PIL import Image

from dpe.blobstore import BlobStore
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber, TransientError
from dpe.bus.delivery import Delivery
from dpe.config import PlacementSettings
from dpe.endpoint.client import EndpointFailure
from dpe.endpoint.served import VersionNotServed
from dpe.events import AuditLead, AuditorCheckpoint, BlobRef, Checkpoint, Divergence, FailureTypes, UnlabeledItem
from dpe.grading import extract_answer
from dpe.imaging import ImageEditor, PillowEditor
from dpe.inference import PolicyVersions
from dpe.perception import NotPerceived
from dpe.perception.toolchain import TOOLCHAINS
from dpe.world import Scene
from dpe.policy.checkpoints import REFUSALS, allowed_roots, load_checkpoint
from dpe.policy.model import Policy
from monitoring.metrics import AUDIT_DIVERGENCES, AUDIT_FAILURE_TYPES, AUDIT_ITEMS, AUDIT_PROBES
from producers.auditor.backends import PolicyAnswerer, ProbeAnswerer, View, reference_answerer
from producers.auditor.consensus import canonical, consensus, target_differs
from producers.auditor.edits import counterfactuals
from producers.auditor.failures import FailureTally, edit_name, failure_type
from producers.auditor.menu import AuditPrompt, menu_probe
from producers.auditor.prober import rank_choices
from producers.auditor.probes import Probe, capability_hints, generic_probes, scene_probes, world_probe
from producers.auditor.settings import AuditorConfig, AuditorSettings, auditor_model_roots

log = logging.getLogger(__name__)

SERVICE = "auditor"
_MAX_ANSWER = 2000


def short_answer(text: str | None) -> str:
    """The answer extracted from a model's output (the output itself if nothing can be extracted), clipped."""
    if not text:
        return ""
    return (extract_answer(text) or text)[:_MAX_ANSWER]


class Auditor:
    """Audits unlabeled items against a target with the configured references (blocking; CPU-bound)."""

    def __init__(
        self,
        settings: AuditorSettings,
        store: BlobStore,
        references: Sequence[ProbeAnswerer],
        editor: ImageEditor | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.references = list(references)
        self.editor = editor or PillowEditor()
        self.tally = FailureTally()
        self._tallied_at = 0.0

    @classmethod
    def from_settings(cls, settings: AuditorConfig) -> "Auditor":
        """The auditor the settings describe: blob store, references (checkpoints are loaded now)."""
        audit = settings.auditor
        references = [reference_answerer(reference, audit.max_new_tokens, settings.placement)
                      for reference in audit.references]
        return cls(audit, BlobStore(settings.blob.url, settings.blob.limits), references)

    @staticmethod
    def selected_fraction(item_id: str, fraction: float, seed: int) -> bool:
        """Whether an item falls in the audited share (stable for an item id)."""
        digest = hashlib.sha256(f"{seed}/{item_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < fraction * 2**64

    def selected(self, item: UnlabeledItem) -> bool:
        """Whether this item is audited (the rate limit)."""
        return self.selected_fraction(item.item_id, self.settings.sample_fraction, self.settings.seed)

    def own_view(self, item: UnlabeledItem) -> View:
        """The item's own view: its image from the blob store and what the probe writer sees in it (`scene`)."""
        image = self.store.open_image(item.image).convert("RGB")
        return View(item.item_id, image, self.scene(item, image))

    def questions(self, item: UnlabeledItem, own: View | None = None) -> list[tuple[View, Probe]]:
        """Every (view, probe) pair to ask: the item's image (`own`, read here if not given) and its
        counterfactuals, each with its probes."""
        only = capability_hints(item.metadata, self.settings.capabilities)
        count = self.settings.probes_per_item
        own = own or self.own_view(item)
        scene = own.scene
        if scene is None:
            probes = generic_probes(self.settings.generic_probes, count=count, only=only)
        else:
            probes = scene_probes(scene, item.item_id, count=count, seed=self.settings.seed, only=only)
        views = [own, *counterfactuals(own, self.editor, count=self.settings.edits_per_item)]
        asked = []
        for view in views:
            for probe in probes:
                shown = self._reasked(probe, view) if view is not own else probe
                if shown is not None:
                    asked.append((view, shown))
        return asked

    def chosen_questions(self, own: View, prober: Prober) -> list[tuple[View, Probe]]:
        """The probes the trained auditor model ranks highest on the item's own view (`auditor.model_probes` of the
        questions and edits its scene allows; `rank_choices`), each asked about its view."""
        count = self.settings.model_probes
        prompt = AuditPrompt.seen(own.image, own.scene) if own.scene is not None else None
        if prompt is None or not count:
            return []
        [ranked] = rank_choices(prober.policy, [prompt])
        return [found for choice in ranked[:count]
                if (found := menu_probe(own.image, own.item_id, choice, self.settings.probe_writer, self.editor))]

    def scene(self, item: UnlabeledItem, image: Image.Image) -> Scene | None:
        """The scene probes are written from: what the probe writer's toolchain sees in the item's image (None: it
        sees nothing, generic probes are asked). Never the item's metadata."""
        try:
            return TOOLCHAINS[self.settings.probe_writer].perceive(image)
        except NotPerceived:
            return None

    @staticmethod
    def _reasked(probe: Probe, view: View) -> Probe | None:
        """The probe as asked about a counterfactual: world questions are re-written for the edited scene."""
        if probe.seed is None or view.scene is None:
            return probe
        return world_probe(view.scene, probe.capability, probe.seed)

    def audit(self, item: UnlabeledItem, target: ProbeAnswerer, policy_version: int,
              prober: Prober | None = None) -> list[Divergence]:
        """Ask target and references every question (the fixed ones, and `prober`'s choices when there is a trained
        auditor model); a Divergence for each question the references agree on, `diverged` where the target's answer
        differs from theirs, naming the prober that chose a probe."""
        own = self.own_view(item)
        fixed = self.questions(item, own)
        asked = fixed + (self.chosen_questions(own, prober) if prober is not None else [])
        target_answers = target.answer(asked)
        reference_answers = {reference.name: reference.answer(asked) for reference in self.references}
        stored: dict[str, BlobRef] = {}
        verdicts = []
        originals: dict[str, tuple[str | None, str]] = {}
        for position, (view, probe) in enumerate(asked):
            AUDIT_PROBES.labels(probe.capability).inc()
            answers = {name: given[position] for name, given in reference_answers.items()}
            agreed = consensus(answers, probe)
            if agreed is None or not agreed.holds(self.settings):
                continue
            given = canonical(target_answers[position], probe)
            if view.counterfactual_of is None:
                originals[probe.capability] = (given, agreed.answer)
            diverged = target_differs(target_answers[position] or "", agreed, probe)
            named = None
            if diverged:
                before = originals.get(probe.capability) if view.counterfactual_of is not None else None
                ignores = before is not None and given is not None and before[0] == given and before[1] != agreed.answer
                named = failure_type(probe, given, agreed.answer, edit_name(view.item_id), ignores)
                AUDIT_DIVERGENCES.labels(probe.capability).inc()
                AUDIT_FAILURE_TYPES.labels(named).inc()
            verdicts.append(Divergence(
                producer=SERVICE,
                policy_version=policy_version,
                item_id=view.item_id,
                probe_id=probe.probe_id,
                capability=probe.capability,
                question=probe.question[:_MAX_ANSWER],
                image=item.image if view.counterfactual_of is None else self._stored(view, stored),
                counterfactual_of=view.counterfactual_of,
                edit=view.edit,
                target_answer=short_answer(target_answers[position]),
                reference_answers={name: short_answer(text) for name, text in answers.items() if text},
                consensus_answer=agreed.answer,
                consensus_strength=agreed.strength,
                diverged=diverged,
                consensus_agreeing=agreed.agreeing,
                failure_type=named,
                answer_type=probe.answer_type,
                options=list(probe.options) if probe.options else None,
                tolerance=probe.tolerance,
                prober=prober.name if prober is not None and position >= len(fixed) else None,
            ))
        return verdicts

    def leads(self, verdicts: Sequence[Divergence]) -> list[AuditLead]:
        """The divergences worth training on (`auditor.leads`): the target differed from a consensus at least
        `min_strength` strong, given by at least `min_agreeing` references."""
        wanted = self.settings.leads
        if not wanted.enabled:
            return []
        return [AuditLead(producer=SERVICE, divergence=verdict) for verdict in verdicts
                if verdict.diverged and verdict.consensus_strength >= wanted.min_strength
                and (verdict.consensus_agreeing or 0) >= wanted.min_agreeing]

    def failure_types(self, verdicts: Sequence[Divergence], *, final: bool = False) -> list[FailureTypes]:
        """Count `verdicts` into the failure tally; the tally to publish, at most every `failure_types_every_s` while
        it changes (`final`: whenever it changed since it was last published)."""
        self.tally.add(verdicts)
        now = time.monotonic()
        if not self.tally.changed or (not final and now - self._tallied_at < self.settings.failure_types_every_s):
            return []
        self._tallied_at = now
        return [self.tally.event(producer=SERVICE)]

    def _stored(self, view: View, stored: dict[str, BlobRef]) -> BlobRef:
        """A counterfactual view's image in the blob store, encoded and written once however many of its
        probes' verdicts show it (`stored`: the views of this item written so far)."""
        if view.item_id not in stored:
            buffer = io.BytesIO()
            view.image.save(buffer, format="PNG")
            stored[view.item_id] = self.store.put_image(buffer.getvalue())
        return stored[view.item_id]


@dataclass(frozen=True)
class Prober:
    """A version of the trained auditor model, which chooses probes beside the fixed ones (`Auditor.audit`)."""

    version: int
    policy: Policy

    @property
    def name(self) -> str:
        return f"auditor-v{self.version}"


class ProberTracker:
    """Keeps the newest announced auditor model (inside `roots`) as the prober; None until one is announced."""

    def __init__(self, roots: Sequence[Path], placement: PlacementSettings = PlacementSettings()) -> None:
        self.roots = tuple(roots)
        self.placement = placement
        self.current: Prober | None = None

    async def on_checkpoint(self, delivery: Delivery) -> None:
        """Handler of the auditor checkpoints topic: load a newer version (a bad one is logged and skipped, one
        refused unread raises one of `REFUSALS`)."""
        checkpoint: AuditorCheckpoint = delivery.event
        if self.current is not None and checkpoint.policy_version <= self.current.version:
            return
        try:
            policy = await asyncio.to_thread(load_checkpoint, checkpoint.uri, roots=self.roots,
                                             placement=self.placement)
        except REFUSALS:
            raise
        except Exception as error:  # noqa: BLE001 - a bad auditor model must not stop auditing
            log.warning("cannot load auditor model v%d at %s (%s); keeping %s", checkpoint.policy_version,
                        checkpoint.uri, error, self.current.name if self.current else "the fixed probes alone")
            return
        self.current = Prober(checkpoint.policy_version, policy)
        log.info("probes chosen by auditor model v%d (%s) too", checkpoint.policy_version, checkpoint.uri)


@dataclass(frozen=True)
class Target:
    """The model under audit: a policy version and its answerer."""

    policy_version: int
    answerer: ProbeAnswerer


class TargetTracker:
    """Keeps the newest checkpoint inside `roots` as the target; `ready` is set once there is one."""

    def __init__(self, max_new_tokens: int, roots: Sequence[Path], versions: PolicyVersions | None = None) -> None:
        self.max_new_tokens = max_new_tokens
        self.roots = tuple(roots)
        self.versions = versions or PolicyVersions(role="target")
        self.versions.check()  # a placement this machine cannot honour stops the service now
        self.current: Target | None = None
        self.ready = asyncio.Event()

    async def on_checkpoint(self, delivery: Delivery) -> None:
        """Handler of the checkpoints topic: open a newer checkpoint (loaded here or served; a bad one is logged and
        skipped; one refused unread, outside the roots or with pickled weights only, raises one of `REFUSALS`)."""
        checkpoint: Checkpoint = delivery.event
        if self.current is not None and checkpoint.policy_version <= self.current.policy_version:
            return
        try:
            policy = await asyncio.to_thread(self.versions.open, checkpoint.uri, checkpoint.policy_version,
                                             roots=self.roots)
        except REFUSALS:
            raise
        except Exception as error:  # noqa: BLE001 - a bad checkpoint must not stop auditing with the current one
            log.warning("cannot load checkpoint v%d at %s (%s); keeping the current target",
                        checkpoint.policy_version, checkpoint.uri, error)
            return
        answerer = PolicyAnswerer(f"target-v{checkpoint.policy_version}", policy, self.max_new_tokens)
        self.current = Target(checkpoint.policy_version, answerer)
        self.ready.set()
        log.info("auditing policy v%d (%s)", checkpoint.policy_version, checkpoint.uri)


def unlabeled_handler(
    auditor: Auditor, tracker: TargetTracker, publisher: AsyncPublisher, probers: ProberTracker | None = None
) -> Callable[[Delivery], Awaitable[None]]:
    """Handler of the unlabeled topic: audit the selected share in a worker thread (with the newest trained auditor
    model's probes too, once there is one), publish its verdicts (`Divergence` events, diverged or not) and the leads
    among them (`AuditLead`, for the agents)."""

    async def on_unlabeled(delivery: Delivery) -> None:
        item: UnlabeledItem = delivery.event
        if not auditor.selected(item):
            AUDIT_ITEMS.labels("sampled_out").inc()
            return
        target = tracker.current
        assert target is not None, "items are consumed only once there is a target"
        try:
            verdicts = await asyncio.to_thread(auditor.audit, item, target.answerer, target.policy_version,
                                               probers.current if probers is not None else None)
        except (EndpointFailure, VersionNotServed) as failure:
            raise TransientError(f"the policy server gave no answers: {failure}") from failure
        AUDIT_ITEMS.labels("audited").inc()
        try:
            events = [*verdicts, *auditor.leads(verdicts), *auditor.failure_types(verdicts)]
            await asyncio.gather(*[await publisher.publish(event) for event in events])
        except KafkaError as error:
            raise TransientError(f"publishing audit verdicts failed: {error}") from error

    return on_unlabeled


async def follow_checkpoints(subscriber: AsyncSubscriber, handle: Callable[[Delivery], Awaitable[None]],
                             stop: asyncio.Event, caught_up: asyncio.Event | None = None) -> None:
    """Hand every checkpoint to `handle` until `stop` is set (no group: each auditor reads them all), setting
    `caught_up` once those written before the start are handled; one it refuses unread (`REFUSALS`) is
    dead-lettered."""

    async def handle_all(deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            try:
                await handle(delivery)
            except REFUSALS as refused:
                log.error("refusing checkpoint v%d: %s", delivery.event.policy_version, refused)
                await subscriber.dead_letter(delivery, refused, "load")

    await subscriber.assign_all()
    async for deliveries in subscriber.until_end():
        await handle_all(deliveries)
    if caught_up is not None:
        caught_up.set()
    while not stop.is_set():
        await handle_all(await subscriber.fetch(timeout_ms=500))


async def until_ready(tracker: TargetTracker, stop: asyncio.Event) -> None:
    """Wait for the first target, or for `stop`."""
    await until_set(tracker.ready, stop)


async def until_set(event: asyncio.Event, stop: asyncio.Event) -> None:
    """Wait for `event`, or for `stop`."""
    waiters = [asyncio.create_task(event.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def serve_auditor(settings: AuditorConfig, stop: asyncio.Event, auditor: Auditor | None = None) -> None:
    """Follow checkpoints (the target) and unlabeled items (what to audit) until `stop` is set."""
    auditor = auditor or await asyncio.to_thread(Auditor.from_settings, settings)
    tracker = TargetTracker(settings.auditor.max_new_tokens, allowed_roots(settings),
                            PolicyVersions(settings.inference, settings.placement, role="target"))
    probers = ProberTracker(auditor_model_roots(settings), settings.placement)
    probers_read = asyncio.Event()
    async with AsyncPublisher(settings, producer_name=SERVICE) as publisher, AsyncSubscriber(
        settings, [Checkpoint], group_id=None, service=SERVICE, publisher=publisher, subscribe=False, read_only=True
    ) as checkpoints, AsyncSubscriber(
        settings, [AuditorCheckpoint], group_id=None, service=SERVICE, publisher=publisher, subscribe=False,
        read_only=True,
    ) as auditor_models, AsyncSubscriber(
        settings, [UnlabeledItem], group_id=settings.auditor.group_id, service=SERVICE, publisher=publisher
    ) as unlabeled:
        following = [asyncio.create_task(follow_checkpoints(checkpoints, tracker.on_checkpoint, stop)),
                     asyncio.create_task(follow_checkpoints(auditor_models, probers.on_checkpoint, stop, probers_read))]
        for task in following:
            task.add_done_callback(lambda _: stop.set())
        try:
            await until_ready(tracker, stop)
            await until_set(probers_read, stop)
            if not stop.is_set():
                await unlabeled.run(unlabeled_handler(auditor, tracker, publisher, probers), stop, max_records=8)
        finally:
            stop.set()
            await asyncio.gather(*following)
            try:
                for tally in auditor.failure_types([], final=True):
                    await publisher.publish_and_wait(tally)
            except KafkaError as error:
                log.warning("the last failure-type tally was not published (%s)", error)
