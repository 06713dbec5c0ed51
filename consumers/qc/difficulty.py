"""The difficulty band: how often the current policy solves a sample out of k sampled answers.

`PolicyHolder` keeps the policy to measure against: the newest checkpoint announced on the
checkpoints topic (opened in a thread and swapped in when ready: loaded from its folder, or under
``inference.mode: server`` once the policy server serves it; given checkpoint roots, one outside
them is refused unloaded), or a configured base policy before the first checkpoint.
`PolicyPassRate` batches concurrent samples, prepares their prompts once (`PolicyVersion.sampler`:
a local copy encodes them once) and rolls out answers at the configured temperature in
stages (`next_stage`), grading them with `dpe.grading.grade`, the same grading as training rewards:
a sample stops as soon as its verdict is certain (`decided`), so the reference band (3-7 of 9)
spends about 7.2 rollouts per sample instead of 9 and never changes a verdict.

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
from dpe.endpoint.client import EndpointFailure
from dpe.endpoint.served import VersionNotServed, WrongVersion
from dpe.events import Checkpoint, SampleBody
from dpe.grading import grade
from dpe.policy.prompts import build_messages
from monitoring.metrics import AGENT_BAND_ROLLOUTS, AGENT_POLICY_VERSION

if TYPE_CHECKING:
    from dpe.inference import PolicyVersion, PolicyVersions

log = logging.getLogger(__name__)


class PolicyUnavailable(RuntimeError):
    """No checkpoint has been announced and no base policy is configured."""


class PolicyHolder:
    """The newest policy: the latest checkpoint's, or the base policy (version 0) before any.

    Announced checkpoints open only from inside `roots` (`dpe.policy.checkpoints.allowed_roots` of the
    settings); the base policy is the operator's own folder. `versions` opens them (local copies by default).
    """

    def __init__(self, base_policy: str | None, roots: Sequence[Path], versions: "PolicyVersions | None" = None):
        from dpe.inference import PolicyVersions

        self.base_policy = base_policy
        self.roots = roots
        self.versions = versions or PolicyVersions(role="band")
        self.current: PolicyVersion | None = None

    async def start(self) -> None:
        """Check the placement (one this machine cannot honour stops the agents now, not at the first checkpoint),
        then open the base policy as version 0, if one is configured and nothing newer is open, before or while it
        opens (a resumed run's newest checkpoint may be announced meanwhile: the base never replaces it)."""
        self.versions.check()
        if self.base_policy and self.current is None:
            base = await asyncio.to_thread(self.versions.open, self.base_policy, 0)
            if self.current is None:
                self._swap(base)

    async def use(self, checkpoint: Checkpoint) -> None:
        """Open a checkpoint's policy if it is newer than the current one (a failed open keeps the old one)."""
        if self.current is not None and checkpoint.policy_version <= self.current.version:
            return
        try:
            policy = await asyncio.to_thread(self.versions.open, checkpoint.uri, checkpoint.policy_version,
                                             roots=self.roots)
        except Exception as exc:  # noqa: BLE001 - a bad (or refused) checkpoint must not stop the agents
            log.error("cannot open policy v%s from %s: %s", checkpoint.policy_version, checkpoint.uri, exc)
            return
        if self.current is None or checkpoint.policy_version > self.current.version:
            self._swap(policy)

    def _swap(self, policy: "PolicyVersion") -> None:
        self.current = policy
        AGENT_POLICY_VERSION.set(policy.version)

    def get(self) -> "PolicyVersion":
        if self.current is None:
            raise PolicyUnavailable("no checkpoint announced yet and no base policy configured")
        return self.current


@dataclass(frozen=True)
class PassRate:
    """A sample's measured difficulty: `correct` right answers out of `rollouts` (k, or fewer when the verdict was
    certain earlier) by policy `version`."""

    correct: int
    rollouts: int
    version: int


@dataclass(frozen=True)
class _Rollout:
    policy: "PolicyVersion"
    image: Image.Image
    body: SampleBody


class PolicyPassRate:
    """Correct answers of the current policy out of up to `settings.samples` sampled ones, batched across callers
    (see `_solve_group` for when it stops early)."""

    def __init__(self, holder: PolicyHolder, settings: DifficultySettings):
        self.holder = holder
        self.settings = settings
        self._batcher: MicroBatcher[_Rollout, tuple[int, int]] = MicroBatcher(self._solve, settings.batch_size,
                                                                               window_s=0.01)

    async def measure(self, image: Image.Image, body: SampleBody) -> PassRate:
        """The current policy's pass rate on a sample; raises `PolicyUnavailable` (also when the policy server
        gives no answers)."""
        policy = self.holder.get()
        try:
            correct, rollouts = await self._batcher.submit(_Rollout(policy, image, body))
        except (EndpointFailure, VersionNotServed, WrongVersion) as exc:
            raise PolicyUnavailable(f"the policy server: {exc}") from exc
        return PassRate(correct, rollouts, policy.version)

    async def close(self) -> None:
        await self._batcher.close()

    def _solve(self, rollouts: list[_Rollout]) -> list[tuple[int, int]]:
        counts: dict[int, tuple[int, int]] = {}
        for policy in {id(r.policy): r.policy for r in rollouts}.values():
            group = [(i, r) for i, r in enumerate(rollouts) if r.policy is policy]
            solved = self._solve_group(policy, [r for _, r in group])
            counts.update((i, count) for (i, _), count in zip(group, solved))
        return [counts[i] for i in range(len(rollouts))]

    def _solve_group(self, policy: "PolicyVersion", rollouts: list[_Rollout]) -> list[tuple[int, int]]:
        """(correct answers, rollouts) per sample, all measured by one policy version: the prompts are prepared
        once, then sampled in stages until every sample's verdict is certain (`next_stage`), so a sample stops as
        soon as it is certainly above, below or inside the band."""
        from dpe.policy.generation import SamplingParams

        conversations = [build_messages(r.body.question, r.body.answer_type, r.body.options) for r in rollouts]
        sampler = policy.sampler([r.image.convert("RGB") for r in rollouts], conversations)
        correct, done = [0] * len(rollouts), [0] * len(rollouts)
        while stage := next_stage(correct, done, self.settings):
            live = [i for i in range(len(rollouts)) if not decided(correct[i], done[i], self.settings)]
            params = SamplingParams(max_new_tokens=self.settings.max_new_tokens,
                                    temperature=self.settings.temperature, num_samples=stage)
            for i, samples in zip(live, sampler(params, live)):
                correct[i] += sum(grade(text, rollouts[i].body.key).correct for text in samples)
                done[i] += stage
            AGENT_BAND_ROLLOUTS.inc(stage * len(live))
        return list(zip(correct, done))


def band_verdict(correct: int, done: int, settings: DifficultySettings) -> str:
    """"too_hard" when `correct` right answers out of `done` rollouts can no longer reach the band, "too_easy" when
    they are already above it, else "ok" (in the band, or not yet certain).

    Example:
        >>> band = DifficultySettings(samples=9, min_correct=3, max_correct=7)
        >>> band_verdict(0, 7, band), band_verdict(8, 8, band), band_verdict(3, 9, band)
        ('too_hard', 'too_easy', 'ok')
    """
    if correct + settings.samples - done < settings.min_correct:
        return "too_hard"
    return "too_easy" if correct > settings.max_correct else "ok"


def decided(correct: int, done: int, settings: DifficultySettings) -> bool:
    """Whether a sample's verdict is certain after `correct` right answers out of `done` rollouts: all k are in,
    it is already above the band, it can no longer reach the band, or it stays in the band whatever comes.

    Example:
        >>> band = DifficultySettings(samples=9, min_correct=3, max_correct=7)
        >>> decided(0, 7, band), decided(1, 7, band), decided(8, 8, band), decided(3, 5, band), decided(3, 4, band)
        (True, False, True, True, False)
    """
    left = settings.samples - done
    in_band_whatever_comes = settings.min_correct <= correct and correct + left <= settings.max_correct
    return left <= 0 or band_verdict(correct, done, settings) != "ok" or in_band_whatever_comes


def next_stage(correct: Sequence[int], done: Sequence[int], settings: DifficultySettings) -> int:
    """Rollouts to draw next for every undecided sample (0 when all are decided): the fewest after which some
    sample's verdict can be certain, so that no sample is rolled out past its certain verdict.

    Example:
        >>> band = DifficultySettings(samples=9, min_correct=3, max_correct=7)
        >>> next_stage([0, 0], [0, 0], band), next_stage([0, 1], [7, 7], band), next_stage([0], [7], band)
        (5, 1, 0)
    """
    k, low, high = settings.samples, settings.min_correct, settings.max_correct
    stages = [min(k - d, high + 1 - c, k - low + c + 1 - d, max(low - c, 0) + max(c + k - d - high, 0))
              for c, d in zip(correct, done) if not decided(c, d, settings)]
    return min(stages, default=0)
