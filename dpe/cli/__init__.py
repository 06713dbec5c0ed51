"""The `dpe` command.

Global options build one `Settings` (YAML file < DPE_* environment < flags); subcommands read it
from the click context. Subcommands are imported only when used, so that `dpe tail` does not pay
for importing torch.

A user's mistake (a missing file, a bad setting, no broker, an unreadable benchmark file) ends any
command with one line saying what and where, and exit code 1 (`user_error`); any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from itertools import takewhile
from typing import Any

import click

from dpe.cli.stages import SERVICE_COMMANDS
from dpe.command import CliState
from dpe.config import CoreSettings, mask_userinfo
from dpe.lifecycle import configure_logging


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


def _missing_file(error: OSError) -> str:
    """``nope.yaml: No such file or directory``."""
    return f"{error.filename}: {error.strerror}" if error.filename else str(error)


def _bad_setting(error: Any) -> str | None:
    """Which setting is wrong and why, for a pydantic ``ValidationError`` of a settings class (else None).

    Input values are left out: they may be secrets.

    Example:
        >>> from dpe.settings import Settings
        >>> try:
        ...     Settings.load(overrides={"kafka": {"linger_ms": -1}})
        ... except Exception as error:
        ...     print(_bad_setting(error))
        invalid setting kafka.linger_ms (DPE_KAFKA__LINGER_MS): Input should be greater than or equal to 0
    """
    if error.title not in _settings_classes(CoreSettings):
        return None
    problems = []
    for problem in error.errors(include_url=False):
        location = problem["loc"]
        key = ".".join(map(str, location))
        problems.append(f"{key} ({_variable(location)}): {problem['msg']}" if key else problem["msg"])
    return "invalid setting " + "; ".join(problems)


def _variable(location: tuple[int | str, ...]) -> str:
    """The ``DPE_*`` variable that sets a setting: a list's, as JSON, for an entry of a list.

    >>> _variable(("kafka", "linger_ms")), _variable(("evaluator", "benchmarks", 0, "format"))
    ('DPE_KAFKA__LINGER_MS', 'DPE_EVALUATOR__BENCHMARKS')
    """
    return "DPE_" + "__".join(str(part).upper() for part in takewhile(lambda part: isinstance(part, str), location))


def _settings_classes(base: type) -> set[str]:
    """Names of `base` and every subclass of it imported so far."""
    return {base.__name__}.union(*(_settings_classes(sub) for sub in base.__subclasses__()))


def _unreachable(error: Exception) -> str:
    return f"broker unreachable: {error}"


USER_ERRORS: dict[str, Callable[[Any], str | None]] = {
    "builtins:FileNotFoundError": _missing_file,
    "pydantic_core:ValidationError": _bad_setting,
    "pydantic_settings.exceptions:SettingsError": str,
    "dpe.broker:BrokerError": str,
    "aiokafka.errors:KafkaConnectionError": _unreachable,
    "kafka.errors:NoBrokersAvailable": _unreachable,
    "kafka.errors:KafkaTimeoutError": _unreachable,
    "producers.evaluator.loaders.report:BenchmarkError": str,
}
"""``"module:Exception"`` -> its one-line message (None: not the user's mistake after all). A type is
looked up only once its module is loaded (nothing else can have raised it), so that naming a
service's exception here costs no import."""


def user_error(error: BaseException) -> str | None:
    """The one-line message for a user's mistake (credentials inside URLs masked), or None for anything else
    (a bug, whose traceback stays).

    Example:
        >>> user_error(FileNotFoundError(2, "No such file or directory", "dpe.yaml"))
        'dpe.yaml: No such file or directory'
        >>> user_error(KeyError("a bug")) is None
        True
    """
    for path, describe in USER_ERRORS.items():
        module, _, name = path.partition(":")
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and isinstance(error, kind):
            message = describe(error)
            if message:
                return mask_userinfo(" ".join(message.split()))
    return None


class ShellGroup(LazyGroup):
    """The ``dpe`` group: a `LazyGroup` whose commands answer a user's mistake with one line (`user_error`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as error:
            message = user_error(error)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=ShellGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
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
    configure_logging(log_level or "WARNING")


@main.group(cls=LazyGroup, lazy=SERVICE_COMMANDS)
def serve() -> None:
    """Run one service of the pipeline (each is its own process in production)."""
