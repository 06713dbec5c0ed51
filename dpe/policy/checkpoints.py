"""Announced checkpoints as their readers see them: where a URI points, loading it, the newest one on the bus.

The evaluator, the auditor and the difficulty band load policies only through `load_checkpoint`.
A URI read from the bus is loaded only from inside the allowed checkpoint roots (`allowed_roots`:
``<home>/checkpoints``, the model cache and ``checkpoint_roots``), symlinks and ``..`` resolved
first; anything else is refused (`CheckpointOutsideRoots`) before a file is read, and so is a folder
whose only weights are pickled (`PickledWeights`). `loadable_folder` makes both checks without
loading anything, for readers that only need to know whether a checkpoint is one they would load.
torch and transformers are imported when a policy is loaded, not when this module is.

Example:
    >>> checkpoint_folder("file:///ckpt/3")
    PosixPath('/ckpt/3')
    >>> checkpoint_folder("/ckpt/../etc", roots=[Path("/ckpt")])
    Traceback (most recent call last):
    ...
    dpe.policy.checkpoints.CheckpointOutsideRoots: checkpoint '/ckpt/../etc' is /etc, outside the checkpoint roots /ckpt
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.config import CoreSettings, PlacementSettings
from dpe.events import Checkpoint
from dpe.policy.weights import PickledWeights, adapter_base, refuse_pickled_weights

if TYPE_CHECKING:
    from dpe.policy.model import Policy


class CheckpointOutsideRoots(ValueError):
    """A checkpoint URI that names a folder outside every allowed checkpoint root: never loaded."""


REFUSALS: tuple[type[ValueError], ...] = (CheckpointOutsideRoots, PickledWeights)
"""Why an announced checkpoint is refused before any of it is read (`loadable_folder`)."""


def allowed_roots(settings: CoreSettings) -> tuple[Path, ...]:
    """The folders announced checkpoints may be loaded from: ``<home>/checkpoints`` (the trainer's), the
    model cache (warmed base models, `dpe run`'s among them) and the configured ``checkpoint_roots``.

    Example:
        >>> roots = allowed_roots(CoreSettings(home="/data/home", checkpoint_roots=["/models"]))
        >>> roots[0], roots[-1]
        (PosixPath('/data/home/checkpoints'), PosixPath('/models'))
    """
    from dpe.policy.warmup import default_cache_dir

    return (settings.home / "checkpoints", default_cache_dir(), *settings.checkpoint_roots)


def checkpoint_folder(uri: str, roots: Sequence[Path] | None = None) -> Path:
    """The local folder a checkpoint URI names (a path or a ``file://`` URL), symlinks and ``..`` resolved.

    Given `roots`, a folder outside all of them is refused (`CheckpointOutsideRoots`); other schemes
    than ``file`` always are.
    """
    if uri.startswith("file://"):
        folder = Path(uri.removeprefix("file://")).resolve()
    elif "://" in uri:
        raise ValueError(f"checkpoint URI {uri!r}: only local folders can be loaded")
    else:
        folder = Path(uri).resolve()
    if roots is not None and not any(folder.is_relative_to(root.resolve()) for root in roots):
        shown = ", ".join(str(root) for root in roots)
        raise CheckpointOutsideRoots(f"checkpoint {uri!r} is {folder}, outside the checkpoint roots {shown}")
    return folder


def loadable_folder(uri: str, roots: Sequence[Path] | None = None) -> Path:
    """The folder `load_checkpoint` would load for `uri`; raises one of `REFUSALS` for a folder outside `roots`
    or one whose only weights are pickled (for an adapter checkpoint, the same for its base). Nothing is loaded.

    Example:
        >>> loadable_folder("/ckpt/../etc", roots=[Path("/ckpt")])
        Traceback (most recent call last):
        ...
        dpe.policy.checkpoints.CheckpointOutsideRoots: checkpoint '/ckpt/../etc' is /etc, outside the checkpoint roots /ckpt
    """
    folder = checkpoint_folder(uri, roots)
    refuse_pickled_weights(folder)
    base = adapter_base(folder)
    if base is not None:
        refuse_pickled_weights(checkpoint_folder(str(base), roots))
    return folder


def load_checkpoint(uri: str, *, roots: Sequence[Path] | None = None,
                    placement: PlacementSettings = PlacementSettings()) -> "Policy":
    """The policy saved at `uri` (a folder path or a ``file://`` URL), refused outside `roots` or with pickled
    weights only (`loadable_folder`), loaded where `placement` (the settings' ``placement``) puts it.

    `roots` is None only for a folder the operator configured (a base policy, a reference model),
    never for a URI read from the bus: pass `allowed_roots` of the settings.
    """
    from dpe.policy.model import load_policy

    return load_policy(loadable_folder(uri, roots), placement)


async def latest_checkpoint(settings: CoreSettings, *, service: str, timeout_ms: int = 500) -> Checkpoint | None:
    """The checkpoint with the highest policy version on the bus (read from the start, without a group)."""
    async with AsyncPublisher(settings, producer_name=service) as publisher, AsyncSubscriber(
        settings, [Checkpoint], group_id=None, service=service, publisher=publisher, subscribe=False, read_only=True
    ) as subscriber:
        await subscriber.assign_all()
        latest: Checkpoint | None = None
        async for deliveries in subscriber.until_end(timeout_ms=timeout_ms):
            for delivery in deliveries:
                if latest is None or delivery.event.policy_version >= latest.policy_version:
                    latest = delivery.event
        return latest
