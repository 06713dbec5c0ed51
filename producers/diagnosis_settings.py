"""Settings of the diagnosis producers: the evaluator and the divergence auditor.

Pure configuration (no behaviour): `Settings.evaluator` and `Settings.auditor` in `dpe.config`
hold these, so they come from the same YAML file, ``DPE_EVALUATOR__*`` / ``DPE_AUDITOR__*``
environment variables and CLI flags as everything else. For instance, in the YAML file::

    evaluator:
      synthetic: {round_items: 140, heldout_items: 210}
      benchmarks:
        - name: mmstar
          path: /data/MMStar.tsv
          format: vlmeval_tsv
          categories: {coarse perception: natural_scene, math: math_formula}
          default_capability: mixed
          sample: 200
      judge: {base_url: "http://vllm:8000/v1", model: Qwen2.5-VL-7B-Instruct}
    auditor:
      sample_fraction: 0.2
      references:
        - {kind: oracle}
        - {kind: endpoint, name: qwen-7b, endpoint: {base_url: "http://vllm:8000/v1", model: Qwen2.5-VL-7B-Instruct}}

Example:
    >>> EvaluatorSettings().synthetic.heldout_suite
    'heldout'
    >>> AuditorSettings(references=[{"kind": "oracle"}, {"kind": "checkpoint", "name": "v0", "uri": "/ckpt/0"}]
    ...                 ).references[1].uri
    '/ckpt/0'
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from dpe.events import ID_PATTERN, AnswerType
from dpe.world.questions import CAPABILITIES

Skill = Literal["perception", "calculation", "reasoning"]
"""What a capability mostly exercises; decides the error type of a plain wrong answer."""

DPE_IMAGE_TYPES: tuple[str, ...] = (
    "geometric", "medical", "chart_graph", "text_dense", "diagram", "math_formula",
    "map", "natural_scene", "artistic", "everyday_object", "architectural", "mixed",
)
"""The reference DPE pipeline's 12 image-type categories, usable as capabilities for real benchmarks."""

KNOWN_CAPABILITIES: tuple[str, ...] = CAPABILITIES + DPE_IMAGE_TYPES

DEFAULT_SKILLS: dict[str, Skill] = {
    "counting": "perception",
    "color": "perception",
    "existence": "perception",
    "text_reading": "perception",
    "spatial": "reasoning",
    "chart": "calculation",
    "arithmetic": "calculation",
    "geometric": "reasoning",
    "chart_graph": "calculation",
    "math_formula": "calculation",
    "text_dense": "perception",
    "natural_scene": "perception",
    "everyday_object": "perception",
}

BenchmarkFormat = Literal["vlmeval_tsv", "pope_jsonl", "jsonl", "parquet"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointSettings(_Config):
    """An OpenAI-compatible chat endpoint (vLLM, OpenAI, `transformers serve`, ...)."""

    base_url: str = Field(min_length=1, description="e.g. http://vllm:8000/v1")
    model: str = Field(min_length=1)
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="Local servers accept any key.")
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(1, ge=0)
    max_tokens: int = Field(256, ge=1)
    max_concurrency: int = Field(4, ge=1, description="Requests in flight at once.")


class SyntheticSuites(_Config):
    """The synthetic world's suites: a fresh sample per policy version, and a fixed held-out suite.

    Both come from the world's diagnostic pool (seeds the training stream never uses) and are
    disjoint from each other by construction (`producers.evaluator_items`).
    """

    round_suite: str = Field("synthetic", pattern=ID_PATTERN)
    round_items: int = Field(140, ge=0, description="Items per policy version (0: no round suite).")
    heldout_suite: str = Field("heldout", pattern=ID_PATTERN)
    heldout_items: int = Field(210, ge=0, description="Fixed items, the same every version (0: none).")
    seed: int = Field(0, ge=0)
    capabilities: tuple[str, ...] = CAPABILITIES
    image_size: int = Field(64, ge=16, le=1024)

    @model_validator(mode="after")
    def _known(self) -> "SyntheticSuites":
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        if unknown or not self.capabilities:
            raise ValueError(f"synthetic capabilities must be a non-empty subset of {CAPABILITIES}; unknown: {unknown}")
        if self.round_suite == self.heldout_suite:
            raise ValueError("round_suite and heldout_suite must differ")
        return self


class BenchmarkSuite(_Config):
    """A local benchmark file (nothing is downloaded) and how its categories map to capabilities."""

    name: str = Field(pattern=ID_PATTERN, description="Suite name in the outcomes, e.g. 'mmstar'.")
    path: Path
    format: BenchmarkFormat
    categories: dict[str, str] = Field(
        default_factory=dict, description="Benchmark category -> capability (keys compared case-insensitively)."
    )
    default_capability: str | None = Field(None, description="For categories not in the mapping (else skipped).")
    sample: int | None = Field(None, ge=1, description="Items per policy version, drawn afresh (None: all).")
    seed: int = 0


class EvaluatorSettings(_Config):
    """What the evaluator evaluates each checkpoint on, and how it attributes failures."""

    synthetic: SyntheticSuites | None = Field(default_factory=SyntheticSuites)
    benchmarks: list[BenchmarkSuite] = Field(default_factory=list)
    capabilities: tuple[str, ...] = Field(KNOWN_CAPABILITIES, description="Capabilities outcomes may name.")
    skills: dict[str, Skill] = Field(default_factory=lambda: dict(DEFAULT_SKILLS))
    judge: EndpointSettings | None = Field(None, description="Attribute failures with a judge model; rules if unset.")
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(32, ge=1)
    torch_threads: int = Field(0, ge=0, description="0: torch's default.")
    group_id: str = "evaluator"
    metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus port (0: none; metrics.port overrides).")

    @model_validator(mode="after")
    def _mapped_capabilities_known(self) -> "EvaluatorSettings":
        names = [suite.name for suite in self.benchmarks]
        if self.synthetic is not None:
            names += [self.synthetic.round_suite, self.synthetic.heldout_suite]
        if len(set(names)) != len(names):
            raise ValueError(f"suite names must be unique, got {names}")
        for suite in self.benchmarks:
            targets = set(suite.categories.values()) | ({suite.default_capability} - {None})
            unknown = sorted(targets - set(self.capabilities))
            if unknown:
                raise ValueError(f"benchmark {suite.name} maps to unknown capabilities {unknown}")
        return self


class OracleReference(_Config):
    """The synthetic world's oracle: answers from scene metadata (a stand-in for a strong reference model)."""

    kind: Literal["oracle"] = "oracle"
    name: str = Field("oracle", pattern=ID_PATTERN)


class CheckpointReference(_Config):
    """Another local checkpoint folder as a reference model."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = Field(pattern=ID_PATTERN)
    uri: str = Field(min_length=1)


class EndpointReference(_Config):
    """A model behind an OpenAI-compatible endpoint as a reference."""

    kind: Literal["endpoint"] = "endpoint"
    name: str = Field(pattern=ID_PATTERN)
    endpoint: EndpointSettings


Reference = Annotated[OracleReference | CheckpointReference | EndpointReference, Field(discriminator="kind")]


class GenericProbe(_Config):
    """A probe question for images without scene metadata."""

    question: str = Field(min_length=1, max_length=500)
    answer_type: AnswerType
    capability: str
    options: tuple[str, ...] | None = None


DEFAULT_GENERIC_PROBES: tuple[GenericProbe, ...] = (
    GenericProbe(question="How many objects are in the image?", answer_type="number", capability="counting"),
    GenericProbe(question="Is there any text in the image?", answer_type="yes_no", capability="text_reading"),
    GenericProbe(question="What is the main colour of the image?", answer_type="text", capability="color"),
)


class AuditorSettings(_Config):
    """The divergence auditor: references, probes, counterfactual edits, consensus and rate limit.

    The target is always the latest checkpoint on the bus.
    """

    references: list[Reference] = Field(default_factory=lambda: [OracleReference()], min_length=1)
    sample_fraction: float = Field(0.25, ge=0.0, le=1.0, description="Share of unlabeled items audited.")
    probes_per_item: int = Field(3, ge=1)
    edits_per_item: int = Field(2, ge=0, description="Counterfactual edits asked about, per item.")
    min_consensus: float = Field(0.6, gt=0.0, le=1.0, description="Share of references that must agree.")
    min_agreeing: int = Field(1, ge=1, description="References that must give the consensus answer.")
    generic_probes: tuple[GenericProbe, ...] = DEFAULT_GENERIC_PROBES
    capabilities: tuple[str, ...] = KNOWN_CAPABILITIES
    max_new_tokens: int = Field(24, ge=1)
    torch_threads: int = Field(1, ge=0, description="Few threads, so auditing never starves the CPU.")
    group_id: str = "auditor"
    metrics_port: int = Field(9103, ge=0, le=65535, description="Prometheus port (0: none; metrics.port overrides).")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "AuditorSettings":
        names = [reference.name for reference in self.references]
        if len(set(names)) != len(names):
            raise ValueError(f"reference names must be unique, got {names}")
        unknown = sorted({probe.capability for probe in self.generic_probes} - set(self.capabilities))
        if unknown:
            raise ValueError(f"generic probes name unknown capabilities {unknown}")
        return self
