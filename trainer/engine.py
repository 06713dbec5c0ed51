"""One long-lived GRPO learner: TRL's GRPOTrainer machinery driven round by round on DeepSpeed.

`GRPOEngine` builds one `GRPOTrainer` (rollouts, rewards, group advantages, clipped loss with the
KL term) and prepares the model, a torch AdamW and its schedule once with the trainer's
accelerator: a DeepSpeed engine at the configured ZeRO stage, or plain torch. Each micro-round then
runs TRL's `training_step` (generate G completions per prompt, score, backward) and one optimiser
step per batch, on the same engine, so the Adam moments and the step count carry over from round
to round; `save` and `load_checkpoint` carry them over restarts. At the end of a round the
KL reference becomes the new policy, so every round is regularised towards its parent checkpoint
(the same after a restart as without one). With ``lora.rank`` set, only a LoRA adapter on the language model is
trained, its KL reference is TRL's frozen copy of the adapter (re-anchored the same way), and checkpoints hold the
adapter alone.

Example:
    >>> rows = [{"prompt": p} for p in "abc"]
    >>> [[r["prompt"] for r in batch] for batch in step_batches(rows, prompts_per_step=2, group_size=2)]
    [['a', 'a', 'b', 'b'], ['c', 'c']]
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from datasets import Dataset
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback

from dpe.config import PlacementSettings
from dpe.policy.model import Policy, load_policy, suppressed_token_ids
from dpe.policy.processor import load_processor
from trainer.distributed import deepspeed_config, prepare_process, use_vllm, vllm_available
from trainer.rewards import Rewards, policy_rewards
from trainer.settings import LoraSettings, TrainerSettings

log = logging.getLogger(__name__)

DEEPSPEED_STATE = "deepspeed"
TORCH_STATE = "optimizer.pt"
TRAINED_ADAPTER = "default"
REFERENCE_ADAPTER = "ref"
"""With LoRA: the adapter trained, and the frozen copy TRL adds as the KL reference (names TRL expects)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MASTER_WEIGHTS = PlacementSettings(device="cpu", dtype="float32")
"""The trainer loads float32 weights on the CPU whatever the policy placement: accelerate and DeepSpeed move them
to the rank's GPU, and ``grpo.bf16`` trains in mixed precision over them."""
TRL_METRICS = {"reward": "reward_mean", "reward_std": "reward_std", "frac_reward_zero_std": "frac_zero_std", "kl": "kl"}
"""TRL's per-step metric names -> the names in a round's summary."""


class Prompted(Protocol):
    """What a round trains on: anything that is a row of TRL's GRPO dataset (a `TrainingSample`, an auditor's
    prompt): ``prompt``, ``image`` and the columns its rewards read."""

    def row(self) -> dict[str, Any]: ...


class WeightedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that scales each completion's advantage by its row's ``weight`` (stale samples count less)."""

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        advantages = output["advantages"]
        weights = [row.get("weight", 1.0) for row in inputs]
        weights = torch.tensor(weights, dtype=advantages.dtype, device=advantages.device)
        output["advantages"] = advantages * (weights if advantages.dim() == 1 else weights.unsqueeze(1))
        return output


@dataclass(frozen=True)
class StepStats:
    """One optimiser step: wall time, tokens processed (prompt + completion, all ranks) and TRL's metrics."""

    seconds: float
    tokens: int
    loss: float
    metrics: dict[str, float]


@dataclass
class RoundStats:
    """What a round of training did."""

    samples: int
    steps: list[StepStats] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Means over the round's steps (reward, its std, zero-std groups, KL, loss), step time, tokens/s.

        A figure that is not finite (a diverged loss, a NaN KL) is left out: the checkpoint event announces
        finite numbers only.

        Example:
            >>> summary = RoundStats(2, [StepStats(1.0, 10, float("nan"), {"kl": 0.5})]).summary()
            >>> summary["kl"], "loss" in summary
            (0.5, False)
        """
        out = {"samples": float(self.samples), "steps": float(len(self.steps))}
        if not self.steps:
            return out
        seconds = sum(step.seconds for step in self.steps)
        out |= {
            "train_s": seconds,
            "step_time_s": statistics.median(step.seconds for step in self.steps),
            "tokens_per_s": sum(step.tokens for step in self.steps) / seconds if seconds else 0.0,
            "loss": statistics.fmean(step.loss for step in self.steps),
        }
        for trl_name, name in TRL_METRICS.items():
            values = [step.metrics[trl_name] for step in self.steps if trl_name in step.metrics]
            if values:
                out[name] = statistics.fmean(values)
        return {name: value for name, value in out.items() if math.isfinite(value)}


def step_batches(
    rows: Sequence[dict[str, Any]], prompts_per_step: int, group_size: int, rank: int = 0, world_size: int = 1
) -> list[list[dict[str, Any]]]:
    """This rank's rows for each step: `prompts_per_step` prompts (fewer in the last step), each
    repeated `group_size` times, the step's rows split into equal contiguous shares across ranks."""
    batches = []
    for start in range(0, len(rows), prompts_per_step):
        repeated = [row for row in rows[start : start + prompts_per_step] for _ in range(group_size)]
        share = len(repeated) // world_size
        batches.append(repeated[rank * share : (rank + 1) * share])
    return batches


def grpo_config(
    settings: TrainerSettings, output_dir: Path, suppress_tokens: list[int], *, world_size: int,
    reward_weights: Sequence[float],
) -> GRPOConfig:
    """TRL's GRPOConfig from the trainer settings (the DeepSpeed config goes in here, at construction).

    Rollouts use vLLM (colocated) when `use_vllm` says so, else `generate` with the vision tokens
    in `suppress_tokens` suppressed (an undertrained policy that samples one breaks the next forward).
    """
    grpo = settings.grpo
    completions_per_step = grpo.prompts_per_step * grpo.group_size
    if grpo.group_size % world_size:
        raise ValueError(f"group_size {grpo.group_size} must divide by the number of processes {world_size}")
    cuda, vllm = vllm_available()
    rollout_with_vllm = use_vllm(settings.rollout, cuda_available=cuda, vllm_installed=vllm)
    return GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=completions_per_step // world_size,
        num_generations=grpo.group_size,
        num_iterations=grpo.updates_per_batch,
        learning_rate=grpo.learning_rate,
        weight_decay=grpo.weight_decay,
        max_grad_norm=grpo.max_grad_norm,
        beta=grpo.kl_coef,
        use_bias_correction_kl=grpo.kl_estimator == "k3_unbiased",
        epsilon=grpo.clip_low,
        epsilon_high=grpo.clip_high,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        reward_weights=list(reward_weights),
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        generation_kwargs=None if rollout_with_vllm else {"suppress_tokens": suppress_tokens},
        bf16=grpo.bf16,
        gradient_checkpointing=grpo.gradient_checkpointing,
        seed=grpo.seed,
        use_cpu=not cuda,
        use_vllm=rollout_with_vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        deepspeed=deepspeed_config(settings) if settings.deepspeed.enabled else None,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )


class GRPOEngine:
    """The policy, its KL reference, optimiser and (DeepSpeed) engine, trained round after round.

    Built from the base model folder (every rank can do that before any coordination);
    `load_checkpoint` then continues from a checkpoint. `rewards` are what GRPO maximises: by default the policy's
    (`trainer.rewards.policy_rewards` with the settings' weights); another task brings its own.
    """

    def __init__(self, model_folder: Path, settings: TrainerSettings, output_dir: Path,
                 rewards: Rewards | None = None):
        settings = settings.model_copy(update={"grpo": settings.grpo.resolved(model_folder)})
        log.info("GRPO preset %s for %s", settings.grpo.preset, model_folder)
        prepare_process(settings)
        self.settings = settings
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        processor = load_processor(model_folder)
        # The config comes first: with ZeRO-3 it makes the model load partitioned.
        rewards = rewards or policy_rewards(settings.grpo.accuracy_weight, settings.grpo.format_weight)
        args = grpo_config(settings, output_dir, suppressed_token_ids(processor.tokenizer), world_size=world_size,
                           reward_weights=list(rewards.values()))
        self.policy: Policy = load_policy(model_folder, MASTER_WEIGHTS)
        if settings.lora.enabled:
            self.policy = Policy(model=with_adapter(self.policy.model, settings.lora), processor=self.policy.processor)
        # TRL left-pads prompts and takes mm_token_type_ids from the processor's own padding: they
        # only line up when the processor pads on the left too (as processors TRL loads itself do).
        self.policy.processor.tokenizer.padding_side = "left"
        self.trainer = WeightedGRPOTrainer(
            model=self.policy.model,
            reward_funcs=list(rewards),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": []}),
            processing_class=self.policy.processor,
        )
        self.accelerator = self.trainer.accelerator
        for name, parameter in self.policy.model.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:  # TRL's frozen copy of the adapter, the KL reference
                parameter.requires_grad_(False)
        grpo = settings.grpo
        parameters = [p for p in self.policy.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=grpo.learning_rate, betas=grpo.adam_betas, weight_decay=grpo.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(grpo.warmup_steps))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.policy.model, optimizer, schedule)
        self.trainer.model_wrapped = self.model
        self.trainer.optimizer, self.trainer.lr_scheduler = self.optimizer, self.scheduler
        if self.deepspeed:
            self.trainer.deepspeed = self.model
        self.trainer.current_gradient_accumulation_steps = 1

    @property
    def deepspeed(self) -> bool:
        """Whether the model runs inside a DeepSpeed engine."""
        return self.trainer.is_deepspeed_enabled

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def global_step(self) -> int:
        """Optimiser steps taken since the base model (restored by `load_checkpoint`)."""
        return self.trainer.state.global_step

    def train_round(self, samples: Sequence[Prompted]) -> RoundStats:
        """One pass of GRPO over `samples` (this rank's share of every step), then re-anchor the KL reference."""
        grpo = self.settings.grpo
        stats = RoundStats(samples=len(samples))
        rows = [sample.row() for sample in samples]
        rank, world = self.accelerator.process_index, self.num_processes
        for batch in step_batches(rows, grpo.prompts_per_step, grpo.group_size, rank, world):
            for _ in range(grpo.updates_per_batch):
                stats.steps.append(self._step(batch))
        if stats.steps:
            self._anchor_reference()
        return stats

    def _step(self, batch: list[dict[str, Any]]) -> StepStats:
        """One optimiser step on `batch`, as TRL's training loop takes it; TRL's per-step metrics are
        read from (and cleared in) the trainer's metric buffer, which its own `log` would drain."""
        state = self.trainer.state
        tokens_before = state.num_input_tokens_seen
        started = time.perf_counter()
        loss = self.trainer.training_step(self.model, batch, None)
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.grpo.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        state.global_step += 1
        seconds = time.perf_counter() - started
        metrics = self.trainer._metrics["train"]
        latest = {name: float(values[-1]) for name, values in metrics.items() if values}
        metrics.clear()
        return StepStats(seconds, int(state.num_input_tokens_seen - tokens_before), float(loss), latest)

    def save(self, folder: Path) -> None:
        """Write the weights and processor (a loadable model folder) and the training state into `folder`.

        Collective with several processes: every rank calls it; rank 0 writes the model files.
        """
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.is_main_process:
            adapter_only = {"selected_adapters": [TRAINED_ADAPTER]} if self.settings.lora.enabled else {}
            self.accelerator.unwrap_model(self.model).save_pretrained(folder, state_dict=state_dict, **adapter_only)
            self.policy.processor.save_pretrained(folder)
        if self.deepspeed:
            self.model.save_checkpoint(str(folder / DEEPSPEED_STATE), tag="state", save_latest=False)
        elif self.is_main_process:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save(state, folder / TORCH_STATE)

    def load_checkpoint(self, folder: Path, global_step: int) -> None:
        """Continue from a checkpoint written by `save`: weights, optimiser, schedule, step count.

        The KL reference becomes the loaded policy (the parent of the next round). A checkpoint
        written with DeepSpeed on and read with it off (or the reverse) gives the weights and a
        fresh optimiser, with a warning.
        """
        self.trainer.state.global_step = global_step
        if self.deepspeed and (folder / DEEPSPEED_STATE).is_dir():
            self.model.load_checkpoint(
                str(folder / DEEPSPEED_STATE), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
            )
        else:
            self._load_weights(folder)
            if not self.deepspeed and (folder / TORCH_STATE).is_file():
                state = torch.load(folder / TORCH_STATE, weights_only=True)
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            else:
                log.warning("%s has no optimiser state for DeepSpeed %s; the optimiser starts fresh",
                            folder, "on" if self.deepspeed else "off")
        self._anchor_reference()

    def _load_weights(self, folder: Path) -> None:
        """Replace the trained weights by the checkpoint's: the whole model's, or the adapter's (its base is ours)."""
        policy = self.accelerator.unwrap_model(self.model)
        if self.settings.lora.enabled:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(policy, load_file(folder / ADAPTER_WEIGHTS), adapter_name=TRAINED_ADAPTER)
        else:
            SyncRefModelCallback.sync_target_model(load_policy(folder, MASTER_WEIGHTS).model, policy, 1.0)

    def _anchor_reference(self) -> None:
        """Make the KL reference a copy of the current policy: the reference model's weights, or with LoRA the
        reference adapter's (TRL's frozen copy of the trained one)."""
        policy = self.accelerator.unwrap_model(self.model)
        if self.trainer.ref_model is not None:
            SyncRefModelCallback.sync_target_model(policy, self.trainer.ref_model, 1.0)
        elif self.settings.lora.enabled and REFERENCE_ADAPTER in policy.peft_config:
            copy_adapter(policy, TRAINED_ADAPTER, REFERENCE_ADAPTER)


def with_adapter(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    """`model` wrapped with a fresh LoRA adapter (B = 0: it starts as the base) on `lora.target_modules`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or 2 * lora.rank, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none")
    return get_peft_model(model, config, adapter_name=TRAINED_ADAPTER)


def copy_adapter(model: PreTrainedModel, source: str, target: str) -> None:
    """Copy adapter `source`'s weights into adapter `target` of a peft `model` (gathered under ZeRO-3)."""
    pairs = [(parameter, model.get_parameter(name.replace(f".{source}.", f".{target}.")))
             for name, parameter in model.named_parameters() if f".{source}." in name]
    with _gathered([tensor for pair in pairs for tensor in pair]), torch.no_grad():
        for parameter, copy in pairs:
            copy.copy_(parameter)


def _gathered(parameters: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Full tensors for ZeRO-3 partitioned `parameters` (written back from rank 0); nothing to do otherwise."""
    if any(hasattr(parameter, "ds_id") for parameter in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0)
    return contextlib.nullcontext()


def _warmup(steps: int) -> Callable[[int], float]:
    """Linear warm-up over `steps` optimiser steps, then a constant learning rate."""
    return lambda step: min(1.0, (step + 1) / steps) if steps else 1.0
