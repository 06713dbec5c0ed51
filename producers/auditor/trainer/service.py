"""The auditor model's trainer: the trainer's own round loop (`trainer.service.run_trainer`) with the auditor's task.

AuditDM's auditor learns to ask the probes the target gets wrong. Here it is a copy of the policy's base taught the
menu's answer format (`prepare_auditor_model`, on the first unlabeled images of the bus), then trained by GRPO in
micro-rounds on unlabeled images (`AuditorTraining`: its own consumer group, checkpoints and `AuditorCheckpoint`
announcements), rewarded by `DivergenceReward` against the **newest policy checkpoint** announced (followed as the
audit service follows it), so its probes follow the target's current blind spots. Every announcement says which
policy version rewarded its round (`AuditorCheckpoint.target_version`).

Example:
    >>> task = AuditorTraining
    >>> task.name, task.reads.__name__, task.announces.__name__, task.checkpoints
    ('auditor-trainer', 'UnlabeledItem', 'AuditorCheckpoint', 'auditor-checkpoints')
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from dpe.blobstore import BlobStore
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.bus.delivery import Skipped
from dpe.config import CoreSettings
from dpe.events import AuditorCheckpoint, Checkpoint, UnlabeledItem
from dpe.inference import PolicyVersions
from dpe.policy.checkpoints import allowed_roots
from dpe.policy.model import load_policy
from producers.auditor.backends import ProbeAnswerer, reference_answerer
from producers.auditor.menu import AuditPrompt
from producers.auditor.prober import DivergenceReward, teach_menu
from producers.auditor.service import TargetTracker, follow_checkpoints, until_ready
from producers.auditor.settings import CHECKPOINTS, HOME, AuditorConfig
from producers.auditor.trainer.settings import AuditorTrainerConfig
from trainer.rewards import Rewards
from trainer.service import RoundReport, base_model_folder, run_trainer
from trainer.settings import GRPOSettings

log = logging.getLogger(__name__)

TAUGHT = "auditor-menu.json"
"""In the auditor model's version-0 folder: how the menu's format was taught (the folder is written all at once)."""
POLL_S = 2.0
"""How often `first_prompts` looks for more unlabeled images while there are too few."""


class NoTargetYet:
    """The reward's target before the first policy version is followed (`AuditorTraining.before_round` waits for one,
    so no round is ever judged against it)."""

    name = "no-target-yet"

    def answer(self, asked: Sequence[Any]) -> list[str | None]:
        raise RuntimeError("the auditor's reward has no target: no policy checkpoint has been followed yet")


async def first_prompts(settings: AuditorConfig, count: int, stop: asyncio.Event) -> list[AuditPrompt]:
    """Prompts of the first `count` unlabeled images of the bus the probe writer sees something in (read without a
    group); fewer once a look finds nothing new, none while there is none yet (it waits, until `stop`)."""
    blobs = BlobStore(settings.blob.url, settings.blob.limits)
    prompts: list[AuditPrompt] = []
    async with AsyncPublisher(settings, producer_name=HOME) as publisher, AsyncSubscriber(
        settings, [UnlabeledItem], group_id=None, service=HOME, publisher=publisher, subscribe=False,
        read_only=True,
    ) as reader:
        await reader.assign_all()
        while not stop.is_set() and len(prompts) < count:
            before = len(prompts)
            async for deliveries in reader.until_end(max_records=count, timeout_ms=500):
                for delivery in deliveries:
                    try:
                        image = blobs.open_image(delivery.event.image).convert("RGB")
                    except Exception as error:  # noqa: BLE001 - the trainer's round dead-letters it; here: skip
                        log.info("not teaching on %s: %s", delivery.event.item_id, error)
                        continue
                    if (prompt := AuditPrompt.of(image, settings.auditor.probe_writer)) is not None:
                        prompts.append(prompt)
                if len(prompts) >= count:
                    break
            if prompts and len(prompts) == before:
                break
            if len(prompts) < count:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)
    return prompts[:count]


async def prepare_auditor_model(settings: AuditorTrainerConfig, policy_base: Path, folder: Path,
                                stop: asyncio.Event) -> Path | None:
    """The auditor model's version 0 in `folder`: the policy's base taught the menu's answer format
    (`teach_menu`) on the first ``auditor_training.format_images`` unlabeled images; once written, reused as it is.
    None when `stop` came first."""
    if (folder / TAUGHT).is_file():
        return folder
    training = settings.auditor_training
    prompts = await first_prompts(settings, training.format_images, stop)
    if not prompts:
        return None
    log.info("teaching the auditor model the menu's format on %d images (%d steps)", len(prompts),
             training.format_steps)
    policy = await asyncio.to_thread(load_policy, policy_base)
    losses = await asyncio.to_thread(teach_menu, policy, prompts, steps=training.format_steps,
                                     seed=settings.auditor.seed)
    recipe = {"base": str(policy_base), "images": len(prompts), "steps": training.format_steps,
              "final_loss": losses[-1]}
    return await asyncio.to_thread(policy.save, folder, {TAUGHT: json.dumps(recipe)})


class AuditorTraining:
    """The trainer's task for the auditor model (`trainer.task.TrainingTask`): unlabeled images in, one `AuditPrompt`
    each, `DivergenceReward` against the newest policy out; `AuditorCheckpoint`s announced."""

    name = HOME
    reads = UnlabeledItem
    announces = AuditorCheckpoint
    checkpoints = CHECKPOINTS

    def __init__(self, settings: AuditorConfig, references: Sequence[ProbeAnswerer] | None = None,
                 tracker: TargetTracker | None = None) -> None:
        section = settings.auditor
        self.probe_writer = section.probe_writer
        self.tracker = tracker or TargetTracker(section.max_new_tokens, allowed_roots(settings),
                                                PolicyVersions(settings.inference, settings.placement, role="target"))
        references = references or [reference_answerer(reference, section.max_new_tokens, settings.placement)
                                    for reference in section.references]
        self.reward = DivergenceReward(NoTargetYet(), references, section)

    def item_id(self, event: UnlabeledItem) -> str:
        return event.item_id

    def admit(self, event: UnlabeledItem, blobs: BlobStore, version: int) -> AuditPrompt:
        """The image's prompt; an image the probe writer sees nothing in is skipped (``nothing_to_probe``)."""
        prompt = AuditPrompt.of(blobs.open_image(event.image).convert("RGB"), self.probe_writer)
        if prompt is None:
            raise Skipped("nothing_to_probe")
        return prompt

    def rewards(self, grpo: GRPOSettings) -> Rewards:
        return {self.reward: 1.0}

    @contextlib.asynccontextmanager
    async def running(self, settings: CoreSettings) -> AsyncIterator[None]:
        """Follow the policy's checkpoints (no group: every reader reads them all) while the trainer runs."""
        stop = asyncio.Event()
        async with AsyncPublisher(settings, producer_name=self.name) as publisher, AsyncSubscriber(
            settings, [Checkpoint], group_id=None, service=self.name, publisher=publisher, subscribe=False,
            read_only=True,
        ) as checkpoints:
            following = asyncio.create_task(follow_checkpoints(checkpoints, self.tracker.on_checkpoint, stop))
            try:
                yield
            finally:
                stop.set()
                await following

    async def before_round(self, stop: asyncio.Event) -> dict[str, Any]:
        """Wait for a policy version (or `stop`), make the newest one the reward's target, and name it."""
        await until_ready(self.tracker, stop)
        target = self.tracker.current
        if target is None:
            return {}
        self.reward.target = target.answerer
        return {"target_version": target.policy_version}


async def train_auditor(settings: AuditorTrainerConfig, stop: asyncio.Event,
                        max_rounds: int | None = None) -> list[RoundReport]:
    """Prepare the auditor model's version 0 if needed (``auditor_trainer.base_model`` else taught into
    ``<home>/auditor-trainer/base``), then run its trainer until `stop` or `max_rounds` checkpoints."""
    base = settings.auditor_trainer.base_model
    if base is None:
        folder = settings.home / HOME / "base"
        base = await prepare_auditor_model(settings, base_model_folder(settings), folder, stop)
        if base is None:
            return []
    trainer = settings.auditor_trainer.model_copy(update={"base_model": base})
    task = await asyncio.to_thread(AuditorTraining, settings)
    return await run_trainer(settings.model_copy(update={"trainer": trainer}), stop, max_rounds=max_rounds, task=task)
