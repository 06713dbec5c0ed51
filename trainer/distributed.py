"""Process-level setup for training: DeepSpeed config, single-process rendezvous, rollout backend.

On CPU the trainer is one process using DeepSpeed with the gloo backend, which still wants the
launcher's environment (`start_single_process_world`). Its rendezvous store and gloo listen on
MASTER_ADDR alone: 127.0.0.1 unless the environment names another address. On GPUs the accelerate
or DeepSpeed launcher sets that environment for several processes, and rank 0 shares each round
with the others (`share_from_main`).

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
import socket
import sys
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
from torch.distributed import TCPStore

from trainer.settings import TrainerSettings

T = TypeVar("T")

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
"""Where a one-process world listens when the environment names no MASTER_ADDR."""


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


def single_process_env(addr: str, port: int) -> dict[str, str]:
    """Launcher variables for a one-process world whose rendezvous store is at `addr`:`port`.

    Example:
        >>> env = single_process_env("127.0.0.1", 29500)
        >>> env["MASTER_ADDR"], env["MASTER_PORT"], env["WORLD_SIZE"]
        ('127.0.0.1', '29500', '1')
    """
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


@cache
def serve_rendezvous(addr: str) -> TCPStore:
    """This process's rendezvous store, listening on `addr` alone (started once; lives as long as the process).

    torch's TCPStore server listens on every interface whatever MASTER_ADDR says, unless it is handed
    a socket already bound. The store is multi-tenant, so the one `init_process_group` opens at
    MASTER_ADDR:MASTER_PORT is this one.

    Example:
        >>> store = serve_rendezvous("127.0.0.1")
        >>> store.port > 0, serve_rendezvous("127.0.0.1") is store
        (True, True)
    """
    family, kind, proto, _, address = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.bind(address)
    port = listener.getsockname()[1]
    return TCPStore(addr, port, None, True, wait_for_workers=False, multi_tenant=True,
                    master_listen_fd=listener.detach())


def interface_holding(addr: str) -> str | None:
    """The name of the network interface that has address `addr` (a name or an IP), or None.

    Example:
        >>> interface_holding("127.0.0.1") in ("lo", "lo0"), interface_holding("192.0.2.1")
        (True, None)
    """
    wanted = {info[4][0] for info in socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)}
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address.split("%")[0] in wanted for address in addresses):
            return name
    return None


def start_single_process_world() -> None:
    """The launcher's part for a one-process world: rendezvous variables, its store, gloo's interface.

    The store and gloo listen on MASTER_ADDR (127.0.0.1 unless the environment sets it) and nowhere
    else; GLOO_SOCKET_IFNAME, when set, still names gloo's interface.
    """
    addr = os.environ.get("MASTER_ADDR", LOOPBACK)
    os.environ.update(single_process_env(addr, serve_rendezvous(addr).port))
    interface = interface_holding(addr)
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)


def prepare_process(settings: TrainerSettings) -> None:
    """Thread count, extension cache and (with DeepSpeed, without a launcher) the rendezvous of this process."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(settings.torch_threads)  # else accelerate resets the thread count
    if settings.deepspeed.enabled:
        if "WORLD_SIZE" not in os.environ:
            start_single_process_world()
        folder = os.environ.get("TORCH_EXTENSIONS_DIR") or settings.extensions_dir
        build_deepspeed_ops(Path(folder).expanduser().resolve())
    else:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # inherited from a DeepSpeed parent, it would switch it on


def build_deepspeed_ops(folder: Path) -> None:
    """Build (or load the cached build of) the op DeepSpeed's torch backend loads when it starts.

    torch marks a build in progress with a ``lock`` file in the op's folder; a build that is killed
    leaves it behind, and every later process waits on it forever. dpe builds only while holding an
    exclusive lock on ``folder/.dpe-builds.lock``, so once it has that lock any ``lock`` file left is
    stale and is removed. The build runs here, before any rendezvous, so ranks never wait on each
    other while one of them holds the lock. DeepSpeed finds its build folder only through
    ``$TORCH_EXTENSIONS_DIR``, so this sets it to ``folder`` for this process (its engine loads the op again).
    """
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    with open(folder / ".dpe-builds.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for stale in folder.glob("*/lock"):
            log.warning("removing %s, left by a build of a DeepSpeed op that was killed", stale)
            stale.unlink(missing_ok=True)
        if not any(folder.glob(f"{builder.NAME}/*.so")):
            log.info("building DeepSpeed's %s op into %s (once per machine, about a minute)", builder.NAME, folder)
        builder.load(verbose=False)


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher), known before any engine is built.

    Example:
        >>> launched_rank() if "RANK" not in os.environ else 0
        0
    """
    return int(os.environ.get("RANK", "0"))


def leave_world(num_processes: int) -> None:
    """Tear down the collective group of a launched world (several processes) before this process exits, so that
    none of its communication threads is left running at exit: a second rank that skipped it was seen to abort with
    "terminate called without an active exception" after its work was done. One process keeps its group."""
    if num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def launcher_command(settings: TrainerSettings, num_processes: int, port: int, trainer_args: list[str]) -> list[str]:
    """`python -m trainer.cli trainer_args` on `num_processes` processes of this machine under accelerate's DeepSpeed
    launcher (one per GPU; torchrun underneath sets each rank's environment), at the ZeRO stage and precision of
    `settings` (its GRPO preset resolved for the base model).

    Example:
        >>> command = launcher_command(TrainerSettings(), 2, 29500, ["--max-rounds", "1"])
        >>> command[command.index("--num_processes") + 1], command[-4:]
        ('2', ['--module', 'trainer.cli', '--max-rounds', '1'])
    """
    grpo = settings.grpo.resolved(settings.base_model) if settings.base_model else settings.grpo
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
            "--num_machines", "1", "--use_deepspeed", "--zero_stage", str(settings.deepspeed.zero_stage),
            "--mixed_precision", "bf16" if grpo.bf16 else "no", "--main_process_ip", LOOPBACK,
            "--main_process_port", str(port), "--module", "trainer.cli", *trainer_args]
