"""Checkpoints written atomically, verified on load, pruned to the last K.

A checkpoint is a folder ``v00000007`` holding a loadable model folder (weights, processor), the
optimiser state, and ``manifest.json``: the `Checkpoint` event that announces it (version, parent,
offset ranges and ids of the samples it trained on), the next offset to read in every partition,
the ids skipped with their reason, the recently trained ids (for dedup), and the size and sha256
of every file. It is written into ``.partial-v00000007``, fsynced, then renamed into place, so a
reader sees a complete checkpoint or none.

`CheckpointStore.latest` returns the newest checkpoint that verifies. A half-written folder (a kill
during the write) is removed; a complete-looking one that fails verification is moved aside to
``.corrupt-v…`` with a warning and the previous one is used. Version numbers are never reused.

Example:
    >>> import tempfile
    >>> store = CheckpointStore(Path(tempfile.mkdtemp()), keep_last=2)
    >>> store.latest() is None, store.next_version()
    (True, 1)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from dpe.events import Checkpoint

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ANNOUNCED = "announced"
FORMAT_VERSION = 1
_COMPLETE = re.compile(r"^v(\d{8})$")
_ANY_VERSION = re.compile(r"^(?:\.corrupt-)?v(\d{8})(?:-\d+)?$")


class FileDigest(BaseModel):
    """Size and sha256 of one file of a checkpoint."""

    model_config = ConfigDict(frozen=True)

    size: int = Field(ge=0)
    sha256: str


class Manifest(BaseModel):
    """Everything a restart needs besides the weights and optimiser files."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format_version: int = FORMAT_VERSION
    event: SerializeAsAny[Checkpoint] = Field(
        description="The announcement, stored so a re-announcement is identical: a `Checkpoint`, or the kind the "
        "trainer's task announces (an `AuditorCheckpoint`, whose own fields are stored too)."
    )
    positions: dict[str, dict[int, int]] = Field(description="Topic -> partition -> next offset to read.")
    cluster_id: str | None = Field(None, description="The bus `positions` were read on; elsewhere they mean nothing.")
    global_step: int = Field(ge=0)
    skipped: dict[str, list[str]] = Field(default_factory=dict, description="Reason -> sample ids not trained.")
    recent_ids: list[str] = Field(default_factory=list, description="Recently trained ids, oldest first (dedup).")
    files: dict[str, FileDigest] = Field(default_factory=dict)

    @property
    def policy_version(self) -> int:
        return self.event.policy_version


class CorruptCheckpoint(Exception):
    """A checkpoint folder that does not verify against its manifest."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """A complete, verified checkpoint on disk."""

    path: Path
    manifest: Manifest

    @property
    def version(self) -> int:
        return self.manifest.policy_version

    @property
    def announced(self) -> bool:
        return (self.path / ANNOUNCED).exists()


def folder_name(version: int) -> str:
    """The folder of a complete checkpoint.

    Example:
        >>> folder_name(7)
        'v00000007'
    """
    return f"v{version:08d}"


def file_digest(path: Path) -> FileDigest:
    """Size and sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return FileDigest(size=path.stat().st_size, sha256=digest.hexdigest())


def verify(path: Path, announces: type[Checkpoint] = Checkpoint) -> Manifest:
    """The manifest of checkpoint folder `path`, its event read as `announces`; raises `CorruptCheckpoint` naming
    what is wrong."""
    try:
        data = json.loads((path / MANIFEST).read_bytes())
        if not isinstance(data, dict):
            raise CorruptCheckpoint(f"{path}/{MANIFEST} is not a JSON object")
        manifest = Manifest.model_validate({**data, "event": announces.model_validate(data.get("event"))})
    except FileNotFoundError as error:
        raise CorruptCheckpoint(f"{path} has no {MANIFEST}") from error
    except ValidationError as error:
        raise CorruptCheckpoint(f"{path}/{MANIFEST} is unreadable: {error.errors()[0]['msg']}") from error
    except ValueError as error:  # not JSON, or not UTF-8
        raise CorruptCheckpoint(f"{path}/{MANIFEST} is not JSON: {error}") from error
    if manifest.format_version != FORMAT_VERSION:
        raise CorruptCheckpoint(f"{path} has manifest format {manifest.format_version}, expected {FORMAT_VERSION}")
    if path.name != folder_name(manifest.policy_version):
        raise CorruptCheckpoint(f"{path} holds policy version {manifest.policy_version}")
    if not manifest.files:
        raise CorruptCheckpoint(f"{path}/{MANIFEST} lists no files")
    for name, expected in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{path} is missing {name}")
        if file.stat().st_size != expected.size:
            raise CorruptCheckpoint(f"{path}/{name} has {file.stat().st_size} bytes, expected {expected.size}")
        if file_digest(file).sha256 != expected.sha256:
            raise CorruptCheckpoint(f"{path}/{name} does not match its sha256")
    return manifest


class CheckpointStore:
    """The checkpoint folder of one trainer, whose checkpoints are announced as `announces`."""

    def __init__(self, folder: Path, keep_last: int, announces: type[Checkpoint] = Checkpoint):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.announces = announces
        self.folder.mkdir(parents=True, exist_ok=True)

    def staging(self, version: int) -> Path:
        """The folder a checkpoint of `version` is written into before `commit` (the same on every rank)."""
        return self.folder / f".partial-{folder_name(version)}"

    def begin(self, version: int) -> Path:
        """A fresh, empty staging folder for `version`."""
        staging = self.staging(version)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def commit(self, staging: Path, manifest: Manifest) -> StoredCheckpoint:
        """Digest and fsync the staged files, write the manifest, rename into place, prune old checkpoints."""
        files = {}
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            _fsync(file)
            files[file.relative_to(staging).as_posix()] = file_digest(file)
        manifest = manifest.model_copy(update={"files": files})
        (staging / MANIFEST).write_text(manifest.model_dump_json())
        _fsync(staging / MANIFEST)
        for folder in sorted({p.parent for p in staging.rglob("*")}, key=lambda p: len(p.parts), reverse=True):
            _fsync(folder)
        final = self.folder / folder_name(manifest.policy_version)
        os.rename(staging, final)
        _fsync(self.folder)
        self.prune()
        return StoredCheckpoint(final, manifest)

    def mark_announced(self, checkpoint: StoredCheckpoint) -> None:
        """Record that the checkpoint's event was acknowledged by the broker."""
        (checkpoint.path / ANNOUNCED).touch()

    def complete(self) -> list[Path]:
        """Folders of complete checkpoints (not yet verified), oldest first."""
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and _COMPLETE.match(p.name))

    def latest(self) -> StoredCheckpoint | None:
        """The newest checkpoint that verifies; half-written ones are removed, corrupt ones moved aside."""
        for partial in self.folder.glob(".partial-*"):
            log.warning("removing half-written checkpoint %s (the trainer stopped while writing it)", partial)
            shutil.rmtree(partial, ignore_errors=True)
        for path in reversed(self.complete()):
            try:
                return StoredCheckpoint(path, verify(path, self.announces))
            except CorruptCheckpoint as error:
                aside = self.folder / f".corrupt-{path.name}-{int(time.time())}"
                os.rename(path, aside)
                log.error("checkpoint %s is corrupt (%s); moved to %s, falling back to the previous one",
                          path, error, aside)
        return None

    def next_version(self) -> int:
        """One more than any version ever written here, corrupt ones included (versions are never reused)."""
        versions = [int(m.group(1)) for p in self.folder.iterdir() if (m := _ANY_VERSION.match(p.name))]
        return max(versions, default=0) + 1

    def prune(self) -> None:
        """Delete all but the newest `keep_last` complete checkpoints."""
        for path in self.complete()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
