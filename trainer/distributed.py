"""Process-level setup for training: DeepSpeed config, single-process rendezvous, rollout backend.

On CPU the trainer is one process using DeepSpeed with the gloo backend, which still wants the
launcher's environment (`single_process_env`). On GPUs the accelerate or DeepSpeed launcher sets
that environment for several processes, and rank 0 shares each round with the others
(`share_from_main`).

Example:
    >>> from trainer.settings import TrainerSettings
    >>> deepspeed_config(TrainerSettings())["zero_optimization"]
    {'stage': 2}
    >>> use_vllm("auto", cuda_available=False, vllm_installed=True)
    False
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from dpe.broker import free_port
from trainer.settings import TrainerSettings

T = TypeVar("T")


def deepspeed_config(settings: TrainerSettings) -> dict[str, Any]:
    """The DeepSpeed config: the configured JSON file, or ZeRO at the configured stage.

    Batch sizes, clipping and precision are "auto": TRL's `GRPOConfig` fills them from its own
    arguments, so they always agree. The optimiser is the trainer's torch AdamW (nothing compiles).
    """
    if settings.deepspeed.config_file is not None:
        return json.loads(Path(settings.deepspeed.config_file).read_text())
    zero: dict[str, Any] = {"stage": settings.deepspeed.zero_stage}
    if settings.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_allow_untested_optimizer": True,
    }


def single_process_env() -> dict[str, str]:
    """Launcher variables for a one-process world, or nothing when a launcher already set them.

    Example:
        >>> sorted(single_process_env()) in ([], ["LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"])
        True
    """
    if "WORLD_SIZE" in os.environ:
        return {}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def prepare_process(settings: TrainerSettings) -> None:
    """Thread count, extension cache and (with DeepSpeed) the rendezvous variables of this process."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(settings.torch_threads)  # else accelerate resets the thread count
    if settings.deepspeed.enabled:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(settings.extensions_dir).resolve()))
        os.environ.update(single_process_env())
    else:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # inherited from a DeepSpeed parent, it would switch it on


def use_vllm(rollout: str, *, cuda_available: bool, vllm_installed: bool) -> bool:
    """Whether rollouts go through vLLM: always for "vllm", never for "generate", if possible for "auto".

    Example:
        >>> use_vllm("vllm", cuda_available=False, vllm_installed=False)
        Traceback (most recent call last):
        ...
        ValueError: rollout='vllm' needs a CUDA GPU and the vllm package (pip install 'dpe-stream[gpu]')
    """
    possible = cuda_available and vllm_installed
    if rollout == "vllm" and not possible:
        raise ValueError("rollout='vllm' needs a CUDA GPU and the vllm package (pip install 'dpe-stream[gpu]')")
    return rollout == "vllm" or (rollout == "auto" and possible)


def vllm_available() -> tuple[bool, bool]:
    """(CUDA available, vllm importable) in this process."""
    return torch.cuda.is_available(), importlib.util.find_spec("vllm") is not None


def share_from_main(value: T | None, num_processes: int) -> T:
    """`value` from rank 0 on every rank (a no-op with one process)."""
    if num_processes == 1:
        return value  # type: ignore[return-value]
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
