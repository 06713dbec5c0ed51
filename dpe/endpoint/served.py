"""Answers of one policy version from the policy server (`dpe serve policy`, or vLLM serving ``model@vN``).

`ServedPolicy` is what the evaluator, the difficulty band and the auditor's target use under
``inference.mode: server`` instead of loading a checkpoint themselves. Every request names the version it wants
(``dpe-policy@v3``), and the reply must name it back: a reply made by another version raises `WrongVersion`, so an
outcome is never attributed to the wrong version. A version the server has not loaded yet (HTTP 404) is asked again
every `POLL_S` until ``inference.wait_s`` has passed; one older than every version the server still keeps will not
come back and raises `VersionNotServed` at once. The prompts of one call go out together, from
``inference.concurrency`` threads, so the server generates them as one batch; each asks for ``n`` completions.

Example:
    >>> from dpe.config import InferenceSettings
    >>> served = ServedPolicy(InferenceSettings(mode="server"), role="evaluator")
    >>> served.settings.versioned(2)
    'dpe-policy@v2'
    >>> openai_messages([{"role": "user", "content": [{"type": "text", "text": "Q?"}]}], None)
    [{'role': 'user', 'content': [{'type': 'text', 'text': 'Q?'}]}]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from PIL import Image

from dpe.config import InferenceSettings, model_version
from dpe.endpoint.client import EndpointClient, EndpointFailure, Messages, image_part
from dpe.endpoint.settings import EndpointSettings

if TYPE_CHECKING:
    from dpe.policy.generation import SamplingParams

POLL_S = 0.5
"""How often a version the server has not loaded yet is asked for again."""


class VersionNotServed(RuntimeError):
    """The policy server did not serve the version asked for within ``inference.wait_s``, or no longer serves it."""


class WrongVersion(RuntimeError):
    """A reply names another policy version than the one asked for."""


def openai_messages(conversation: list[dict[str, Any]], image: Image.Image | None) -> Messages:
    """A `dpe.policy.prompts.build_messages` conversation as OpenAI chat messages: its image placeholder becomes the
    image as a data URL (the policy server turns it back into the same prompt)."""
    def part(content: dict[str, Any]) -> dict[str, Any]:
        return image_part(image) if content.get("type") == "image" and image is not None else content

    return [{**message, "content": [part(content) for content in message["content"]]}
            if isinstance(message["content"], list) else message for message in conversation]


class ServedPolicy:
    """Completions of named policy versions from the policy server at ``inference.url``; `role` names the caller in
    the request metrics."""

    def __init__(self, settings: InferenceSettings, role: str):
        self.settings = settings
        self.role = role
        self.client = EndpointClient(EndpointSettings(
            base_url=settings.url, model=settings.model, timeout_s=settings.timeout_s,
            concurrency=settings.concurrency, max_retries=2))

    def served_versions(self) -> list[int]:
        """The versions the server has loaded now (``/v1/models``)."""
        versions = []
        for name in self.client.model_names():
            model, version = model_version(name)
            if model == self.settings.model and version is not None:
                versions.append(version)
        return sorted(versions)

    def wait_served(self, version: int) -> None:
        """Return once the server serves `version`; `VersionNotServed` after ``inference.wait_s``, or at once when
        it has moved past it."""
        deadline = time.monotonic() + self.settings.wait_s
        while version not in (loaded := self._reachable_versions()):
            self._check_waiting(version, loaded, deadline)
            time.sleep(POLL_S)

    def generate(self, version: int, images: Sequence[Image.Image], conversations: Sequence[list[dict[str, Any]]],
                 params: SamplingParams, *, seed: int | None = None) -> list[list[str]]:
        """`params.num_samples` completions of `version` for each conversation about its image, in order."""
        if len(images) != len(conversations):
            raise ValueError(f"{len(images)} images for {len(conversations)} conversations")
        requests = [openai_messages(conversation, image) for image, conversation in zip(images, conversations)]
        with ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix=self.role) as pool:
            return list(pool.map(lambda messages: self._complete(version, messages, params, seed), requests))

    def close(self) -> None:
        self.client.close_sync()

    def _complete(self, version: int, messages: Messages, params: SamplingParams, seed: int | None) -> list[str]:
        wanted = self.settings.versioned(version)
        deadline = time.monotonic() + self.settings.wait_s
        while True:
            try:
                response = self.client.completion_sync(
                    self.role, messages, model=wanted, n=params.num_samples, temperature=params.temperature,
                    max_tokens=params.max_new_tokens, seed=seed)
            except EndpointFailure as failure:
                if failure.status != 404:
                    raise
                self._check_waiting(version, self._reachable_versions(), deadline)
                time.sleep(POLL_S)
                continue
            if response.model != wanted:
                raise WrongVersion(f"asked {wanted}, the reply names {response.model}")
            texts = [choice.message.content or "" for choice in sorted(response.choices, key=lambda c: c.index)]
            if len(texts) != params.num_samples:
                raise WrongVersion(f"asked {params.num_samples} completions of {wanted}, got {len(texts)}")
            return texts

    def _reachable_versions(self) -> list[int]:
        """`served_versions`, or none while the server cannot be reached (it may be starting)."""
        try:
            return self.served_versions()
        except EndpointFailure:
            return []

    def _check_waiting(self, version: int, loaded: list[int], deadline: float) -> None:
        """Raise `VersionNotServed` when waiting for `version` is over: the server keeps only newer versions, or
        `deadline` has passed."""
        shown = ", ".join(map(str, loaded)) or "none"
        if loaded and version < loaded[0]:
            raise VersionNotServed(f"policy version {version} is no longer served at {self.settings.url} "
                                   f"(loaded: {shown}; raise policy.keep_versions to keep more)")
        if time.monotonic() > deadline:
            raise VersionNotServed(f"policy version {version} was not served at {self.settings.url} within "
                                   f"{self.settings.wait_s:g}s (loaded: {shown})")
