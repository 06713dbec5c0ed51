"""Where and in what precision a policy runs: `PlacementSettings` resolved for one checkpoint on this machine.

`resolve_placement` is the one place that decides a load's device, dtype and attention kernel, so the evaluator,
the difficulty band, the auditor and the policy server agree, and a real checkpoint never lands in float32 on the
CPU by accident: with ``dtype: auto`` only a checkpoint of at most ``float32_max_parameters`` parameters (counted
from its safetensors headers, without reading a weight) loads in float32, anything larger in its declared half
precision (bfloat16 when it declares none, or declares float16 on a CPU). What the machine cannot do is an error.

Example:
    >>> from dpe.config import PlacementSettings
    >>> plan = resolve_placement(PlacementSettings(device="cpu", dtype="bfloat16", attention="eager"))
    >>> plan.device, plan.dtype, plan.attention
    ('cpu', torch.bfloat16, 'eager')
    >>> resolve_placement(PlacementSettings(device="cuda:7"), cuda_devices=0)
    Traceback (most recent call last):
    ...
    dpe.policy.placement.PlacementUnavailable: placement.device is 'cuda:7' but this machine has no CUDA GPU \
(torch sees 0); set placement.device to auto or cpu
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpe.config import PlacementSettings
from dpe.policy.weights import checkpoint_parameters

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PlacementUnavailable(RuntimeError):
    """The placement settings ask for something this machine lacks (a GPU, an index, flash-attn)."""


@dataclass(frozen=True)
class Placement:
    """A resolved placement: what `dpe.policy.model.load_policy` loads with."""

    device: str
    dtype: torch.dtype
    attention: str


def resolve_placement(
    settings: PlacementSettings, folder: str | Path | None = None, *, cuda_devices: int | None = None
) -> Placement:
    """The device, dtype and attention kernel for the checkpoint in `folder` (None: a model built in memory, sized
    like the tiny one) under `settings`; `cuda_devices` overrides how many GPUs torch sees (tests)."""
    gpus = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    device = _device(settings.device, gpus)
    dtype = _dtype(settings, folder, device)
    return Placement(device=device, dtype=dtype, attention=_attention(settings.attention, device, dtype))


def _device(wanted: str, gpus: int) -> str:
    if wanted == "auto":
        return "cuda" if gpus else "cpu"
    if wanted == "cpu":
        return "cpu"
    index = int(wanted.partition(":")[2] or 0)
    if not gpus:
        raise PlacementUnavailable(f"placement.device is {wanted!r} but this machine has no CUDA GPU (torch sees 0); "
                                   "set placement.device to auto or cpu")
    if index >= gpus:
        raise PlacementUnavailable(f"placement.device is {wanted!r} but torch sees {gpus} GPU(s) (cuda:0 to "
                                   f"cuda:{gpus - 1})")
    return wanted


def _dtype(settings: PlacementSettings, folder: str | Path | None, device: str) -> torch.dtype:
    if settings.dtype != "auto":
        return DTYPES[settings.dtype]
    if folder is None or checkpoint_parameters(folder) <= settings.float32_max_parameters:
        return torch.float32
    declared = _declared_dtype(Path(folder))
    if declared == torch.float16 and device == "cpu":
        return torch.bfloat16
    return declared if declared in (torch.bfloat16, torch.float16) else torch.bfloat16


def _declared_dtype(folder: Path) -> torch.dtype | None:
    config_file = folder / "config.json"
    if not config_file.exists():
        return None
    config = json.loads(config_file.read_text())
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def _attention(wanted: str, device: str, dtype: torch.dtype) -> str:
    flash_possible = device.startswith("cuda") and dtype in (torch.bfloat16, torch.float16)
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if wanted == "flash_attention_2" and not (flash_possible and flash_installed):
        reason = "flash-attn is not installed" if not flash_installed else f"it needs a GPU and half precision, " \
                                                                           f"not {device} with {dtype}"
        raise PlacementUnavailable(f"placement.attention is flash_attention_2 but {reason}; use auto or sdpa")
    if wanted != "auto":
        return wanted
    return "flash_attention_2" if flash_possible and flash_installed else "sdpa"
