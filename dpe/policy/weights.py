"""Which model weights dpe reads: safetensors only, how many, and for an adapter on which base. Light (no torch),
so that any service can check a folder.

Weights saved with pickle (``torch.save``) can run any code as they load; a folder whose only weights are
pickled is refused (`PickledWeights`) before a byte of it is read.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "pytorch_model.bin").write_bytes(b"")
    >>> refuse_pickled_weights(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dpe.policy.weights.PickledWeights: .../pytorch_model.bin holds pickled weights and the folder has no ...
    >>> _ = (folder / "model.safetensors").write_bytes(b"")
    >>> refuse_pickled_weights(folder)
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

PICKLED_WEIGHTS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
"""File patterns of weights saved with pickle (torch.save), which `load_policy` never reads."""


class PickledWeights(ValueError):
    """A model folder whose only weights are pickled: loading them could run any code."""


def refuse_pickled_weights(folder: str | Path) -> None:
    """Raise `PickledWeights` for a folder that holds pickled weights and no safetensors ones."""
    folder = Path(folder)
    pickled = sorted(path for pattern in PICKLED_WEIGHTS for path in folder.glob(pattern))
    if pickled and not any(folder.glob("*.safetensors")):
        raise PickledWeights(
            f"{pickled[0]} holds pickled weights and the folder has no *.safetensors: dpe loads model "
            "weights from safetensors only (convert them: load in a trusted process, then save_pretrained)"
        )


def checkpoint_parameters(folder: str | Path) -> int:
    """Parameters stored in the safetensors files of `folder`, read from their headers alone.

    >>> import tempfile, torch, safetensors.torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     safetensors.torch.save_file({"w": torch.zeros(3, 4), "b": torch.zeros(4)}, f"{tmp}/model.safetensors")
    ...     checkpoint_parameters(tmp)
    16
    """
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total


ADAPTER_CONFIG = "adapter_config.json"
"""What makes a folder a LoRA adapter checkpoint (peft's file): it names the base folder the adapter applies to."""


def adapter_base(folder: str | Path) -> Path | None:
    """The base model folder of the adapter checkpoint in `folder` (None: a full model folder).

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> adapter_base(folder) is None
    True
    >>> _ = (folder / ADAPTER_CONFIG).write_text('{"base_model_name_or_path": "/models/base"}')
    >>> adapter_base(folder)
    PosixPath('/models/base')
    """
    config = Path(folder) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base model (base_model_name_or_path)")
    return Path(base)
