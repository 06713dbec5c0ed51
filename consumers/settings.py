"""Settings of the agent crew (`dpe serve agents`), the `agents` section of `dpe.config.Settings`.

Example:
    >>> s = AgentSettings(backends={"writer": "llm"}, qc={"difficulty": {"enabled": True}})
    >>> s.backends.writer, s.backends.planner, s.qc.difficulty.samples
    ('llm', 'programmatic', 9)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

Backend = Literal["programmatic", "llm"]
"""A role is played by code (the synthetic world's metadata) or by an OpenAI-compatible model."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoleBackends(_Section):
    """Which backend plays each role. The retriever is always code; this picks its search backend."""

    planner: Backend = "programmatic"
    writer: Backend = "programmatic"
    validator: Backend = "programmatic"
    answerer: Backend = "programmatic"
    retriever: Literal["metadata", "embedding"] = "metadata"


class LLMSettings(_Section):
    """The OpenAI-compatible endpoint (vLLM, OpenAI, `consumers.agents.local_server`) behind `llm` roles."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: SecretStr = Field(default=SecretStr("unused"), description="Local servers ignore it.")
    model: str = "dpe-tiny"
    timeout_s: float = Field(default=30.0, gt=0, description="Per request.")
    max_retries: int = Field(default=3, ge=0, description="Retries after a timeout, 429, 5xx or lost connection.")
    output_retries: int = Field(default=2, ge=0, description="Re-asks after output that is not the JSON asked for.")
    backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles each time, with jitter.")
    backoff_max_s: float = Field(default=8.0, ge=0)
    concurrency: int = Field(default=8, ge=1, description="Requests in flight at most, per worker.")
    temperature: float = Field(default=0.2, ge=0)
    max_tokens: int = Field(default=256, ge=1)
    structured_output: bool = Field(default=True, description="Send the JSON schema as response_format.")


class DifficultySettings(_Section):
    """The difficulty band: keep samples the current policy solves between min and max times out of k."""

    enabled: bool = False
    samples: int = Field(default=9, ge=1, description="k rollouts per sample.")
    min_correct: int = Field(default=3, ge=0)
    max_correct: int = Field(default=7, ge=0)
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=12, ge=1)
    batch_size: int = Field(default=16, ge=1, description="Samples rolled out together.")
    base_policy: str | None = Field(default=None, description="Policy folder used until the first checkpoint.")

    @model_validator(mode="after")
    def _band(self) -> "DifficultySettings":
        if not self.min_correct <= self.max_correct <= self.samples:
            raise ValueError("need min_correct <= max_correct <= samples")
        return self


class QCSettings(_Section):
    """The quality-control chain's thresholds."""

    min_options: int = Field(default=3, ge=2, description="Multiple choice needs at least this many options.")
    max_options: int = Field(default=8, ge=2)
    near_duplicate: bool = True
    image_distance: int = Field(default=20, ge=0, le=255, description="Bits of the 256-bit pHash that may differ.")
    colour_distance: float = Field(default=6.0, ge=0, description="Mean colour difference of a 4 x 4 layout.")
    text_similarity: float = Field(default=0.8, ge=0, le=1, description="Question similarity of a near-duplicate.")
    difficulty: DifficultySettings = Field(default_factory=DifficultySettings)


class AgentSettings(_Section):
    """The agent crew: backends, LLM endpoint, QC and pacing."""

    group_id: str = "dpe-agents"
    backends: RoleBackends = Field(default_factory=RoleBackends)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    qc: QCSettings = Field(default_factory=QCSettings)
    attempts_per_item: int = Field(default=3, ge=1, description="Candidates per item and capability (1 + retries).")
    samples_per_item: int = Field(default=1, ge=1, description="Capabilities one item may serve.")
    edit_rate: float = Field(default=0.25, ge=0, le=1, description="Share of programmatic plans that edit the image.")
    concurrency: int = Field(default=16, ge=1, description="Items in flight per worker.")
    batch_size: int = Field(default=64, ge=1, description="Unlabeled records fetched at once.")
    retrieval_pool: int = Field(default=256, ge=1, description="Recent images the retriever searches.")
    metrics_port: int = Field(default=9104, ge=0, le=65535, description="Prometheus port; 0 disables it.")
