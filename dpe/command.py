"""What every `dpe` command shares: the global flags, turned into the settings a command asks for.

The ``dpe`` group (``dpe.cli``) puts a `CliState` in the click context; a command takes it with
`pass_state` and asks for the settings class it reads: a service its own config
(``state.settings_as(AgentsConfig)``), the application shell the composed ``Settings``. Each class
is loaded once per process from the same layers (YAML < ``DPE_*`` environment < flags).

Example:
    >>> from dpe.config import CoreSettings
    >>> state = CliState(None, {"kafka": {"topic_prefix": "t."}})
    >>> state.settings_as(CoreSettings).kafka.topic_prefix
    't.'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from dpe.config import CoreSettings

S = TypeVar("S", bound=CoreSettings)


@dataclass
class CliState:
    """Global flags of the ``dpe`` command, turned into settings on first use."""

    config_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _loaded: dict[type, CoreSettings] = field(default_factory=dict, repr=False)

    def settings_as(self, settings_class: type[S]) -> S:
        """The settings as `settings_class` (loaded once, then reused)."""
        if settings_class not in self._loaded:
            self._loaded[settings_class] = settings_class.load(self.config_file, self.overrides)
        return self._loaded[settings_class]  # type: ignore[return-value]


pass_state = click.make_pass_decorator(CliState, ensure=True)
"""Passes the ``dpe`` group's state; a command run on its own (``python -m trainer.cli``) gets one built
from ``DPE_CONFIG`` and the environment alone."""
