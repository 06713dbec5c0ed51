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

import fcntl
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from dpe.broker import free_port
from trainer.settings import TrainerSettings

T = TypeVar("T")

log = logging.getLogger(__name__)


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
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(settings.extensions_dir).expanduser().resolve()))
        os.environ.update(single_process_env())
        build_deepspeed_ops(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    else:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # inherited from a DeepSpeed parent, it would switch it on


def build_deepspeed_ops(folder: Path) -> None:
    """Build (or load the cached build of) the op DeepSpeed's torch backend loads when it starts.

    torch marks a build in progress with a ``lock`` file in the op's folder; a build that is killed
    leaves it behind, and every later process waits on it forever. dpe builds only while holding an
    exclusive lock on ``folder/.dpe-builds.lock``, so once it has that lock any ``lock`` file left is
    stale and is removed. The build runs here, before any rendezvous, so ranks never wait on each
    other while one of them holds the lock.
    """
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".dpe-builds.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for stale in folder.glob("*/lock"):
            log.warning("removing %s, left by a build of a DeepSpeed op that was killed", stale)
            stale.unlink(missing_ok=True)
        if not any(folder.glob(f"{builder.NAME}/*.so")):
            log.info("building DeepSpeed's %s op into %s (once per machine, about a minute)", builder.NAME, folder)
        builder.load(verbose=False)


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
