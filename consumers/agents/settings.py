"""Settings of the agent crew (`dpe serve agents`), the ``agents`` section.

`AgentsConfig` is what the agents read: the core settings plus this section.

Example:
    >>> s = AgentSettings(backends={"writer": "llm"}, qc={"difficulty": {"enabled": True}})
    >>> s.backends.writer, s.backends.planner, s.qc.difficulty.samples
    ('llm', 'pixels', 9)
    >>> s.llm.model, s.llm.temperature, AgentSettings(llm={"model": "qwen"}).llm.temperature
    ('dpe-tiny', 0.2, 0.2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from consumers.qc.settings import QCSettings
from dpe.config import CoreSettings
from dpe.endpoint.settings import EndpointSettings
from dpe.section import Section
from dpe.world import CAPABILITIES

Backend = Literal["pixels", "llm", "programmatic"]
"""Who plays a role: tools that read the pixels (`consumers.agents.pixels`, the default), a model behind an
OpenAI-compatible endpoint, or the benchmarks' fast path that reads the synthetic world's answer key from
the items' metadata (`consumers.agents.programmatic`; only where ingest keeps the metadata)."""


class RoleBackends(Section):
    """Which backend plays each role. The retriever is always code; this picks its search backend
    (``embedding`` reads the pixels, ``metadata`` the items' metadata and text)."""

    planner: Backend = "pixels"
    writer: Backend = "pixels"
    validator: Backend = "pixels"
    answerer: Backend = "pixels"
    retriever: Literal["metadata", "embedding"] = "embedding"


class PixelToolchains(Section):
    """Which `dpe.perception` toolchain the pixel roles read with: the planner and writer with one, the
    validator and the independent answerer with the other, so that their agreement is evidence."""

    writer: Literal["regions", "contours"] = "regions"
    checker: Literal["regions", "contours"] = "contours"
    processes: int = Field(
        default=2, ge=0,
        description="Worker processes the pixel roles read images in (`dpe.perception.pool`): the readers hold "
        "Python's lock, so threads of one process read one image at a time. 0 reads in the agent's own threads.",
    )

    @model_validator(mode="after")
    def _independent(self) -> "PixelToolchains":
        if self.writer == self.checker:
            raise ValueError(f"the writer and the checker must read with different toolchains, both are {self.writer!r}")
        return self


WORLD_QUESTIONS: dict[str, tuple[str, ...]] = {
    **{capability: (capability,) for capability in CAPABILITIES},
    "geometric": ("counting", "color", "existence", "spatial"),
    "chart_graph": ("chart",),
    "text_dense": ("text_reading",),
    "math_formula": ("arithmetic",),
}
"""The world's question types that serve each capability: its own seven ask themselves; of DPE's image types,
those its images show (`dpe.taxonomy.DPE_IMAGE_TYPES`: shapes, bar charts, text, formulas)."""


AGENT_ENDPOINT: dict[str, Any] = {
    "base_url": "http://127.0.0.1:8000/v1", "model": "dpe-tiny", "temperature": 0.2, "max_retries": 3, "concurrency": 8,
}
"""The agents' endpoint defaults where they differ from `EndpointSettings`' own: the local server, sampling."""


class AgentSettings(Section):
    """The agent crew: backends, LLM endpoint, QC and pacing."""

    group_id: str = "dpe-agents"
    backends: RoleBackends = Field(default_factory=RoleBackends)
    toolchains: PixelToolchains = Field(default_factory=PixelToolchains)
    llm: EndpointSettings = Field(
        default_factory=lambda: EndpointSettings(**AGENT_ENDPOINT),
        description="The endpoint behind `llm` roles. Unlike `EndpointSettings`' defaults, the agents default to "
        "the local server (http://127.0.0.1:8000/v1, dpe-tiny), temperature 0.2, 3 retries and 8 requests in "
        "flight per worker; keys an override leaves out keep these.",
    )
    checker_llm: EndpointSettings | None = Field(
        None,
        description="The endpoint behind `llm` validator and answerer roles: another model (or server) than `llm`, so "
        "that a sample is accepted only when two models agree. Required when the writer is an `llm` role too; "
        "otherwise they use `llm`, which is then independent of the (pixel or fast-path) writer. Keys left out take "
        "the agents' endpoint defaults, as for `llm`.",
    )
    qc: QCSettings = Field(default_factory=QCSettings)
    attempts_per_item: int = Field(default=3, ge=1, description="Candidates per item and capability (1 + retries).")
    samples_per_item: int = Field(default=1, ge=1, description="Capabilities one item may serve.")
    edit_rate: float = Field(default=0.25, ge=0, le=1, description="Share of pixel and programmatic plans that edit the image.")
    concurrency: int = Field(
        default=16, ge=1,
        description="Items in flight per worker, at most `batch_size` (the items fetched at once). With the difficulty "
        "band on, at least its `batch_size` are: each waits on the band's rollouts, so a full band batch in flight "
        "keeps its batches full (16 gave 25-30 accepted/s on 2 cores, 64 gave 38). LLM requests have their own "
        "bound (`llm.concurrency`).",
    )
    batch_size: int = Field(default=64, ge=1, description="Unlabeled records fetched at once.")
    retrieval_pool: int = Field(default=256, ge=1, description="Recent images the retriever searches.")
    questions: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: dict(WORLD_QUESTIONS),
        description="For the pixel and fast-path roles, which of the synthetic world's question types they may write "
        "for each capability of the taxonomy; a capability left out gets no samples from them (endpoint roles write "
        "for any).",
    )
    metrics_port: int = Field(default=9104, ge=0, le=65535, description="Prometheus port; 0 disables it.")

    @field_validator("questions")
    @classmethod
    def _world_question_types(cls, questions: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for capability, types in questions.items():
            unknown = set(types) - set(CAPABILITIES)
            if not types or unknown:
                raise ValueError(f"agents.questions[{capability!r}] must list question types of the synthetic world "
                                 f"{list(CAPABILITIES)}, got {list(types)}")
        return questions

    @field_validator("llm", "checker_llm", mode="before")
    @classmethod
    def _agent_endpoint_defaults(cls, value: Any) -> Any:
        """An override of an endpoint laid over the agents' defaults, not over `EndpointSettings`' own."""
        return AGENT_ENDPOINT | value if isinstance(value, Mapping) else value

    @model_validator(mode="after")
    def _independent_checkers(self) -> "AgentSettings":
        backends = self.backends
        if backends.writer != "llm" or "llm" not in (backends.validator, backends.answerer):
            return self
        if self.checker_llm is None:
            raise ValueError("an llm writer checked by llm roles needs agents.checker_llm, another model than "
                             "agents.llm: one model agreeing with itself is no check")
        if (self.checker_llm.base_url, self.checker_llm.model) == (self.llm.base_url, self.llm.model):
            raise ValueError(f"agents.checker_llm is the writer's own model ({self.llm.model} at {self.llm.base_url}): "
                             "name another model or server")
        return self

    def checker_endpoint(self) -> EndpointSettings:
        """The endpoint of `llm` validator and answerer roles: `checker_llm`, else `llm`."""
        return self.checker_llm or self.llm


class AgentsConfig(CoreSettings):
    """What the agent crew reads: the core settings and its own section."""

    agents: AgentSettings = Field(default_factory=AgentSettings)

    def served_questions(self) -> dict[str, tuple[str, ...]]:
        """`agents.questions` for the taxonomy's capabilities only: what the pixel and fast-path planners write for.

        Example:
            >>> sorted(AgentsConfig(capabilities=["geometric", "medical"]).served_questions())
            ['geometric']
        """
        return {name: self.agents.questions[name] for name in self.capabilities if name in self.agents.questions}
