"""Commands of the evaluator: ``dpe serve evaluator`` (the service) and ``dpe eval`` (one checkpoint, now).

The service runs until SIGINT or SIGTERM and exposes Prometheus metrics on ``evaluator.metrics_port``
(9102) unless ``metrics.port`` overrides it.

Example:
    >>> sorted(command.name for command in (eval_command, evaluator))
    ['eval', 'evaluator']
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import click
from rich.console import Console
from rich.table import Table

from dpe.bus.aio import AsyncPublisher
from dpe.command import CliState, pass_state
from dpe.events import EvalOutcome
from dpe.inference import PolicyVersions
from dpe.lifecycle import run_until_stopped, start_service
from dpe.policy.checkpoints import allowed_roots, latest_checkpoint
from dpe.policy.threads import cap_torch_threads
from producers.evaluator.outcomes import AccuracyRow
from producers.evaluator.service import SERVICE, Evaluator, publish_events, record_summary, serve_evaluator
from producers.evaluator.settings import EvaluatorConfig

console = Console()


@click.command("evaluator")
@pass_state
def evaluator(state: CliState) -> None:
    """Evaluate every new checkpoint on the diagnostic suites and publish one outcome per item."""
    settings = state.settings_as(EvaluatorConfig)
    cap_torch_threads(settings.evaluator.torch_threads)
    start_service(settings, settings.evaluator.metrics_port)
    run_until_stopped(lambda stop: serve_evaluator(settings, stop))


def accuracy_table(rows: Sequence[AccuracyRow]) -> Table:
    """The accuracy rows as a rich table."""
    table = Table("policy", "suite", "capability", "accuracy", "correct", "items", title="evaluation")
    for row in rows:
        table.add_row(str(row.policy_version), row.suite, row.capability, f"{row.accuracy:.3f}",
                      str(row.correct), str(row.total))
    return table


async def _publish(state: CliState, outcomes: Sequence[EvalOutcome]) -> None:
    async with AsyncPublisher(state.settings_as(EvaluatorConfig), producer_name=SERVICE) as publisher:
        await publish_events(publisher, outcomes)


@click.command("eval")
@click.option("--checkpoint", "uri", help="Checkpoint folder (default: the latest checkpoint on the bus).")
@click.option("--policy-version", type=click.IntRange(min=0), help="Version to record (required with --checkpoint).")
@click.option("--suite", "suites", multiple=True, help="Evaluate only this suite (repeatable; default: all).")
@click.option("--publish/--no-publish", default=True, show_default=True, help="Publish the outcomes to the bus.")
@pass_state
def eval_command(state: CliState, uri: str | None, policy_version: int | None, suites: tuple[str, ...],
                 publish: bool) -> None:
    """Evaluate a checkpoint now on the configured suites, print accuracy per capability, publish outcomes."""
    settings = state.settings_as(EvaluatorConfig)
    if uri is not None and policy_version is None:
        raise click.BadParameter("say which policy version the outcomes are for", param_hint="--policy-version")
    roots = None  # a folder given on the command line is the operator's own
    if uri is None:
        latest = asyncio.run(latest_checkpoint(settings, service=SERVICE))
        if latest is None:
            raise click.ClickException("no checkpoint on the bus yet; pass --checkpoint and --policy-version")
        uri, policy_version, roots = latest.uri, latest.policy_version, allowed_roots(settings)
    runner = Evaluator(settings.evaluator, settings.blob.limits,
                       versions=PolicyVersions(settings.inference, settings.placement, SERVICE))
    unknown = sorted(set(suites) - set(runner.suite_names))
    if unknown:
        raise click.BadParameter(f"unknown suites {unknown}; configured: {runner.suite_names}", param_hint="--suite")
    cap_torch_threads(settings.evaluator.torch_threads)
    outcomes = runner.evaluate(uri, policy_version, set(suites) or None, roots=roots)
    if publish:
        asyncio.run(_publish(state, outcomes))
    console.print(accuracy_table(record_summary(outcomes)))
    console.print(f"{len(outcomes)} outcomes" + (" published" if publish else " (not published)"))
