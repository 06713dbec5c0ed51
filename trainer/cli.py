"""`dpe serve trainer`: the GRPO trainer service until SIGTERM / Ctrl-C.

Also runs on its own (``python -m trainer.cli``), reading settings from ``DPE_CONFIG`` and the
``DPE_*`` environment, which is how the supervisor and the fault tests start it, and how
``--num-processes N`` starts its N ranks under accelerate's launcher.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import click

from dpe.command import CliState, pass_state
from dpe.broker import free_port
from dpe.config import child_env, with_overrides, write_config
from dpe.lifecycle import run_until_stopped, start_service
from trainer.distributed import launcher_command
from trainer.service import base_model_folder, run_trainer
from trainer.settings import TrainerConfig


@click.command("trainer")
@click.option("--base-model", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Model folder of policy version 0 (default: trainer.base_model).")
@click.option("--max-rounds", type=int, default=None,
              help="Stop after this many checkpoints (default: run until stopped).")
@click.option("--lora", type=click.IntRange(min=0), default=None, metavar="RANK",
              help="Train a LoRA adapter of this rank (0: every weight; default: trainer.lora.rank).")
@click.option("--num-processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train on this many processes of this machine (one per GPU) under accelerate's DeepSpeed "
              "launcher; rank 0 reads each round and shares it.")
@pass_state
def trainer(state: CliState, base_model: Path | None, max_rounds: int | None, lora: int | None,
            num_processes: int) -> None:
    """GRPO micro-rounds on accepted samples; each round ends in an announced checkpoint."""
    settings = with_overrides(state.settings_as(TrainerConfig),
                              {"trainer": {"base_model": base_model, "lora": {"rank": lora}}})
    try:
        base = base_model_folder(settings)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        _launch(with_overrides(settings, {"trainer": {"base_model": base}}), num_processes, max_rounds)
    start_service(settings, 0)  # metrics: served by run_trainer on the main rank only
    reports = run_until_stopped(lambda stop: run_trainer(settings, stop, max_rounds=max_rounds))
    versions = [report.version for report in reports]
    click.echo(f"trainer stopped; wrote policy versions {versions}" if versions else "trainer stopped")


def _launch(settings: TrainerConfig, num_processes: int, max_rounds: int | None) -> NoReturn:
    """Become accelerate's launcher of `num_processes` trainer processes, which read `settings` from a written
    config (secrets by environment); signals reach the launcher, which passes them on to every rank."""
    config = settings.home / "trainer" / "launch.yaml"
    write_config(settings, config)
    rounds = ["--max-rounds", str(max_rounds)] if max_rounds is not None else []
    command = launcher_command(settings.trainer, num_processes, free_port(), rounds)
    os.execvpe(command[0], command, child_env(config, settings))


if __name__ == "__main__":
    trainer()
