"""Settings of the divergence auditor (`dpe serve auditor`): the ``auditor`` section.

`AuditorConfig` is what the auditor reads: the core settings plus this section. In the YAML file::

    auditor:
      sample_fraction: 0.2
      references:
        - {kind: toolchain, name: regions, toolchain: regions}
        - {kind: endpoint, name: qwen-7b, endpoint: {base_url: "http://vllm:8000/v1", model: Qwen2.5-VL-7B-Instruct}}

Example:
    >>> AuditorSettings(references=[{"kind": "toolchain", "name": "regions", "toolchain": "regions"},
    ...                              {"kind": "checkpoint", "name": "v0", "uri": "/ckpt/0"}]).references[1].uri
    '/ckpt/0'
    >>> [reference.name for reference in AuditorSettings().references]
    ['regions', 'contours']
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from dpe.config import CoreSettings, derived, following, set_derived, world_capabilities
from dpe.endpoint.settings import EndpointSettings
from dpe.events import ID_PATTERN, AnswerType
from dpe.section import Section


class ToolchainReference(Section):
    """A `dpe.perception` toolchain that reads the pixels and answers the world's questions about what it saw
    (the default references on CPU: two toolchains that share no code stand in for two strong models)."""

    kind: Literal["toolchain"] = "toolchain"
    name: str = Field(pattern=ID_PATTERN)
    toolchain: Literal["regions", "contours"]


class CheckpointReference(Section):
    """Another local checkpoint folder as a reference model."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = Field(pattern=ID_PATTERN)
    uri: str = Field(min_length=1)


class EndpointReference(Section):
    """A model behind an OpenAI-compatible endpoint as a reference."""

    kind: Literal["endpoint"] = "endpoint"
    name: str = Field(pattern=ID_PATTERN)
    endpoint: EndpointSettings


Reference = Annotated[ToolchainReference | CheckpointReference | EndpointReference,
                      Field(discriminator="kind")]

DEFAULT_REFERENCES: tuple[ToolchainReference, ...] = (
    ToolchainReference(name="regions", toolchain="regions"),
    ToolchainReference(name="contours", toolchain="contours"),
)


class GenericProbe(Section):
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


class LeadSettings(Section):
    """Rectification (AuditDM): which divergences go to the agents as training leads (`AuditLead`), the references'
    consensus as the label. They pass the agents' QC chain and fill the quota plan like the agents' own samples."""

    enabled: bool = True
    min_strength: float = Field(1.0, gt=0.0, le=1.0, description="Share of answering references that must agree.")
    min_agreeing: int = Field(2, ge=1, description="References that must give the consensus answer.")


HOME = "auditor-trainer"
"""The auditor trainer's folder under ``home`` (its version 0 is ``base`` in it)."""
CHECKPOINTS = "auditor-checkpoints"
"""Its checkpoint folder under ``home`` unless ``auditor_trainer.checkpoints.folder`` says otherwise."""


def auditor_model_roots(settings: CoreSettings) -> tuple[Path, ...]:
    """The folders an announced auditor model may be loaded from: the auditor trainer's, and ``checkpoint_roots``
    (where a configured ``auditor_trainer.checkpoints.folder`` must be).

    Example:
        >>> [str(root) for root in auditor_model_roots(CoreSettings(home="/d", checkpoint_roots=["/m"]))]
        ['/d/auditor-checkpoints', '/d/auditor-trainer', '/m']
    """
    return settings.home / CHECKPOINTS, settings.home / HOME, *settings.checkpoint_roots


class AuditorSettings(Section):
    """The divergence auditor: references, probes, counterfactual edits, consensus and rate limit.

    The target is always the latest checkpoint on the bus.
    """

    references: list[Reference] = Field(default_factory=lambda: list(DEFAULT_REFERENCES), min_length=1)
    probe_writer: Literal["regions", "contours"] = Field(
        "regions", description="The toolchain whose reading of the pixels the probes are written from.",
    )
    sample_fraction: float = Field(0.25, ge=0.0, le=1.0, description="Share of unlabeled items audited.")
    probes_per_item: int = Field(3, ge=1)
    edits_per_item: int = Field(2, ge=0, description="Counterfactual edits asked about, per item.")
    model_probes: int = Field(2, ge=0, description="More probes per item, chosen by the newest trained auditor "
                              "model (`dpe serve auditor-trainer`) once one is announced: its best ranked of the menu.")
    min_consensus: float = Field(0.6, gt=0.0, le=1.0, description="Share of references that must agree.")
    min_agreeing: int = Field(1, ge=1, description="References that must give the consensus answer.")
    leads: LeadSettings = Field(default_factory=LeadSettings)
    failure_types_every_s: float = Field(5.0, ge=0.0, description="Publish the failure-type tally at most this often.")
    generic_probes: tuple[GenericProbe, ...] = DEFAULT_GENERIC_PROBES
    capabilities: tuple[str, ...] = Field(
        default_factory=world_capabilities,
        description="Capabilities probes and items may name (in a deployment: the top-level capabilities).",
    )
    max_new_tokens: int = Field(24, ge=1)
    torch_threads: int = Field(1, ge=0, description="Few threads, so auditing never starves the CPU.")
    group_id: str = "auditor"
    metrics_port: int = Field(9103, ge=0, le=65535, description="Prometheus port (0: none; metrics.port overrides).")
    seed: int = 0

    @model_validator(mode="after")
    def _unique_references(self) -> "AuditorSettings":
        names = [reference.name for reference in self.references]
        if len(set(names)) != len(names):
            raise ValueError(f"reference names must be unique, got {names}")
        return self


class AuditorConfig(CoreSettings):
    """What the auditor reads: the core settings and its own section."""

    auditor: AuditorSettings = Field(default_factory=AuditorSettings)

    @model_validator(mode="after")
    def _auditor_follows_capabilities(self) -> "AuditorConfig":
        section = following(self.auditor, "auditor", "capabilities", self.capabilities)
        probes = section.generic_probes
        if "generic_probes" not in section.model_fields_set:
            probes = tuple(probe for probe in probes if probe.capability in self.capabilities)
        elif unknown := sorted({probe.capability for probe in probes} - set(self.capabilities)):
            raise ValueError(f"auditor.generic_probes name {unknown}, which are not in capabilities "
                             f"{list(self.capabilities)}")
        set_derived(self, "auditor", derived(section, generic_probes=probes))
        return self
