"""Settings of the agent crew (`dpe serve agents`), the ``agents`` section.

`AgentsConfig` is what the agents read: the core settings plus this section.

Example:
    >>> s = AgentSettings(backends={"writer": "llm"}, qc={"difficulty": {"enabled": True}})
    >>> s.backends.writer, s.backends.planner, s.qc.difficulty.samples
    ('llm', 'programmatic', 9)
    >>> s.llm.model, s.llm.temperature, AgentSettings(llm={"model": "qwen"}).llm.temperature
    ('dpe-tiny', 0.2, 0.2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator

from consumers.qc.settings import QCSettings
from dpe.config import CoreSettings
from dpe.endpoint.settings import EndpointSettings
from dpe.section import Section

Backend = Literal["programmatic", "llm"]
"""A role is played by code (the synthetic world's metadata) or by an OpenAI-compatible model."""


class RoleBackends(Section):
    """Which backend plays each role. The retriever is always code; this picks its search backend."""

    planner: Backend = "programmatic"
    writer: Backend = "programmatic"
    validator: Backend = "programmatic"
    answerer: Backend = "programmatic"
    retriever: Literal["metadata", "embedding"] = "metadata"


AGENT_ENDPOINT: dict[str, Any] = {
    "base_url": "http://127.0.0.1:8000/v1", "model": "dpe-tiny", "temperature": 0.2, "max_retries": 3, "concurrency": 8,
}
"""The agents' endpoint defaults where they differ from `EndpointSettings`' own: the local server, sampling."""


class AgentSettings(Section):
    """The agent crew: backends, LLM endpoint, QC and pacing."""

    group_id: str = "dpe-agents"
    backends: RoleBackends = Field(default_factory=RoleBackends)
    llm: EndpointSettings = Field(
        default_factory=lambda: EndpointSettings(**AGENT_ENDPOINT),
        description="The endpoint behind `llm` roles. Unlike `EndpointSettings`' defaults, the agents default to "
        "the local server (http://127.0.0.1:8000/v1, dpe-tiny), temperature 0.2, 3 retries and 8 requests in "
        "flight per worker; keys an override leaves out keep these.",
    )
    qc: QCSettings = Field(default_factory=QCSettings)
    attempts_per_item: int = Field(default=3, ge=1, description="Candidates per item and capability (1 + retries).")
    samples_per_item: int = Field(default=1, ge=1, description="Capabilities one item may serve.")
    edit_rate: float = Field(default=0.25, ge=0, le=1, description="Share of programmatic plans that edit the image.")
    concurrency: int = Field(default=16, ge=1, description="Items in flight per worker.")
    batch_size: int = Field(default=64, ge=1, description="Unlabeled records fetched at once.")
    retrieval_pool: int = Field(default=256, ge=1, description="Recent images the retriever searches.")
    metrics_port: int = Field(default=9104, ge=0, le=65535, description="Prometheus port; 0 disables it.")

    @field_validator("llm", mode="before")
    @classmethod
    def _agent_endpoint_defaults(cls, value: Any) -> Any:
        """An override of ``llm`` laid over the agents' defaults, not over `EndpointSettings`' own."""
        return AGENT_ENDPOINT | value if isinstance(value, Mapping) else value


class AgentsConfig(CoreSettings):
    """What the agent crew reads: the core settings and its own section."""

    agents: AgentSettings = Field(default_factory=AgentSettings)
