"""`dpe serve trainer`: the GRPO trainer service until SIGTERM / Ctrl-C.

Also runs on its own (``python -m trainer.cli``), reading settings from ``DPE_CONFIG`` and the
``DPE_*`` environment, which is how the supervisor and the fault tests start it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click

from dpe.cli import CliState
from dpe.config import Settings, load_settings
from trainer.service import RoundReport, base_model_folder, run_trainer


async def _serve(settings: Settings, max_rounds: int | None) -> list[RoundReport]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return await run_trainer(settings, stop, max_rounds=max_rounds)


@click.command("trainer")
@click.option("--base-model", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Model folder of policy version 0 (default: trainer.base_model).")
@click.option("--max-rounds", type=int, default=None,
              help="Stop after this many checkpoints (default: run until stopped).")
@click.pass_context
def trainer(ctx: click.Context, base_model: Path | None, max_rounds: int | None) -> None:
    """GRPO micro-rounds on accepted samples; each round ends in an announced checkpoint."""
    state = ctx.find_object(CliState)
    settings = state.settings if state is not None else load_settings()
    if base_model is not None:
        trainer_settings = settings.trainer.model_copy(update={"base_model": base_model})
        settings = settings.model_copy(update={"trainer": trainer_settings})
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(settings.log_level)
    try:
        base_model_folder(settings)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    reports = asyncio.run(_serve(settings, max_rounds))
    versions = [report.version for report in reports]
    click.echo(f"trainer stopped; wrote policy versions {versions}" if versions else "trainer stopped")


if __name__ == "__main__":
    trainer()
