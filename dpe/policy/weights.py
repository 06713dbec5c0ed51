"""Which model weights dpe reads: safetensors only. Light (no torch), so that any service can check a folder.

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
