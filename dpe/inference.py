"""The answers of one policy version, from a copy loaded in this process or from the policy server.

The evaluator, the difficulty band and the auditor's target open each checkpoint they use through
`PolicyVersions.open`, and ask the `PolicyVersion` it gives for completions; ``inference.mode`` decides where those
come from:

- ``local``: the checkpoint is loaded here (`dpe.policy.checkpoints.load_checkpoint`, where ``placement`` says);
- ``server``: nothing is loaded here. The checkpoint's folder is still checked against the roots (a refused one
  is refused at once, as a local load would refuse it), then `open` waits until the policy server serves that
  version, and every completion is asked of ``model@vN`` (`dpe.endpoint.served.ServedPolicy`).

Either way `PolicyVersion.generate` answers a batch of prompts and `PolicyVersion.sampler` draws completions again
and again for rows of one prompt list (the difficulty band's stages): a local copy encodes those prompts once, a
served one sends the rows asked for.

Example:
    >>> versions = PolicyVersions(InferenceSettings(), PlacementSettings(), role="evaluator")
    >>> versions.served is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from dpe.config import InferenceSettings, PlacementSettings
from dpe.endpoint.served import ServedPolicy
from dpe.policy.checkpoints import load_checkpoint, loadable_folder

if TYPE_CHECKING:
    from dpe.policy.generation import SamplingParams
    from dpe.policy.model import Policy

log = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]
"""A `dpe.policy.prompts.build_messages` conversation."""

Sampler = Callable[["SamplingParams", Sequence[int]], list[list[str]]]
"""`params.num_samples` completions for each prompt at the given rows of a fixed prompt list."""


class PolicyVersion(Protocol):
    """One policy version that answers prompts about images."""

    version: int

    def generate(self, images: Sequence[Image.Image], conversations: Sequence[Conversation], params: SamplingParams,
                 *, seed: int | None = None) -> list[list[str]]:
        """`params.num_samples` completions per conversation, in order."""

    def sampler(self, images: Sequence[Image.Image], conversations: Sequence[Conversation]) -> Sampler:
        """Draw completions for rows of these prompts, as often as wanted."""


@dataclass(frozen=True)
class LocalVersion:
    """A version loaded in this process (torch is imported only once one is used)."""

    policy: "Policy"
    version: int

    def generate(self, images: Sequence[Image.Image], conversations: Sequence[Conversation], params: SamplingParams,
                 *, seed: int | None = None) -> list[list[str]]:
        from dpe.policy.generation import generate

        return generate(self.policy, images, conversations, params, seed=seed)

    def sampler(self, images: Sequence[Image.Image], conversations: Sequence[Conversation]) -> Sampler:
        from dpe.policy.generation import encode_prompts, sample

        return partial(sample, self.policy, encode_prompts(self.policy, images, conversations))


@dataclass(frozen=True)
class ServedVersion:
    """A version the policy server serves."""

    served: ServedPolicy
    version: int

    def generate(self, images: Sequence[Image.Image], conversations: Sequence[Conversation], params: SamplingParams,
                 *, seed: int | None = None) -> list[list[str]]:
        return self.served.generate(self.version, images, conversations, params, seed=seed)

    def sampler(self, images: Sequence[Image.Image], conversations: Sequence[Conversation]) -> Sampler:
        def rows_of(params: SamplingParams, rows: Sequence[int]) -> list[list[str]]:
            return self.generate([images[row] for row in rows], [conversations[row] for row in rows], params)

        return rows_of


class PolicyVersions:
    """Opens policy versions for one caller (`role` names it in the policy server's request metrics), loaded here
    or served, as ``inference.mode`` says."""

    def __init__(self, inference: InferenceSettings = InferenceSettings(),
                 placement: PlacementSettings = PlacementSettings(), role: str = "policy"):
        self.inference = inference
        self.placement = placement
        self.served = ServedPolicy(inference, role) if inference.mode == "server" else None

    def check(self) -> None:
        """Refuse now a placement this machine cannot honour (`PlacementUnavailable`), rather than at the first
        checkpoint; a served policy is placed by its server."""
        if self.served is None:
            from dpe.policy.placement import resolve_placement

            resolve_placement(self.placement)

    def open(self, uri: str, version: int, *, roots: Sequence[Path] | None = None) -> PolicyVersion:
        """Version `version`, whose checkpoint is at `uri` (blocking: loads it, or waits until it is served). Raises
        what `load_checkpoint` raises for a checkpoint outside `roots`, and `VersionNotServed`."""
        if self.served is None:
            return LocalVersion(load_checkpoint(uri, roots=roots, placement=self.placement), version)
        if roots is not None:
            loadable_folder(uri, roots)
        self.served.wait_served(version)
        log.info("policy v%d: answered by the policy server at %s", version, self.inference.url)
        return ServedVersion(self.served, version)

    def close(self) -> None:
        if self.served is not None:
            self.served.close()
