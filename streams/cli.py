"""``weakness``: the click command that runs one worker of the weakness stream (``dpe serve weakness``).

Example:
    $ dpe serve weakness --strategy learning_progress --budget 500 --metrics-port 9102
"""

from __future__ import annotations

import click

from dpe.config import load_settings
from streams.quotas import STRATEGIES
from streams.worker import run_worker


@click.command("weakness")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), envvar="DPE_CONFIG",
              help="YAML settings file (default: $DPE_CONFIG).")
@click.option("--strategy", type=click.Choice(sorted(STRATEGIES)), help="Quota strategy.")
@click.option("--budget", type=click.IntRange(min=0), help="Samples per round over all capabilities.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Prometheus port (0: none).")
def weakness(config_file: str | None, strategy: str | None, budget: int | None, metrics_port: int | None) -> None:
    """Rolling per-capability weakness from eval outcomes and divergences, and quota plans."""
    settings = load_settings(config_file, overrides={
        "stream": {"quotas": {"strategy": strategy, "budget": budget}, "metrics_port": metrics_port},
    })
    run_worker(settings)


if __name__ == "__main__":
    weakness()
