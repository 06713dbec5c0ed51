"""The spiral's stages: each service's command, package, topics in and out, metrics port and tests.

This registry is where the ``dpe`` command finds its service commands (`SERVICE_COMMANDS`) and what
the README's stage table is made from (``dpe stages`` prints it; a test fails when the README's copy
or a stage's declared topics drift from the code). Every stage also dead-letters what
it cannot handle to ``dpe.deadletter``.

Example:
    >>> SERVICE_COMMANDS["agents"]
    'consumers.agents.cli:agents'
    >>> STAGES[0].invocation
    'dpe ingest'
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Stage:
    """One service of the spiral, as the README's stage table shows it."""

    name: str
    command: str
    """Its click command, as ``module:attribute``."""
    serve: bool
    """Run as ``dpe serve NAME`` (True) or as the top-level ``dpe NAME`` (False)."""
    consumes: tuple[str, ...]
    """Topic ids (`dpe.topics.TOPICS`) it reads."""
    produces: tuple[str, ...]
    """Topic ids it writes (besides dead letters)."""

    @property
    def package(self) -> str:
        """The service's package: its command's module without ``.cli``."""
        return self.command.partition(":")[0].removesuffix(".cli")

    @property
    def invocation(self) -> str:
        return f"dpe serve {self.name}" if self.serve else f"dpe {self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "producers.ingest.cli:ingest", False, (), ("unlabeled",)),
    Stage("evaluator", "producers.evaluator.cli:evaluator", True, ("checkpoints",), ("eval_outcomes", "diagnosis")),
    Stage("auditor", "producers.auditor.cli:auditor", True, ("unlabeled", "checkpoints", "audit_checkpoints"),
          ("audit_divergences", "audit_leads", "audit_failure_types")),
    Stage("weakness", "streams.cli:weakness", True, ("eval_outcomes", "audit_divergences"), ("weakness", "quotas")),
    Stage("agents", "consumers.agents.cli:agents", True,
          ("quotas", "diagnosis", "audit_failure_types", "unlabeled", "audit_leads", "checkpoints"),
          ("samples_accepted", "samples_rejected")),
    Stage("trainer", "trainer.cli:trainer", True, ("samples_accepted", "checkpoints"), ("checkpoints",)),
    Stage("policy", "consumers.policy.cli:policy", True, ("checkpoints",), ()),
    Stage("auditor-trainer", "producers.auditor.trainer.cli:auditor_trainer", True, ("unlabeled", "checkpoints"),
          ("audit_checkpoints",)),
)

SERVICE_COMMANDS: dict[str, str] = {stage.name: stage.command for stage in STAGES if stage.serve}
"""``dpe serve NAME`` -> its command."""


def metrics_port(stage: Stage) -> int:
    """The stage's default Prometheus port: its settings section's ``metrics_port``."""
    from dpe.settings import Settings, section_of

    return getattr(Settings(), section_of(stage.name)).metrics_port


def stage_tests(stage: Stage, tests: Path = ROOT / "tests") -> list[str]:
    """Test files that import from the stage's package."""
    found = []
    for path in sorted(tests.glob("test_*.py")):
        modules = {node.module for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and node.module}
        if any(module == stage.package or module.startswith(stage.package + ".") for module in modules):
            found.append(path.name)
    return found


def stage_table() -> str:
    """The README's stage table (Markdown)."""
    from dpe.topics import TOPICS

    def topics(ids: tuple[str, ...]) -> str:
        return ", ".join(f"`{TOPICS[topic_id].name('dpe.')}`" for topic_id in ids) or "—"

    lines = ["| stage | command | package | consumes | produces | metrics port | tests |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for stage in STAGES:
        tests = ", ".join(f"`{name}`" for name in stage_tests(stage))
        lines.append(f"| {stage.name} | `{stage.invocation}` | `{stage.package.replace('.', '/')}/` | "
                     f"{topics(stage.consumes)} | {topics(stage.produces)} | {metrics_port(stage)} | {tests} |")
    return "\n".join(lines)


@click.command()
def stages() -> None:
    """Print the stage table: service, command, package, topics in and out, metrics port, tests."""
    click.echo(stage_table())
