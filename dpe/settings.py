"""The whole deployment's settings: the core and every service's section, composed.

Each service declares what it reads as a `CoreSettings` subclass beside its code
(``consumers/agents/settings.py`` has ``AgentsConfig``); `Settings` inherits all of them, so one
YAML file configures the deployment and any service accepts it. Only the application shell
(``dpe.cli``, ``dpe.spiral``) and tests build it.

Example:
    >>> s = Settings.load(overrides={"stream": {"quotas": {"budget": 70}}})
    >>> s.stream.quotas.budget, s.trainer.metrics_port, s.kafka.topic_prefix
    (70, 9105, 'dpe.')
"""

from __future__ import annotations

from consumers.agents.settings import AgentsConfig
from consumers.policy.settings import PolicyServerConfig
from producers.auditor.settings import AuditorConfig
from producers.auditor.trainer.settings import AuditorTrainerConfig
from producers.evaluator.settings import EvaluatorConfig
from producers.ingest.settings import IngestConfig
from streams.settings import StreamConfig
from trainer.settings import TrainerConfig


class Settings(StreamConfig, IngestConfig, EvaluatorConfig, AuditorTrainerConfig, AuditorConfig, AgentsConfig,
               TrainerConfig, PolicyServerConfig):
    """Everything a dpe deployment can be told; each section belongs to the service that reads it."""


SECTIONS = {"weakness": "stream", "auditor-trainer": "auditor_trainer"}
"""Services whose settings section has another name than theirs."""


def section_of(service: str) -> str:
    """The settings section of a service (a `dpe.cli.stages` name or a `dpe run` process name, ``ingest-*`` too).

    Example:
        >>> [section_of(name) for name in ("weakness", "auditor-trainer", "ingest-watch", "trainer")]
        ['stream', 'auditor_trainer', 'ingest', 'trainer']
    """
    return SECTIONS.get(service, service.partition("-")[0])
