"""What a trainer trains: the events its rounds read, what each becomes, the rewards, the checkpoint it announces.

The trainer's round loop (`trainer.service.run_trainer`) is one implementation for every model it trains; a
`TrainingTask` says what differs. `PolicyTask` (the default) trains the policy on accepted samples and announces
`Checkpoint`s; the auditor model's task (`producers.auditor.trainer.service.AuditorTraining`, ``dpe serve
auditor-trainer``) trains on unlabeled images with its divergence reward and announces `AuditorCheckpoint`s.

Example:
    >>> task = PolicyTask()
    >>> task.name, task.reads.__name__, task.announces.__name__, task.checkpoints
    ('trainer', 'AcceptedSample', 'Checkpoint', 'checkpoints')
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from dpe.blobstore import BlobStore
from dpe.bus.delivery import Skipped
from dpe.config import CoreSettings
from dpe.events import AcceptedSample, Checkpoint, Event
from monitoring.metrics import TRAINER_SAMPLES
from trainer.engine import Prompted
from trainer.rewards import Rewards, policy_rewards
from trainer.samples import load_sample, staleness_weight
from trainer.settings import GRPOSettings, TrainerSettings


class TrainingTask(Protocol):
    """What the trainer's round loop needs to know about the model it trains."""

    name: str
    """Producer of its announcements, service name of its dead letters, its working folder under ``home``."""
    reads: type[Event]
    """The event its rounds read (from its consumer group's topic)."""
    announces: type[Checkpoint]
    """The event a written checkpoint is announced with (its type names the topic)."""
    checkpoints: str
    """Its checkpoint folder under ``home`` when ``checkpoints.folder`` is not set."""

    def item_id(self, event: Event) -> str:
        """The event's identity: an id trained once is never trained again."""

    def admit(self, event: Event, blobs: BlobStore, version: int) -> Prompted:
        """The row-maker of an event read while `version` is the newest; raises `dpe.bus.delivery.Skipped` to leave
        it untrained (the checkpoint records the reason), any other error to dead-letter it. Runs in a worker
        thread."""

    def rewards(self, grpo: GRPOSettings) -> Rewards:
        """The reward functions (TRL's signature) and their weights."""

    def running(self, settings: CoreSettings) -> contextlib.AbstractAsyncContextManager[None]:
        """Whatever the task follows while the trainer runs (the auditor's target: the newest policy)."""

    async def before_round(self, stop: asyncio.Event) -> dict[str, Any]:
        """Called before each round trains (it may wait, until `stop`): fields of the round's announcement beyond the
        common ones."""


class PolicyTask:
    """The policy on accepted samples: each a `trainer.samples.TrainingSample`, stale ones dropped or down-weighted
    (`TrainerSettings.staleness`), rewarded for a verifiably correct answer in the ``\\\\boxed{}`` format."""

    name = "trainer"
    reads = AcceptedSample
    announces = Checkpoint
    checkpoints = "checkpoints"

    def __init__(self, settings: TrainerSettings = TrainerSettings()) -> None:
        self.staleness = settings.staleness

    def item_id(self, event: AcceptedSample) -> str:
        return event.sample_id

    def admit(self, event: AcceptedSample, blobs: BlobStore, version: int) -> Prompted:
        weight = staleness_weight(event.policy_version, version, self.staleness)
        if weight is None:
            raise Skipped("stale_dropped")
        sample = load_sample(event, blobs, weight)
        if weight < 1.0:
            TRAINER_SAMPLES.labels("stale_downweighted").inc()
        return sample

    def rewards(self, grpo: GRPOSettings) -> Rewards:
        return policy_rewards(grpo.accuracy_weight, grpo.format_weight)

    @contextlib.asynccontextmanager
    async def running(self, settings: CoreSettings) -> AsyncIterator[None]:
        yield

    async def before_round(self, stop: asyncio.Event) -> dict[str, Any]:
        return {}
