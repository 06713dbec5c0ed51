"""``dpe serve auditor``: the divergence auditor until SIGINT or SIGTERM.

Metrics on ``auditor.metrics_port`` (9103) unless ``metrics.port`` overrides it.

Example:
    >>> auditor.name
    'auditor'
"""

from __future__ import annotations

import click

from dpe.command import CliState, pass_state
from dpe.lifecycle import run_until_stopped, start_service
from dpe.policy.threads import cap_torch_threads
from producers.auditor.service import serve_auditor
from producers.auditor.settings import AuditorConfig


@click.command("auditor")
@pass_state
def auditor(state: CliState) -> None:
    """Audit a share of unlabeled items by divergence between the target and reference models."""
    settings = state.settings_as(AuditorConfig)
    cap_torch_threads(settings.auditor.torch_threads)
    start_service(settings, settings.auditor.metrics_port)
    run_until_stopped(lambda stop: serve_auditor(settings, stop))
