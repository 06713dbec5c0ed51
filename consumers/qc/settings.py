"""Settings of the quality-control chain: thresholds and the difficulty band (``agents.qc``).

Example:
    >>> QCSettings(difficulty={"enabled": True}).difficulty.samples
    9
"""

from __future__ import annotations

from pydantic import Field, model_validator

from dpe.section import Section


class DifficultySettings(Section):
    """The difficulty band: keep samples the current policy solves between min and max times out of k."""

    enabled: bool = False
    samples: int = Field(default=9, ge=1, description="k rollouts per sample.")
    min_correct: int = Field(default=3, ge=0)
    max_correct: int = Field(default=7, ge=0)
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=12, ge=1)
    batch_size: int = Field(default=64, ge=1, description="Samples rolled out together.")
    torch_threads: int = Field(
        default=1, ge=0,
        description="Torch threads of the agents' process (0: torch's default). One leaves a core to the crew: on 2 "
        "cores, 2 threads gave 22.6 accepted/s, 1 gave 28.2.",
    )
    base_policy: str | None = Field(default=None, description="Policy folder used until the first checkpoint.")
    reach_evidence: int = Field(
        default=40, ge=1,
        description="Band verdicts on a capability, under one policy version, before it can be judged out of reach.",
    )
    reach_floor: float = Field(
        default=0.05, ge=0, le=1,
        description="A capability of whose samples the band keeps a smaller share is out of reach: no more attempts "
        "at it, and the plan's other capabilities fill its room (`consumers.agents.reach`).",
    )

    @model_validator(mode="after")
    def _band(self) -> "DifficultySettings":
        if not self.min_correct <= self.max_correct <= self.samples:
            raise ValueError("need min_correct <= max_correct <= samples")
        return self


class QCSettings(Section):
    """The quality-control chain's thresholds."""

    min_options: int = Field(default=3, ge=2, description="Multiple choice needs at least this many options.")
    max_options: int = Field(default=8, ge=2)
    near_duplicate: bool = True
    image_distance: int = Field(default=20, ge=0, le=255, description="Bits of the 256-bit pHash that may differ.")
    colour_distance: float = Field(default=6.0, ge=0, description="Mean colour difference of a 4 x 4 layout.")
    text_similarity: float = Field(default=0.8, ge=0, le=1, description="Question similarity of a near-duplicate.")
    difficulty: DifficultySettings = Field(default_factory=DifficultySettings)
