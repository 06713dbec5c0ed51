"""Labeled items and the three draws of the world: diagnostic pool, training stream, unlabeled scenes.

Every draw derives its seeds in its own namespace (`dpe.world.seeds`), so no diagnostic item can
ever appear in the training stream or among the unlabeled scenes. Item ids carry the namespace.

Example:
    >>> item = make_item("counting", difficulty=2, index=0, namespace="training")
    >>> item.item_id, item.answer_type, item.image.size
    ('training/counting/d2/0', 'number', (64, 64))
    >>> [i.item_id for i in diagnostic_sample(round=0, n=2, seed=0, capabilities=["color"])] == \
        [i.item_id for i in diagnostic_sample(round=0, n=2, seed=0, capabilities=["color"])]
    True
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from dpe.events import AnswerKey, AnswerType, BlobRef, SampleBody
from dpe.world.knobs import DIFFICULTY_LEVELS, Knobs
from dpe.world.questions import CAPABILITIES, SCENE_KIND_OF, QuestionNotPossible, write_question
from dpe.world.render import render_scene
from dpe.world.scene import SCENE_KINDS, Scene, generate_scene
from dpe.world.seeds import Namespace, derive_seed

DIAGNOSTIC_POOL_SIZE = 1_000_003
"""Items per capability in the diagnostic pool (a prime, so an affine map permutes it)."""

_MAX_VARIANTS = 64


@dataclass(frozen=True)
class WorldItem:
    """A labeled item: image, question and verifiable answer, with where it came from."""

    item_id: str
    capability: str
    difficulty: int
    image: Image.Image
    question: str
    answer: str
    answer_type: AnswerType
    options: tuple[str, ...] | None
    tolerance: float
    seed: int
    scene: Scene

    @property
    def key(self) -> AnswerKey:
        """What answers to the question are graded against."""
        return AnswerKey.of(self)

    def to_sample_body(self, image: BlobRef) -> SampleBody:
        """The event body for this item, given where its image was stored."""
        return SampleBody(
            image=image,
            question=self.question,
            answer=self.answer,
            answer_type=self.answer_type,
            options=list(self.options) if self.options else None,
            tolerance=self.tolerance,
        )


def image_sha256(image: Image.Image) -> str:
    """Hash of an image's size, mode and pixels (not of any file encoding)."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def make_item(
    capability: str,
    difficulty: int,
    index: int,
    namespace: Namespace = "training",
    *,
    image_size: int = 64,
    knobs: Knobs | None = None,
) -> WorldItem:
    """The item `index` of a capability at a difficulty in a namespace (deterministic).

    The seed depends on (namespace, capability, index) only, so the same index at two difficulty
    levels shows how the knobs change an item. `knobs` overrides the level's knobs.
    """
    if capability not in SCENE_KIND_OF:
        raise ValueError(f"unknown capability {capability!r}; expected one of {CAPABILITIES}")
    seed = derive_seed(namespace, f"{capability}/{index}")
    for variant in range(_MAX_VARIANTS):
        scene = generate_scene(
            SCENE_KIND_OF[capability], difficulty, seed, image_size=image_size, knobs=knobs, variant=variant
        )
        try:
            question = write_question(scene, capability, seed=seed + variant)
        except QuestionNotPossible:
            continue
        return WorldItem(
            item_id=f"{namespace}/{capability}/d{difficulty}/{index}",
            capability=capability,
            difficulty=difficulty,
            image=render_scene(scene),
            question=question.question,
            answer=question.answer,
            answer_type=question.answer_type,
            options=question.options,
            tolerance=question.tolerance,
            seed=seed,
            scene=scene,
        )
    raise QuestionNotPossible(f"no {capability} question fits {_MAX_VARIANTS} scenes drawn for seed {seed}")


def diagnostic_sample(
    round: int,
    n: int,
    seed: int = 0,
    *,
    capabilities: Sequence[str] = CAPABILITIES,
    levels: Sequence[int] = DIFFICULTY_LEVELS,
    image_size: int = 64,
) -> list[WorldItem]:
    """A fresh, capability-balanced diagnostic sample for a round, deterministic in its arguments.

    Each capability's pool is walked in an order fixed by `seed`; round r takes the r-th slice,
    so rounds never repeat an item until a pool of `DIAGNOSTIC_POOL_SIZE` is exhausted. An item's
    difficulty is fixed by its pool index, cycling through `levels`.
    """
    if n < 0 or round < 0:
        raise ValueError("round and n must be non-negative")
    per_capability = -(-n // len(capabilities))
    items = []
    for position in range(n):
        capability = capabilities[position % len(capabilities)]
        slot = round * per_capability + position // len(capabilities)
        index = _pool_index(slot, seed, capability)
        level = levels[index % len(levels)]
        items.append(make_item(capability, level, index, "diagnostic", image_size=image_size))
    return items


def _pool_index(slot: int, seed: int, capability: str) -> int:
    key = hashlib.sha256(f"{seed}/{capability}".encode()).digest()
    scale = 1 + int.from_bytes(key[:8], "big") % (DIAGNOSTIC_POOL_SIZE - 1)
    shift = int.from_bytes(key[8:16], "big") % DIAGNOSTIC_POOL_SIZE
    return (scale * (slot % DIAGNOSTIC_POOL_SIZE) + shift) % DIAGNOSTIC_POOL_SIZE


def training_stream(
    mix: Mapping[str, float],
    seed: int = 0,
    *,
    start: int = 0,
    levels: Sequence[int] = DIFFICULTY_LEVELS,
    image_size: int = 64,
) -> Iterator[WorldItem]:
    """An endless stream of training items whose capabilities follow the weights in `mix`.

    Position i picks its capability and level from (seed, i); streams with different seeds use
    different item indices.

    Example:
        >>> stream = training_stream({"color": 1.0}, seed=1)
        >>> next(stream).capability
        'color'
    """
    if seed < 0:
        raise ValueError("seed must be non-negative")
    names = [name for name, weight in mix.items() if weight > 0]
    unknown = set(names) - set(CAPABILITIES)
    if not names or unknown:
        raise ValueError(f"mix needs positive weights over known capabilities; unknown: {sorted(unknown)}")
    weights = [mix[name] for name in names]
    position = start
    while True:
        rng = random.Random(f"training-stream/{seed}/{position}")
        capability = rng.choices(names, weights)[0]
        index = (seed << 40) | position
        yield make_item(capability, rng.choice(levels), index, "training", image_size=image_size)
        position += 1


def unlabeled_scene(
    index: int,
    seed: int = 0,
    *,
    kinds: Sequence[str] = SCENE_KINDS,
    levels: Sequence[int] = DIFFICULTY_LEVELS,
    image_size: int = 64,
) -> Scene:
    """The unlabeled scene `index`: metadata only; render it with `render_scene`.

    Example:
        >>> unlabeled_scene(0) == unlabeled_scene(0)
        True
    """
    scene_seed = derive_seed("unlabeled", f"{seed}/{index}")
    rng = random.Random(scene_seed)
    return generate_scene(rng.choice(kinds), rng.choice(levels), scene_seed, image_size=image_size)


def synthetic_source(index: int, seed: int = 0) -> str:
    """The `source` an ingested unlabeled scene carries: ``synthetic:<seed>/<index>``.

    Example:
        >>> synthetic_source(7, seed=2)
        'synthetic:2/7'
    """
    return f"synthetic:{seed}/{index}"


def scene_of_source(source: str, image_size: int = 64) -> Scene | None:
    """The true scene behind a synthetic item's `source`, None for any other source. This is the world's answer
    key: graders, benchmarks and tests read it; the agents and the auditor never do.

    Example:
        >>> scene_of_source(synthetic_source(3, seed=1)) == unlabeled_scene(3, 1)
        True
        >>> scene_of_source("/data/photo.png") is None
        True
    """
    seed, _, index = source.removeprefix("synthetic:").partition("/")
    if not source.startswith("synthetic:") or not (seed.isdigit() and index.isdigit()):
        return None
    return unlabeled_scene(int(index), int(seed), image_size=image_size)
