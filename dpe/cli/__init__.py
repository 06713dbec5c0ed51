"""The `dpe` command.

Global options build one `Settings` (YAML file < DPE_* environment < flags); subcommands read it
from the click context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import click

from dpe.config import Settings, load_settings


@dataclass
class CliState:
    """Global flags, turned into settings on first use."""

    config_file: str | None
    overrides: dict[str, Any]
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_file, self.overrides)
        return self._settings


pass_state = click.make_pass_decorator(CliState)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    state = CliState(config_file, overrides)
    ctx.obj = state
    logging.basicConfig(level=log_level or "WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.group()
def serve() -> None:
    """Run one service of the pipeline (each is its own process in production)."""


def _register() -> None:
    from dpe.cli import bus, run

    for command in (bus.broker, bus.topics, bus.tail, bus.publish, bus.doctor, run.run):
        main.add_command(command)


_register()
