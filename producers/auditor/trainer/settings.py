"""Settings of the auditor model's trainer: how its model starts (``auditor.training``) and its trainer section
(``auditor_trainer``: the trainer's settings, in its own consumer group, checkpoint folder and metrics port).

Example:
    >>> config = AuditorTrainerConfig()
    >>> config.auditor_trainer.group_id, config.auditor_trainer.metrics_port, config.auditor_training.format_steps
    ('auditor-trainer', 9108, 120)
"""

from __future__ import annotations

from pydantic import Field

from dpe.section import Section
from producers.auditor.settings import AuditorConfig
from trainer.settings import GRPOSettings, StalenessSettings, TrainerConfig, TrainerSettings


class AuditorTrainingSettings(Section):
    """How the auditor model starts: the policy's base, taught the menu's answer format first."""

    format_steps: int = Field(120, ge=1, description="Supervised steps teaching the menu's answer format.")
    format_images: int = Field(64, ge=1, description="Unlabeled images those steps draw from (read before round 1).")


ANSWER_TOKENS = 10
"""Room for an answer such as ``\\boxed{B,D}`` and its end token, in the tiny tokenizer and in released ones."""


def auditor_trainer_defaults() -> TrainerSettings:
    """The trainer's settings as the auditor model's trainer uses them: its own group and port, nothing stale (an
    unlabeled image does not age with the auditor's versions), completions as long as an answer."""
    return TrainerSettings(group_id="auditor-trainer", metrics_port=9108,
                           staleness=StalenessSettings(max_versions=None),
                           grpo=GRPOSettings(max_completion_length=ANSWER_TOKENS))


class AuditorTrainerConfig(AuditorConfig, TrainerConfig):
    """What the auditor's trainer reads: the auditor's section (references, probe writer), the policy trainer's
    (whose base model it starts from), and its own two."""

    auditor_training: AuditorTrainingSettings = Field(default_factory=AuditorTrainingSettings)
    auditor_trainer: TrainerSettings = Field(
        default_factory=auditor_trainer_defaults,
        description="The auditor model's trainer; base_model: its version 0 (default: taught from the policy's base).",
    )
