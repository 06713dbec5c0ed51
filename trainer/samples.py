"""From accepted-sample events to training samples: dedup, staleness, image and answer checks.

A sample is trained at most once: `dpe.recent.RecentIds` remembers the ids already trained (it is
saved in every checkpoint). A sample filtered against a policy too many versions old is dropped or
down-weighted (`staleness_weight`). A sample whose image is missing or corrupt in the blob store,
or whose answer cannot be graded, raises here and is dead-lettered by the caller.

Example:
    >>> from trainer.settings import StalenessSettings
    >>> staleness_weight(3, 10, StalenessSettings(max_versions=4)) is None
    True
    >>> staleness_weight(3, 10, StalenessSettings(max_versions=4, action="downweight", decay=0.5))
    0.125
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from dpe.blobstore import BlobStore
from dpe.events import AcceptedSample, AnswerType, SampleBody
from dpe.grading import grade
from dpe.policy.prompts import boxed, build_messages
from trainer.settings import StalenessSettings


class InvalidSample(ValueError):
    """An accepted sample that cannot be trained on: its answer does not grade as correct against itself."""


@dataclass(frozen=True)
class TrainingSample:
    """One prompt of a GRPO round: the image, the question and what grades its answers."""

    sample_id: str
    capability: str
    image: Image.Image
    question: str
    answer: str
    answer_type: AnswerType
    options: tuple[str, ...] | None
    tolerance: float
    policy_version: int
    weight: float = 1.0

    def row(self) -> dict[str, Any]:
        """The sample as a row of TRL's GRPO dataset: a conversational prompt, an ``image`` and the reward columns."""
        return {
            "prompt": build_messages(self.question, self.answer_type, self.options),
            "image": self.image,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "options": list(self.options) if self.options else None,
            "tolerance": self.tolerance,
            "weight": self.weight,
        }


def staleness_weight(sample_version: int, policy_version: int, settings: StalenessSettings) -> float | None:
    """The weight of a sample filtered against `sample_version` when training `policy_version`.

    1.0 within `settings.max_versions` versions; beyond it None (drop) or ``decay ** excess``
    (downweight). A sample from a newer policy than the trainer's counts as fresh.
    """
    if settings.max_versions is None:
        return 1.0
    excess = policy_version - sample_version - settings.max_versions
    if excess <= 0:
        return 1.0
    if settings.action == "drop":
        return None
    return settings.decay**excess


def check_gradable(body: SampleBody) -> None:
    """Raise `InvalidSample` unless the sample's own answer, boxed, grades as correct.

    Catches unknown answer types, numbers that do not parse and choice letters outside the options.

    Example:
        >>> from dpe.events import BlobRef
        >>> image = BlobRef(sha256="0" * 64, media_type="image/png", size_bytes=1, width=1, height=1)
        >>> body = SampleBody(image=image, question="How many?", answer="many", answer_type="number")
        >>> check_gradable(body)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        trainer.samples.InvalidSample: answer 'many' does not grade as correct against itself as number (...)
    """
    try:
        verdict = grade(boxed(body.answer), body.key)
    except ValueError as error:
        raise InvalidSample(f"answer {body.answer!r} cannot be graded as {body.answer_type}: {error}") from error
    if not verdict.correct:
        raise InvalidSample(
            f"answer {body.answer!r} does not grade as correct against itself as {body.answer_type} ({verdict.reason})"
        )


def load_sample(event: AcceptedSample, store: BlobStore, weight: float = 1.0) -> TrainingSample:
    """The training sample of an accepted-sample event, its image read from the blob store.

    Raises `dpe.blobstore.BlobMissing` / `BlobCorrupt` for a bad image and `InvalidSample` for an
    answer that cannot be graded.
    """
    body = event.body
    check_gradable(body)
    image = store.open_image(body.image)
    return TrainingSample(
        sample_id=event.sample_id,
        capability=event.capability,
        image=image.convert("RGB") if image.mode != "RGB" else image,
        question=body.question,
        answer=body.answer,
        answer_type=body.answer_type,
        options=tuple(body.options) if body.options else None,
        tolerance=body.tolerance,
        policy_version=event.policy_version,
        weight=weight,
    )
