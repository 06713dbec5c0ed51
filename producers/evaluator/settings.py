"""Settings of the evaluator (`dpe serve evaluator`, `dpe eval`): the ``evaluator`` section.

Pure configuration (no behaviour): `EvaluatorConfig` is what the evaluator reads, the core settings
plus this section, from the same YAML file, ``DPE_EVALUATOR__*`` environment variables and CLI flags
as everything else. The capabilities outcomes may name are the deployment's taxonomy, the top-level
``capabilities``: a benchmark's categories map into it, and the synthetic suites cover the world's
capabilities it lists. For instance, in the YAML file::

    capabilities: [counting, color, natural_scene, math_formula, mixed]
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

Example:
    >>> EvaluatorSettings().synthetic.heldout_suite
    'heldout'
    >>> EvaluatorConfig().evaluator.metrics_port
    9102
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dpe.config import CoreSettings, derived, following, set_derived, world_capabilities
from dpe.endpoint.settings import EndpointSettings
from dpe.events import ID_PATTERN
from dpe.policy.config import DEFAULT_LEVELS
from dpe.section import Section
from dpe.world.knobs import DIFFICULTY_LEVELS
from dpe.world.questions import CAPABILITIES

Skill = Literal["perception", "calculation", "reasoning"]
"""What a capability mostly exercises; decides the error type of a plain wrong answer."""

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


class SyntheticSuites(Section):
    """The synthetic world's suites: a fresh sample per policy version, and a fixed held-out suite.

    Both come from the world's diagnostic pool (seeds the training stream never uses) and are
    disjoint from each other by construction (`producers.evaluator.items`).
    """

    round_suite: str = Field("synthetic", pattern=ID_PATTERN)
    round_items: int = Field(140, ge=0, description="Items per policy version (0: no round suite).")
    heldout_suite: str = Field("heldout", pattern=ID_PATTERN)
    heldout_items: int = Field(210, ge=0, description="Fixed items, the same every version (0: none).")
    seed: int = Field(0, ge=0)
    capabilities: tuple[str, ...] = CAPABILITIES
    levels: tuple[int, ...] = Field(
        DEFAULT_LEVELS, description="Difficulty levels of both suites' items, in turn (default: the default base's)."
    )
    image_size: int = Field(64, ge=16, le=1024)

    @model_validator(mode="after")
    def _known(self) -> "SyntheticSuites":
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        if unknown or not self.capabilities:
            raise ValueError(f"synthetic capabilities must be a non-empty subset of {CAPABILITIES}; unknown: {unknown}")
        if not self.levels or set(self.levels) - set(DIFFICULTY_LEVELS):
            raise ValueError(f"synthetic levels must be a non-empty subset of {DIFFICULTY_LEVELS}, got {self.levels}")
        if self.round_suite == self.heldout_suite:
            raise ValueError("round_suite and heldout_suite must differ")
        return self


class BenchmarkSuite(Section):
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


class EvaluatorSettings(Section):
    """What the evaluator evaluates each checkpoint on, and how it attributes failures."""

    synthetic: SyntheticSuites | None = Field(default_factory=SyntheticSuites)
    benchmarks: list[BenchmarkSuite] = Field(default_factory=list)
    capabilities: tuple[str, ...] = Field(
        default_factory=world_capabilities,
        description="Capabilities outcomes may name (in a deployment: the top-level capabilities).",
    )
    skills: dict[str, Skill] = Field(default_factory=lambda: dict(DEFAULT_SKILLS))
    judge: EndpointSettings | None = Field(None, description="Attribute failures with a judge model; rules if unset.")
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(32, ge=1)
    torch_threads: int = Field(0, ge=0, description="0: torch's default.")
    group_id: str = "evaluator"
    metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus port (0: none; metrics.port overrides).")

    @model_validator(mode="after")
    def _unique_suites(self) -> "EvaluatorSettings":
        names = [suite.name for suite in self.benchmarks]
        if self.synthetic is not None:
            names += [self.synthetic.round_suite, self.synthetic.heldout_suite]
        if len(set(names)) != len(names):
            raise ValueError(f"suite names must be unique, got {names}")
        return self

    def mapped_outside(self) -> dict[str, list[str]]:
        """Per benchmark, the capabilities its categories map to that are not in `capabilities`.

        >>> suite = {"name": "b", "path": "b.tsv", "format": "vlmeval_tsv", "categories": {"math": "math_formula"}}
        >>> EvaluatorSettings(benchmarks=[suite]).mapped_outside()
        {'b': ['math_formula']}
        """
        outside = {}
        for suite in self.benchmarks:
            targets = set(suite.categories.values()) | ({suite.default_capability} - {None})
            if unknown := sorted(targets - set(self.capabilities)):
                outside[suite.name] = unknown
        return outside


class EvaluatorConfig(CoreSettings):
    """What the evaluator reads: the core settings and its own section."""

    evaluator: EvaluatorSettings = Field(default_factory=EvaluatorSettings)

    @model_validator(mode="after")
    def _evaluator_follows_capabilities(self) -> "EvaluatorConfig":
        section = following(self.evaluator, "evaluator", "capabilities", self.capabilities)
        for name, unknown in section.mapped_outside().items():
            raise ValueError(f"benchmark {name} maps categories to {unknown}, which are not in capabilities "
                             f"{list(self.capabilities)}: add them there (or map the categories elsewhere)")
        synthetic = section.synthetic
        if synthetic is not None:
            synthetic = _synthetic_within(synthetic, self.capabilities, by_hand="synthetic" in section.model_fields_set)
        set_derived(self, "evaluator", derived(section, synthetic=synthetic))
        return self


def _synthetic_within(synthetic: SyntheticSuites, capabilities: tuple[str, ...],
                      by_hand: bool) -> SyntheticSuites | None:
    """The synthetic suites over the world's capabilities in the taxonomy, or those named by hand (checked);
    None, no synthetic suites, for a taxonomy without world capabilities unless the suites were configured.

    >>> _synthetic_within(SyntheticSuites(), ("chart_graph", "color"), by_hand=False).capabilities
    ('color',)
    >>> _synthetic_within(SyntheticSuites(), ("chart_graph",), by_hand=False) is None
    True
    """
    if "capabilities" in synthetic.model_fields_set:
        if outside := sorted(set(synthetic.capabilities) - set(capabilities)):
            raise ValueError(f"evaluator.synthetic.capabilities {outside} are not in capabilities {list(capabilities)}")
        return synthetic
    shared = tuple(name for name in capabilities if name in CAPABILITIES)
    if not shared and by_hand:
        raise ValueError(f"none of capabilities {list(capabilities)} is the synthetic world's ({list(CAPABILITIES)}): "
                         "set evaluator.synthetic to null, or add world capabilities")
    if not shared:
        return None
    return derived(synthetic, capabilities=shared)
