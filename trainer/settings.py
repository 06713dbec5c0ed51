"""Settings of the GRPO trainer service: the ``trainer`` section (`TrainerConfig` is what the trainer reads).

GRPO hyperparameters come from a preset that explicitly set fields override: ``paper`` holds the
DPE reference's settings for real models (8 rollouts, lr 1e-6, KL 1e-2, clip 0.2/0.3, reward
0.9 · accuracy + 0.1 · format), ``tiny`` a recipe that makes the tiny CPU model learn (lr 3e-4,
β 0.04, short completions, fp32). The default, ``auto``, holds the tiny values until the trainer knows its
base model (`GRPOSettings.resolved`): ``paper`` for a checkpoint above `dpe.config.TINY_MAX_PARAMETERS`
parameters, ``tiny`` otherwise (and for the warmed default).

Example:
    >>> GRPOSettings(preset="paper").learning_rate
    1e-06
    >>> GRPOSettings(preset="paper", learning_rate=2e-6).learning_rate
    2e-06
    >>> TrainerSettings().rounds.max_samples
    32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from dpe.config import TINY_MAX_PARAMETERS, CoreSettings
from dpe.policy.weights import checkpoint_parameters
from dpe.section import Section

Preset = Literal["auto", "tiny", "paper"]

GRPO_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "group_size": 8,
        "prompts_per_step": 16,
        "learning_rate": 1e-6,
        "kl_coef": 1e-2,
        "kl_estimator": "k3",
        "clip_low": 0.2,
        "clip_high": 0.3,
        "accuracy_weight": 0.9,
        "format_weight": 0.1,
        "max_completion_length": 1024,
        "temperature": 1.0,
        "bf16": True,
        "gradient_checkpointing": True,
    },
    "tiny": {
        "group_size": 8,
        "prompts_per_step": 8,
        "learning_rate": 3e-4,
        "kl_coef": 0.04,
        "kl_estimator": "k3",
        "clip_low": 0.2,
        "clip_high": 0.3,
        "accuracy_weight": 0.9,
        "format_weight": 0.1,
        "max_completion_length": 8,
        "temperature": 1.0,
        "bf16": False,
        "gradient_checkpointing": False,
    },
}
"""Preset values of `GRPOSettings`; fields given explicitly win."""


class GRPOSettings(Section):
    """GRPO hyperparameters: rollouts, optimiser, KL, clipping, reward weights and lengths."""

    preset: Preset = "auto"
    group_size: int = Field(ge=2, description="Rollouts per prompt (G).")
    prompts_per_step: int = Field(ge=1, description="Prompts per optimiser step, over all ranks.")
    updates_per_batch: int = Field(
        1, ge=1, description="Optimiser updates per generated batch (mu); above 1 the clipping bites."
    )
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up at the start of the run (then constant).")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0)
    kl_coef: float = Field(ge=0, description="beta; 0 drops the reference model.")
    kl_estimator: Literal["k3", "k3_unbiased"] = Field(
        description="k3: the low-variance estimator; k3_unbiased: k3 times the importance ratio (TRL's correction)."
    )
    clip_low: float = Field(gt=0, description="epsilon: lower clip of the probability ratio.")
    clip_high: float = Field(gt=0, description="epsilon_high: upper clip (clip-higher).")
    loss_type: Literal["grpo", "dapo", "bnpo", "dr_grpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    accuracy_weight: float = Field(ge=0)
    format_weight: float = Field(ge=0)
    max_completion_length: int = Field(ge=1)
    temperature: float = Field(gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    bf16: bool
    gradient_checkpointing: bool
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "auto")
        if preset != "auto" and preset not in GRPO_PRESETS:
            raise ValueError(f"unknown GRPO preset {preset!r}; known: auto, {', '.join(sorted(GRPO_PRESETS))}")
        return {**GRPO_PRESETS["tiny" if preset == "auto" else preset], **data}

    def resolved(self, base_model: Path) -> "GRPOSettings":
        """What the trainer trains `base_model` with: with preset ``auto``, the `preset_for` the checkpoint, whose
        values replace every field still at the tiny preset's (set a preset to keep a field at a tiny value);
        an explicit preset as it is.

        Example:
            >>> GRPOSettings(learning_rate=1e-5).resolved(Path("/no/such/folder")).preset
            'tiny'
        """
        if self.preset != "auto":
            return self
        preset = preset_for(base_model)
        tiny = GRPO_PRESETS["tiny"]
        kept = {name: value for name, value in self.model_dump().items() if name not in tiny or value != tiny[name]}
        return GRPOSettings(**kept | {"preset": preset})


class RoundSettings(Section):
    """When a micro-round closes: after `max_samples` admitted samples or `max_seconds` after its first."""

    max_samples: int = Field(32, ge=1)
    max_seconds: float = Field(30.0, gt=0, description="Also how often an idle trainer wakes up.")
    fetch_timeout_ms: int = Field(200, ge=1)


class StalenessSettings(Section):
    """Samples filtered against a policy more than `max_versions` behind are dropped or down-weighted."""

    max_versions: int | None = Field(4, ge=0, description="None: never stale.")
    action: Literal["drop", "downweight"] = "drop"
    decay: float = Field(0.5, gt=0, le=1, description="Weight factor per version beyond the bound (downweight).")


class CheckpointSettings(Section):
    """Where checkpoints live and how many are kept."""

    folder: Path | None = Field(None, description="Default: <home>/checkpoints.")
    keep_last: int = Field(5, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    dedup_window: int = Field(100_000, ge=0, description="Most recent trained sample ids remembered for dedup.")


class DeepSpeedSettings(Section):
    """DeepSpeed ZeRO: one process with gloo on CPU, the accelerate/DeepSpeed launcher on GPUs."""

    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    config_file: Path | None = Field(None, description="A full DeepSpeed JSON config instead of the generated one.")


class LoraSettings(Section):
    """Low-rank adapters (peft LoRA) on the language model's linear layers instead of full fine-tuning.

    Checkpoints then hold the adapter only (``adapter_config.json`` naming the base folder, and
    ``adapter_model.safetensors``), written, announced and resumed like full ones; every reader loads the base with
    the adapter merged in, and ``dpe model export --merged`` writes a full model folder.
    """

    rank: int = Field(0, ge=0, description="LoRA rank r; 0 trains every weight (no adapter).")
    alpha: float | None = Field(None, gt=0, description="Scale numerator (the update is alpha/r · BA); None: 2r.")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str = Field(
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        description="Regex over module names: the text decoder's attention and MLP projections (not the vision tower).",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class TrainerSettings(Section):
    """Everything the trainer service reads."""

    base_model: Path | None = Field(None, description="Local model folder of policy version 0.")
    group_id: str = Field(
        "trainer", description="Consumer group the read positions are committed to after each checkpoint. The "
        "checkpoint's own positions win on the bus that gave them; on another bus (a new cluster id: a resumed or "
        "rolled embedded broker) the group's offsets, carried over by dpe.bus.carry, say where to go on."
    )
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    rounds: RoundSettings = Field(default_factory=RoundSettings)
    staleness: StalenessSettings = Field(default_factory=StalenessSettings)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    rollout: Literal["auto", "generate", "vllm"] = Field(
        "auto", description="vllm (colocated) needs a GPU and the gpu extra; auto picks it when both are present."
    )
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads; None keeps torch's default.")
    metrics_port: int = Field(9105, ge=0, le=65535, description="Prometheus port (0: none; metrics.port overrides).")
    extensions_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "dpe" / "torch_extensions",
        description="TORCH_EXTENSIONS_DIR for the ops DeepSpeed builds (once per machine; $TORCH_EXTENSIONS_DIR wins).",
    )


class TrainerConfig(CoreSettings):
    """What the trainer reads: the core settings and its own section."""

    trainer: TrainerSettings = Field(default_factory=TrainerSettings)


def preset_for(base_model: Path) -> Preset:
    """``paper`` for a checkpoint with more than `TINY_MAX_PARAMETERS` parameters, else ``tiny`` (also for a folder
    holding no weights).

    Example:
        >>> preset_for(Path("/no/such/folder"))
        'tiny'
    """
    return "paper" if checkpoint_parameters(base_model) > TINY_MAX_PARAMETERS else "tiny"


def checkpoint_root(settings: TrainerConfig, default: str = "checkpoints") -> Path:
    """Where the trainer's checkpoints live: the configured folder or ``<home>/<default>`` (the task's).

    Example:
        >>> checkpoint_root(TrainerConfig(home="/srv/dpe")), checkpoint_root(TrainerConfig(home="/d"), "auditor")
        (PosixPath('/srv/dpe/checkpoints'), PosixPath('/d/auditor'))
    """
    return settings.trainer.checkpoints.folder or settings.home / default
