"""The `dpe` command.

Global options build one `Settings` (YAML file < DPE_* environment < flags); subcommands read it
from the click context. Subcommands are imported only when used, so that `dpe tail` does not pay
for importing torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import click

from dpe.cli.stages import SERVICE_COMMANDS
from dpe.command import CliState


class LazyGroup(click.Group):
    """A click group whose subcommands are ``"module:attribute"`` paths imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, _, attribute = self.lazy[name].partition(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


COMMANDS = {
    "broker": "dpe.cli.bus:broker",
    "topics": "dpe.cli.bus:topics",
    "tail": "dpe.cli.bus:tail",
    "publish": "dpe.cli.bus:publish",
    "doctor": "dpe.cli.bus:doctor",
    "run": "dpe.cli.run:run",
    "experiment": "dpe.cli.run:experiment",
    "eval": "producers.evaluator.cli:eval_command",
    "ingest": "producers.ingest.cli:ingest",
    "model": "dpe.cli.model:model",
    "samples": "consumers.samples.cli:samples",
    "stages": "dpe.cli.stages:stages",
}



@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), envvar="DPE_CONFIG",
              help="YAML settings file (default: $DPE_CONFIG).")
@click.option("--bootstrap", help="External Kafka bootstrap servers (default: the embedded broker).")
@click.option("--topic-prefix", help="Prefix of every topic name (default 'dpe.').")
@click.option("--home", type=click.Path(file_okay=False), help="Working folder (default .dpe).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default=None)
@click.pass_context
def main(ctx: click.Context, config_file: str | None, bootstrap: str | None, topic_prefix: str | None,
         home: str | None, log_level: str | None) -> None:
    """dpe-stream: an always-on, event-driven continual trainer for vision-language models."""
    overrides = {"home": home, "log_level": log_level,
                 "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": topic_prefix}}
    ctx.obj = CliState(config_file, overrides)
    logging.basicConfig(level=log_level or "WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.group(cls=LazyGroup, lazy=SERVICE_COMMANDS)
def serve() -> None:
    """Run one service of the pipeline (each is its own process in production)."""
