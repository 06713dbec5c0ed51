"""Who answers the auditor's probes: the target policy and the reference models, behind one interface.

A `ProbeAnswerer` gets (view, probe) pairs and returns one answer text per pair, or None where it
abstains. Three kinds of reference are pluggable (`AuditorSettings.references`):

- ``toolchain`` (the default, twice): a `dpe.perception` toolchain reads the pixels and answers the
  world's questions about what it saw; the two toolchains share no code, so their consensus is
  evidence. They stand in on CPU for strong VLM references behind endpoints;
- ``checkpoint``: another local checkpoint folder (batched greedy generation);
- ``endpoint``: a model behind an OpenAI-compatible endpoint (the image goes as a data URL).

No reference reads the synthetic world's answer key: the oracle that does is a test fixture
(``tests/oracle.py``), never a configured reference.

Example:
    >>> from dpe.world import generate_scene, render_scene
    >>> from producers.auditor.probes import world_probe
    >>> scene = generate_scene("formula", 1, seed=4)
    >>> probe = world_probe(scene, "arithmetic", seed=0)
    >>> ToolchainAnswerer("contours", "contours").answer([(View("i", render_scene(scene)), probe)]) == [
    ...     str(scene.formula.value())]
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from dpe.config import PlacementSettings
from dpe.endpoint.client import EndpointClient, EndpointFailure, image_part
from dpe.policy.checkpoints import load_checkpoint
from dpe.inference import LocalVersion, PolicyVersion
from dpe.policy.generation import SamplingParams
from dpe.policy.prompts import build_messages, format_question
from dpe.perception import NotPerceived
from dpe.perception.toolchain import TOOLCHAINS
from dpe.world import Scene
from dpe.world.answers import NotAnswerable, answer_question
from producers.auditor.probes import Probe
from producers.auditor.settings import CheckpointReference, Reference, ToolchainReference


@dataclass(frozen=True)
class View:
    """An image shown to the models: the item's own, or a counterfactual edit of it (with its edited scene)."""

    item_id: str
    image: Image.Image
    scene: Scene | None = None
    edit: str | None = None
    counterfactual_of: str | None = None


class ProbeAnswerer(Protocol):
    """Answers probes about views; None where it abstains."""

    name: str

    def answer(self, asked: Sequence[tuple[View, Probe]]) -> list[str | None]: ...


class PolicyAnswerer:
    """A policy version (the target, loaded here or served; or a checkpoint reference): greedy, batched."""

    def __init__(self, name: str, policy: PolicyVersion, max_new_tokens: int = 24, batch_size: int = 32) -> None:
        self.name = name
        self.policy = policy
        self.params = SamplingParams(max_new_tokens=max_new_tokens, batch_size=batch_size)

    def answer(self, asked: Sequence[tuple[View, Probe]]) -> list[str | None]:
        conversations = [build_messages(probe.question, probe.answer_type, probe.options) for _, probe in asked]
        images = [view.image.convert("RGB") for view, _ in asked]
        return [samples[0] for samples in self.policy.generate(images, conversations, self.params)]


class ToolchainAnswerer:
    """Reads each view's pixels with a `dpe.perception` toolchain and answers the world's question about
    what it saw; abstains where it sees nothing or cannot read the question."""

    def __init__(self, name: str, toolchain: str) -> None:
        self.name = name
        self.toolchain = TOOLCHAINS[toolchain]

    def _answer(self, view: View, probe: Probe) -> str | None:
        try:
            return answer_question(self.toolchain.perceive(view.image), probe.question, probe.options)
        except (NotPerceived, NotAnswerable):
            return None

    def answer(self, asked: Sequence[tuple[View, Probe]]) -> list[str | None]:
        return [self._answer(view, probe) for view, probe in asked]


class EndpointAnswerer:
    """A model behind an OpenAI-compatible endpoint; an endpoint failure is an abstention.

    It asks through `EndpointClient.chat_sync` (its requests count under its own name), from the
    endpoint's `concurrency` threads at most.
    """

    def __init__(self, name: str, client: EndpointClient) -> None:
        self.name = name
        self.client = client

    def _answer(self, pair: tuple[View, Probe]) -> str | None:
        view, probe = pair
        content = [
            image_part(view.image),
            {"type": "text", "text": format_question(probe.question, probe.answer_type, probe.options)},
        ]
        try:
            return self.client.chat_sync(self.name, [{"role": "user", "content": content}])
        except EndpointFailure:
            return None

    def answer(self, asked: Sequence[tuple[View, Probe]]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.client.settings.concurrency, thread_name_prefix=self.name) as pool:
            return list(pool.map(self._answer, asked))


def reference_answerer(reference: Reference, max_new_tokens: int,
                       placement: PlacementSettings = PlacementSettings()) -> ProbeAnswerer:
    """The answerer a configured reference describes."""
    if isinstance(reference, ToolchainReference):
        return ToolchainAnswerer(reference.name, reference.toolchain)
    if isinstance(reference, CheckpointReference):
        reference_policy = LocalVersion(load_checkpoint(reference.uri, placement=placement), version=0)
        return PolicyAnswerer(reference.name, reference_policy, max_new_tokens)
    return EndpointAnswerer(reference.name, EndpointClient(reference.endpoint))
