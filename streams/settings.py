"""Settings of the weakness stream: how weakness is scored, how quotas are planned, how the worker runs.

`StreamConfig` is what the stream reads: the core settings plus the ``stream`` section, from the
same YAML file and ``DPE_STREAM__*`` environment variables as everything else (e.g.
``DPE_STREAM__QUOTAS__STRATEGY=uniform``).

Example:
    >>> s = StreamSettings(quotas={"strategy": "uniform", "budget": 70})
    >>> s.quotas.budget, s.scoring.half_life_unit, s.metrics_port
    (70, 'versions', 9101)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, field_validator, model_validator

from dpe.config import CoreSettings, following, set_derived, world_capabilities
from dpe.section import Section

StrategyName = Literal["dpe_step", "proportional", "uniform", "learning_progress", "static"]
"""The quota strategies by name (`streams.strategies.STRATEGIES` implements exactly these)."""


class ScoringSettings(Section):
    """How evidence becomes a per-capability weakness (see `streams.scoring`)."""

    taxonomy: tuple[str, ...] = Field(
        default_factory=world_capabilities,
        description="Known capabilities (in a deployment: the top-level capabilities).",
    )
    open_taxonomy: bool = Field(False, description="Accept capabilities outside the taxonomy, not dead-letter them.")
    half_life: float = Field(1.0, gt=0, description="Evidence this old (in `half_life_unit`) counts half.")
    half_life_unit: Literal["versions", "events"] = Field(
        "versions", description="'versions': age in policy versions behind the newest; 'events': newer observations."
    )
    prior_errors: float = Field(1.0, gt=0, description="Beta prior pseudo-count of errors (alpha).")
    prior_successes: float = Field(1.0, gt=0, description="Beta prior pseudo-count of successes (beta).")
    credible_level: float = Field(0.9, gt=0, lt=1, description="Mass of the equal-tailed credible interval.")
    divergence_weight: float = Field(0.5, ge=0, description="Weight of one divergence (times its consensus strength).")
    divergence_share: float = Field(
        0.25, gt=0, le=1, description="Most share of a capability's evidence weight divergences may have next to "
        "eval outcomes: they only ever report errors, so unbounded their number alone would drive the rate to 1."
    )
    keep_versions: int = Field(
        3, ge=1, description="Newest policy versions kept item by item (re-runs overwrite); older ones are folded."
    )
    trend_versions: int = Field(8, ge=2, description="Policy versions the trend (error-rate slope) is fitted over.")
    measure_only_suites: tuple[str, ...] = Field(
        ("heldout",), description="Evaluation suites that only measure the policy (held-out): they never steer quotas."
    )

    @field_validator("taxonomy")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("taxonomy lists a capability twice")
        return value


class QuotaSettings(Section):
    """How a weakness snapshot becomes a quota plan (see `streams.strategies`)."""

    strategy: StrategyName = Field("dpe_step", description="A key of `streams.strategies.STRATEGIES`.")
    budget: int = Field(1000, ge=0, description="Samples per round, over all capabilities.")
    floor: int = Field(1, ge=0, description="Fewest samples per capability (at least 1 whenever the budget allows).")
    cap: int | None = Field(None, ge=1, description="Most samples per capability (None: no cap).")
    floors: dict[str, NonNegativeInt] = Field(default_factory=dict, description="Per-capability floors over `floor`.")
    caps: dict[str, NonNegativeInt] = Field(default_factory=dict, description="Per-capability caps over `cap`.")
    exploration: float = Field(
        0.25, ge=0, description="learning_progress: weight share a weak capability keeps without measured progress."
    )
    progress_confidence_n: float = Field(
        20.0, gt=0, description="learning_progress: effective n at which a measured trend is trusted half-way."
    )
    round_evidence: int = Field(
        0, ge=0, description="Outcomes of a new policy version to wait for before planning its round, once per "
        "version (0: re-plan on every snapshot)."
    )



class StreamSettings(Section):
    """The weakness stream service: scoring, planning, batching and publishing cadence."""

    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    app_id: str = Field("weakness", pattern=r"^[A-Za-z0-9._-]+$", description="Faust app id (after the topic prefix).")
    batch_size: int = Field(1000, ge=1, description="Most events handled per batch (`take_events`).")
    batch_within_s: float = Field(0.05, gt=0, lt=5, description="Longest wait to fill a batch (< session timeout).")
    snapshot_every_events: int = Field(2000, ge=1, description="Publish weakness after this many events...")
    snapshot_every_s: float = Field(0.25, gt=0, description="...or this many seconds, whichever comes first.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus endpoint port (0: none).")


class StreamConfig(CoreSettings):
    """What the weakness stream reads: the core settings and its own section."""

    stream: StreamSettings = Field(default_factory=StreamSettings)

    @model_validator(mode="after")
    def _stream_follows_capabilities(self) -> "StreamConfig":
        scoring = following(self.stream.scoring, "stream.scoring", "taxonomy", self.capabilities)
        set_derived(self, "stream", self.stream.model_copy(update={"scoring": scoring}))
        return self
