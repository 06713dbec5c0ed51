"""``dpe serve weakness``: run one worker of the weakness stream (start several: they share the partitions).

Example:
    $ dpe --config dpe.yaml serve weakness --strategy learning_progress --budget 500 --metrics-port 9102
"""

from __future__ import annotations

import click

from dpe.command import CliState, pass_state
from dpe.config import with_overrides
from streams.service import run_worker
from streams.settings import StreamConfig
from streams.strategies import STRATEGIES


@click.command("weakness")
@click.option("--strategy", type=click.Choice(sorted(STRATEGIES)), help="Quota strategy (default stream.quotas).")
@click.option("--budget", type=click.IntRange(min=0), help="Samples per round over all capabilities.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Prometheus port (0: none).")
@pass_state
def weakness(state: CliState, strategy: str | None, budget: int | None, metrics_port: int | None) -> None:
    """Rolling per-capability weakness from eval outcomes and divergences, and quota plans."""
    flags = {"quotas": {"strategy": strategy, "budget": budget}, "metrics_port": metrics_port}
    run_worker(with_overrides(state.settings_as(StreamConfig), {"stream": flags}))
