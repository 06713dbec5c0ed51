"""Diagnostic items from any suite, and the synthetic world's two suites.

An `EvalItem` is one question with its verifiable answer; benchmark loaders and the synthetic
world both produce them. Benchmark images stay encoded (`bytes`) until they are asked about, so a
large benchmark file does not hold every decoded image in memory.

The synthetic suites come from the world's diagnostic pool, whose seeds the training stream never
uses. Both walk the same permutation of that pool: the held-out suite takes its first slots (the
same items every policy version), and policy version v takes the slice after them that belongs to
round ``v + offset``, so no round item is ever a held-out item and every version sees fresh items.

Example:
    >>> from producers.evaluator.settings import SyntheticSuites
    >>> config = SyntheticSuites(round_items=14, heldout_items=7)
    >>> heldout = {item.item_id for item in heldout_items(config)}
    >>> rounds = [{item.item_id for item in round_items(config, v)} for v in range(3)]
    >>> any(heldout & ids for ids in rounds), rounds[0] & rounds[1], len(heldout)
    (False, set(), 7)
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from dpe.events import AnswerKey, AnswerType
from dpe.world import WorldItem, diagnostic_sample
from producers.evaluator.settings import SyntheticSuites


@dataclass(frozen=True)
class EvalItem:
    """One diagnostic question about one image, with the answer it is graded against.

    For `choice` items the answer is the option's letter and `options` are the option texts.
    """

    suite: str
    item_id: str
    capability: str
    image: Image.Image | bytes
    question: str
    answer: str
    answer_type: AnswerType
    options: tuple[str, ...] | None = None
    tolerance: float = 0.0

    @property
    def key(self) -> AnswerKey:
        """What answers to the question are graded against."""
        return AnswerKey.of(self)

    def load_image(self) -> Image.Image:
        """The image as RGB pixels (encoded images are decoded now)."""
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        with Image.open(io.BytesIO(self.image)) as image:
            return image.convert("RGB")


def from_world_item(item: WorldItem, suite: str) -> EvalItem:
    """The evaluation view of a world item."""
    return EvalItem(
        suite=suite,
        item_id=item.item_id,
        capability=item.capability,
        image=item.image,
        question=item.question,
        answer=item.answer,
        answer_type=item.answer_type,
        options=item.options,
        tolerance=item.tolerance,
    )


def _per_capability(n: int, config: SyntheticSuites) -> int:
    return -(-n // len(config.capabilities))


def heldout_items(config: SyntheticSuites) -> list[EvalItem]:
    """The fixed held-out suite: the first slots of the diagnostic pool, the same every time."""
    items = diagnostic_sample(
        0, config.heldout_items, config.seed, capabilities=config.capabilities, levels=config.levels,
        image_size=config.image_size,
    )
    return [from_world_item(item, config.heldout_suite) for item in items]


def round_items(config: SyntheticSuites, policy_version: int) -> list[EvalItem]:
    """A fresh diagnostic sample for a policy version, never overlapping the held-out suite."""
    if config.round_items == 0:
        return []
    per_round = _per_capability(config.round_items, config)
    offset = -(-_per_capability(config.heldout_items, config) // per_round)
    items = diagnostic_sample(
        policy_version + offset,
        config.round_items,
        config.seed,
        capabilities=config.capabilities,
        levels=config.levels,
        image_size=config.image_size,
    )
    return [from_world_item(item, config.round_suite) for item in items]
