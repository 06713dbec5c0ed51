"""`dpe serve trainer`: the GRPO trainer service until SIGTERM / Ctrl-C.

Also runs on its own (``python -m trainer.cli``), reading settings from ``DPE_CONFIG`` and the
``DPE_*`` environment, which is how the supervisor and the fault tests start it.
"""

from __future__ import annotations

from pathlib import Path

import click

from dpe.command import CliState, pass_state
from dpe.config import with_overrides
from dpe.lifecycle import run_until_stopped, start_service
from trainer.service import base_model_folder, run_trainer
from trainer.settings import TrainerConfig


@click.command("trainer")
@click.option("--base-model", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Model folder of policy version 0 (default: trainer.base_model).")
@click.option("--max-rounds", type=int, default=None,
              help="Stop after this many checkpoints (default: run until stopped).")
@pass_state
def trainer(state: CliState, base_model: Path | None, max_rounds: int | None) -> None:
    """GRPO micro-rounds on accepted samples; each round ends in an announced checkpoint."""
    settings = with_overrides(state.settings_as(TrainerConfig), {"trainer": {"base_model": base_model}})
    try:
        base_model_folder(settings)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    start_service(settings, 0)  # metrics: served by run_trainer on the main rank only
    reports = run_until_stopped(lambda stop: run_trainer(settings, stop, max_rounds=max_rounds))
    versions = [report.version for report in reports]
    click.echo(f"trainer stopped; wrote policy versions {versions}" if versions else "trainer stopped")


if __name__ == "__main__":
    trainer()
