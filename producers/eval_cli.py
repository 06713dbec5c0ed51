"""Commands of the diagnosis producers: ``dpe eval``, ``dpe serve evaluator``, ``dpe serve auditor``.

Register them on the ``dpe`` group (`eval_command`) and on its ``serve`` group (`evaluator`,
`auditor`). Services run until SIGINT or SIGTERM and expose Prometheus metrics (``evaluator.metrics_port``
9102, ``auditor.metrics_port`` 9103, unless ``metrics.port`` overrides them).

Example:
    >>> sorted(command.name for command in (eval_command, evaluator, auditor))
    ['auditor', 'eval', 'evaluator']
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import click
import torch
from rich.console import Console
from rich.table import Table

from dpe.broker import BrokerError
from dpe.bus.aio import AsyncPublisher
from dpe.cli import CliState, pass_state
from dpe.config import Settings
from dpe.events import EvalOutcome
from monitoring.metrics import serve_metrics
from producers.auditor import serve_auditor
from producers.diagnosis_checkpoints import latest_checkpoint
from producers.evaluator import SERVICE, Evaluator, publish_outcomes, record_summary, serve_evaluator
from producers.evaluator_outcomes import AccuracyRow

console = Console()


def run_service(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` in a fresh event loop; SIGINT and SIGTERM set `stop`."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await main(stop)

    asyncio.run(runner())


def cap_torch_threads(threads: int) -> None:
    """Cap torch's intra-op threads (0 keeps torch's default), so a service leaves CPU to the others."""
    if threads:
        torch.set_num_threads(threads)


def prepare_service(settings: Settings, threads: int, service_port: int) -> None:
    """Cap torch's threads, log at the configured level, expose metrics."""
    cap_torch_threads(threads)
    logging.getLogger("producers").setLevel(settings.log_level)
    serve_metrics(settings.metrics.port_for(service_port), settings.metrics.addr)


@click.command("evaluator")
@pass_state
def evaluator(state: CliState) -> None:
    """Evaluate every new checkpoint on the diagnostic suites and publish one outcome per item."""
    settings = state.settings
    prepare_service(settings, settings.evaluator.torch_threads, settings.evaluator.metrics_port)
    run_service(lambda stop: serve_evaluator(settings, stop))


@click.command("auditor")
@pass_state
def auditor(state: CliState) -> None:
    """Audit a share of unlabeled items by divergence between the target and reference models."""
    settings = state.settings
    prepare_service(settings, settings.auditor.torch_threads, settings.auditor.metrics_port)
    run_service(lambda stop: serve_auditor(settings, stop))


def accuracy_table(rows: Sequence[AccuracyRow]) -> Table:
    """The accuracy rows as a rich table."""
    table = Table("policy", "suite", "capability", "accuracy", "correct", "items", title="evaluation")
    for row in rows:
        table.add_row(str(row.policy_version), row.suite, row.capability, f"{row.accuracy:.3f}",
                      str(row.correct), str(row.total))
    return table


async def _publish(state: CliState, outcomes: Sequence[EvalOutcome]) -> None:
    async with AsyncPublisher(state.settings, producer_name=SERVICE) as publisher:
        await publish_outcomes(publisher, outcomes)


@click.command("eval")
@click.option("--checkpoint", "uri", help="Checkpoint folder (default: the latest checkpoint on the bus).")
@click.option("--policy-version", type=click.IntRange(min=0), help="Version to record (required with --checkpoint).")
@click.option("--suite", "suites", multiple=True, help="Evaluate only this suite (repeatable; default: all).")
@click.option("--publish/--no-publish", default=True, show_default=True, help="Publish the outcomes to the bus.")
@pass_state
def eval_command(state: CliState, uri: str | None, policy_version: int | None, suites: tuple[str, ...],
                 publish: bool) -> None:
    """Evaluate a checkpoint now on the configured suites, print accuracy per capability, publish outcomes."""
    settings = state.settings
    if uri is not None and policy_version is None:
        raise click.BadParameter("say which policy version the outcomes are for", param_hint="--policy-version")
    if uri is None:
        try:
            latest = asyncio.run(latest_checkpoint(settings, service=SERVICE))
        except BrokerError as error:
            raise click.ClickException(str(error)) from None
        if latest is None:
            raise click.ClickException("no checkpoint on the bus yet; pass --checkpoint and --policy-version")
        uri, policy_version = latest.uri, latest.policy_version
    runner = Evaluator(settings.evaluator, settings.blob.limits)
    unknown = sorted(set(suites) - set(runner.suite_names))
    if unknown:
        raise click.BadParameter(f"unknown suites {unknown}; configured: {runner.suite_names}", param_hint="--suite")
    cap_torch_threads(settings.evaluator.torch_threads)
    outcomes = runner.evaluate(uri, policy_version, set(suites) or None)
    if publish:
        asyncio.run(_publish(state, outcomes))
    console.print(accuracy_table(record_summary(outcomes)))
    console.print(f"{len(outcomes)} outcomes" + (" published" if publish else " (not published)"))
