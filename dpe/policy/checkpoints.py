"""Announced checkpoints as their readers see them: where a URI points, loading it, the newest one on the bus.

The evaluator, the auditor and the difficulty band load policies only through `load_checkpoint`.
torch and transformers are imported when a policy is loaded, not when this module is.

Example:
    >>> checkpoint_folder("file:///ckpt/3")
    PosixPath('/ckpt/3')
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.config import CoreSettings
from dpe.events import Checkpoint

if TYPE_CHECKING:
    from dpe.policy.model import Policy


def checkpoint_folder(uri: str) -> Path:
    """The local folder a checkpoint URI names (a path or a ``file://`` URL); other schemes are refused."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        raise ValueError(f"checkpoint URI {uri!r}: only local folders can be loaded")
    return Path(uri)


def load_checkpoint(uri: str) -> "Policy":
    """The policy saved at `uri` (a folder path or a ``file://`` URL)."""
    from dpe.policy.model import load_policy

    return load_policy(checkpoint_folder(uri))


async def latest_checkpoint(settings: CoreSettings, *, service: str, timeout_ms: int = 500) -> Checkpoint | None:
    """The checkpoint with the highest policy version on the bus (read from the start, without a group)."""
    async with AsyncPublisher(settings, producer_name=service) as publisher, AsyncSubscriber(
        settings, [Checkpoint], group_id=None, service=service, publisher=publisher, subscribe=False, read_only=True
    ) as subscriber:
        await subscriber.assign_all()
        latest: Checkpoint | None = None
        while deliveries := await subscriber.fetch(timeout_ms=timeout_ms):
            for delivery in deliveries:
                if latest is None or delivery.event.policy_version >= latest.policy_version:
                    latest = delivery.event
        return latest
