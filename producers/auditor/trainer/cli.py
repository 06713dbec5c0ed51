"""``dpe serve auditor-trainer``: the auditor model trained by the trainer's own loop, until SIGTERM / Ctrl-C.

The trainer's round loop runs the auditor's task (`service.AuditorTraining`) with the ``auditor_trainer`` section as
its settings: consumer group ``auditor-trainer``, checkpoints in ``<home>/auditor-checkpoints``, metrics on 9108.

Example:
    >>> auditor_trainer.name
    'auditor-trainer'
"""

from __future__ import annotations

import click

from dpe.command import CliState, pass_state
from dpe.lifecycle import run_until_stopped, start_service
from producers.auditor.trainer.service import train_auditor
from producers.auditor.trainer.settings import AuditorTrainerConfig


@click.command("auditor-trainer")
@click.option("--max-rounds", type=int, default=None,
              help="Stop after this many checkpoints (default: run until stopped).")
@pass_state
def auditor_trainer(state: CliState, max_rounds: int | None) -> None:
    """GRPO micro-rounds of the auditor model on unlabeled images, rewarded by the newest policy's divergences."""
    settings = state.settings_as(AuditorTrainerConfig)
    start_service(settings, 0)  # metrics: served by run_trainer on auditor_trainer.metrics_port
    reports = run_until_stopped(lambda stop: train_auditor(settings, stop, max_rounds))
    versions = [report.version for report in reports]
    click.echo(f"auditor trainer stopped; wrote auditor versions {versions}" if versions else "auditor trainer stopped")
