"""`dpe run` and `dpe spiral` on one machine (embedded broker unless Kafka is configured).

`dpe run` brings the bus up (broker, topics) and shows its health. `dpe spiral` drives the whole
spiral; until it completes rounds end to end it is separate, and `dpe run` will become it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from dpe.bus.admin import ensure_topics, existing_topics
from dpe.cli import CliState, pass_state
from dpe.spiral.run import SpiralOptions, bus_for, run_spiral

console = Console()


@click.command()
@pass_state
def run(state: CliState) -> None:
    """Bring up the bus (embedded broker unless Kafka is configured) and its topics, and show health."""
    settings = state.settings
    with bus_for(settings, settings.home / "broker.log") as bootstrap:
        statuses = ensure_topics(settings, bootstrap)
        present = existing_topics(settings, bootstrap)
    table = Table("topic", "event", "partitions", "ready", title=f"dpe-stream bus at {bootstrap}")
    for status in statuses:
        table.add_row(status.name, status.spec.model.__name__, str(status.partitions),
                      "[green]yes[/]" if status.name in present else "[red]no[/]")
    console.print(table)
    if any(status.name not in present for status in statuses):
        sys.exit(1)


@click.command()
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Training rounds to run.")
@click.option("--forever", is_flag=True, help="Always on: keep training until Ctrl-C.")
@click.option("--strategy", default=None, help="Quota strategy (default: stream.quotas.strategy).")
@click.option("--budget", type=click.IntRange(min=1), default=None, help="Samples per round (default: config).")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--run-id", default=None, help="Folder name under --runs-dir (default: time + random).")
@click.option("--live/--no-live", default=True, show_default=True, help="Live table of the spiral.")
@click.option("--timeout", "timeout_s", type=float, default=1800.0, show_default=True, help="Give up after seconds.")
@pass_state
def spiral(state: CliState, rounds: int, forever: bool, strategy: str | None, budget: int | None, runs_dir: Path,
        run_id: str | None, live: bool, timeout_s: float) -> None:
    """Run the spiral: diagnose, plan, make samples, train, re-diagnose, for --rounds rounds."""
    state.overrides.setdefault("stream", {"quotas": {"strategy": strategy, "budget": budget}})
    options = SpiralOptions(rounds=None if forever else rounds, runs_dir=runs_dir, live=live,
                            timeout_s=None if forever else timeout_s,
                            **({"run_id": run_id} if run_id else {}))
    result = run_spiral(state.settings, options, console)
    table = Table("policy version", "held-out accuracy", "samples trained", title=f"run {options.run_id}")
    for record in result.rounds:
        accuracy = "  ".join(f"{cap} {acc:.2f}" for cap, acc in record.heldout_accuracy.items())
        table.add_row(str(record.policy_version), accuracy, str(record.samples_trained))
    console.print(table)
    console.print(f"{'completed' if result.completed else 'stopped'} in {result.seconds:.0f}s; "
                  f"report: {result.run_dir / 'report.html'}")
    if not result.completed and not forever:
        sys.exit(1)
