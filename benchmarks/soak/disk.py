"""A small disk for the checkpoint folder, and a ballast file that fills it.

Before the run the soak mounts a tmpfs of a few checkpoints' size at the trainer's checkpoint
folder (root only, and only where ``mount`` works: not in most unprivileged containers;
`mount_tmpfs` says why not otherwise and the disk-full fault is reported as skipped). The fault
itself is `fill`: a ballast file leaving less room than one checkpoint, so the next checkpoint
write fails; removing the ballast gives the room back.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> ballast = fill(folder, leave_bytes=free_bytes(folder))   # leaves everything: an empty ballast
    >>> ballast.name, ballast.stat().st_size
    ('.soak-ballast', 0)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BALLAST = ".soak-ballast"
"""The ballast's name in the checkpoint folder: hidden, and matching none of the trainer's folder patterns."""


def mount_tmpfs(folder: Path, size_mb: int) -> str | None:
    """Mount a tmpfs of `size_mb` MiB at `folder` (created); None once mounted, else why it was not."""
    if os.geteuid() != 0:
        return "not running as root: mounting a tmpfs at the checkpoint folder needs it"
    if shutil.which("mount") is None:
        return "no mount command on this machine"
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"mount -t tmpfs failed: {done.stderr.strip() or f'exit code {done.returncode}'}"
    return None


def unmount(folder: Path) -> None:
    """Unmount `folder` (lazily if something still holds it open)."""
    if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer can still put in `folder`'s filesystem."""
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def fill(folder: Path, leave_bytes: int) -> Path:
    """Write a ballast file into `folder` that leaves about `leave_bytes` free; its path."""
    ballast = folder / BALLAST
    size = max(0, free_bytes(folder) - leave_bytes)
    fd = os.open(ballast, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return ballast
