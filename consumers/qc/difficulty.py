"""The difficulty band: how often the current policy solves a sample out of k sampled answers.

`PolicyHolder` keeps the policy to measure against: the newest checkpoint announced on the
checkpoints topic (loaded from its folder in a thread, swapped in when ready; given checkpoint
roots, one outside them is refused unloaded), or a configured base policy before the first
checkpoint. `PolicyPassRate` rolls out k answers per sample at the configured temperature with
`dpe.policy.generation.generate`, batching concurrent samples, and grades them with
`dpe.grading.grade`, the same grading as training rewards.

Example:
    >>> async def check(settings, image, body):                        # doctest: +SKIP
    ...     holder = PolicyHolder(settings.agents.qc.difficulty.base_policy, allowed_roots(settings))
    ...     await holder.start()
    ...     return await PolicyPassRate(holder, settings.agents.qc.difficulty).measure(image, body)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from consumers.qc.settings import DifficultySettings
from dpe.batching import MicroBatcher
from dpe.events import Checkpoint, SampleBody
from dpe.grading import grade
from dpe.policy.checkpoints import load_checkpoint
from dpe.policy.prompts import build_messages
from monitoring.metrics import AGENT_BAND_ROLLOUTS, AGENT_POLICY_VERSION

if TYPE_CHECKING:
    from dpe.policy.model import Policy

log = logging.getLogger(__name__)


class PolicyUnavailable(RuntimeError):
    """No checkpoint has been announced and no base policy is configured."""


@dataclass(frozen=True)
class VersionedPolicy:
    policy: "Policy"
    version: int


class PolicyHolder:
    """The newest policy: the latest checkpoint's, or the base policy (version 0) before any.

    Announced checkpoints load only from inside `roots` (`dpe.policy.checkpoints.allowed_roots` of the
    settings); the base policy is the operator's own folder.
    """

    def __init__(self, base_policy: str | None, roots: Sequence[Path]):
        self.base_policy = base_policy
        self.roots = roots
        self.current: VersionedPolicy | None = None

    async def start(self) -> None:
        """Load the base policy, if one is configured and nothing newer is loaded."""
        if self.base_policy and self.current is None:
            self._swap(VersionedPolicy(await asyncio.to_thread(load_checkpoint, self.base_policy), 0))

    async def use(self, checkpoint: Checkpoint) -> None:
        """Load a checkpoint's policy if it is newer than the current one (a failed load keeps the old one)."""
        if self.current is not None and checkpoint.policy_version <= self.current.version:
            return
        try:
            policy = await asyncio.to_thread(load_checkpoint, checkpoint.uri, roots=self.roots)
        except Exception as exc:  # noqa: BLE001 - a bad (or refused) checkpoint must not stop the agents
            log.error("cannot load policy v%s from %s: %s", checkpoint.policy_version, checkpoint.uri, exc)
            return
        if self.current is None or checkpoint.policy_version > self.current.version:
            self._swap(VersionedPolicy(policy, checkpoint.policy_version))

    def _swap(self, versioned: VersionedPolicy) -> None:
        self.current = versioned
        AGENT_POLICY_VERSION.set(versioned.version)

    def get(self) -> VersionedPolicy:
        if self.current is None:
            raise PolicyUnavailable("no checkpoint announced yet and no base policy configured")
        return self.current


@dataclass(frozen=True)
class _Rollout:
    versioned: VersionedPolicy
    image: Image.Image
    body: SampleBody


class PolicyPassRate:
    """Correct answers of the current policy out of `settings.samples` sampled ones, batched across callers."""

    def __init__(self, holder: PolicyHolder, settings: DifficultySettings):
        self.holder = holder
        self.settings = settings
        self._batcher: MicroBatcher[_Rollout, int] = MicroBatcher(self._solve, settings.batch_size, window_s=0.01)

    async def measure(self, image: Image.Image, body: SampleBody) -> tuple[int, int]:
        """(correct answers out of k, policy version); raises `PolicyUnavailable`."""
        versioned = self.holder.get()
        return await self._batcher.submit(_Rollout(versioned, image, body)), versioned.version

    async def close(self) -> None:
        await self._batcher.close()

    def _solve(self, rollouts: list[_Rollout]) -> list[int]:
        from dpe.policy.generation import SamplingParams, generate

        params = SamplingParams(max_new_tokens=self.settings.max_new_tokens, temperature=self.settings.temperature,
                                num_samples=self.settings.samples, batch_size=self.settings.batch_size)
        correct: dict[int, int] = {}
        for versioned in {id(r.versioned): r.versioned for r in rollouts}.values():
            group = [(i, r) for i, r in enumerate(rollouts) if r.versioned is versioned]
            outputs = generate(
                versioned.policy,
                [r.image.convert("RGB") for _, r in group],
                [build_messages(r.body.question, r.body.answer_type, r.body.options) for _, r in group],
                params,
            )
            for (i, r), samples in zip(group, outputs):
                key = r.body.key
                correct[i] = sum(grade(text, key).correct for text in samples)
                AGENT_BAND_ROLLOUTS.inc(len(samples))
        return [correct[i] for i in range(len(rollouts))]
