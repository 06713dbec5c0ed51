"""`dpe run`: the whole system on one machine, embedded broker by default."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import click
from rich.console import Console
from rich.table import Table

from dpe.broker import EmbeddedBroker
from dpe.bus.admin import ensure_topics, existing_topics
from dpe.cli import CliState, pass_state
from dpe.config import Settings

console = Console()


@contextlib.contextmanager
def bus_for(settings: Settings) -> Iterator[str]:
    """The configured external Kafka, or an embedded broker for the duration of the block."""
    if settings.kafka.bootstrap_servers:
        yield settings.kafka.bootstrap_servers
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(log_path=settings.home / "broker.log") as broker:
        yield broker.bootstrap_servers


@click.command()
@click.option("--forever", is_flag=True, help="Keep running until Ctrl-C.")
@pass_state
def run(state: CliState, forever: bool) -> None:
    """Bring up the bus (embedded broker unless Kafka is configured) and its topics, and show health."""
    settings = state.settings
    started = time.perf_counter()
    with bus_for(settings) as bootstrap:
        statuses = ensure_topics(settings, bootstrap)
        present = existing_topics(settings, bootstrap)
        table = Table("topic", "event", "partitions", "ready", title=f"dpe-stream bus at {bootstrap}")
        for status in statuses:
            table.add_row(status.name, status.spec.model.__name__, str(status.partitions),
                          "[green]yes[/]" if status.name in present else "[red]no[/]")
        console.print(table)
        console.print(f"ready in {time.perf_counter() - started:.1f}s")
        if forever:
            console.print("running; Ctrl-C stops")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
