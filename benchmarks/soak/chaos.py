"""The faults a chaos soak puts the spiral through, on a seeded schedule, and how each is applied.

One pass (`schedule`) kills every service with SIGKILL in turn (weakness, evaluator, auditor,
agents, trainer, ingest) and, at seeded places among those kills, kills the trainer once more while
it writes a checkpoint, SIGSTOPs one consumer-group member for longer than its session timeout
(then SIGCONTs it), and fills the checkpoint folder's disk once. The faults are spread over the
chaos window at seeded times; a fault that takes long (waiting for a checkpoint write) delays the
next ones.

`Chaos.apply` applies one fault to the running spiral and says what happened (`FaultResult`): for
a kill, whether the supervisor started the service again; for the mid-checkpoint kill, which
half-written checkpoint was left and whether the restarted trainer cleared it; for the full disk,
how the failed write showed (the trainer exited, or said so in its log) before the ballast was
removed again.

Example:
    >>> [str(fault) for fault in schedule(seed=0, window_s=90.0, disk=False)][:3]
    ['kill -9 weakness', 'kill -9 evaluator', 'kill -9 auditor']
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from benchmarks.soak.disk import fill
from benchmarks.soak.processes import SERVICES, processes_by_role
from trainer.checkpoints import CheckpointStore

FaultKind = Literal["kill", "kill_mid_checkpoint", "stop", "disk_full"]

GROUP_MEMBERS = ("weakness", "evaluator", "auditor", "agents")
"""The services that consume in a Kafka consumer group: a SIGSTOP past the session timeout evicts them."""

BALLAST_LEAVES_BYTES = 1 << 20
"""Room the ballast leaves on the checkpoint disk: less than any checkpoint of the tiny model (~13 MB)."""


@dataclass(frozen=True)
class Fault:
    """One fault: when (seconds into the chaos window), what, and to which service."""

    at_s: float
    kind: FaultKind
    service: str

    def __str__(self) -> str:
        return {
            "kill": f"kill -9 {self.service}",
            "kill_mid_checkpoint": f"kill -9 {self.service} while it writes a checkpoint",
            "stop": f"SIGSTOP {self.service} past its session timeout, then SIGCONT",
            "disk_full": f"fill the checkpoint disk under the {self.service}",
        }[self.kind]


def schedule(seed: int, window_s: float, disk: bool) -> list[Fault]:
    """One pass of faults over `window_s` seconds (see the module docstring); `disk` adds the full disk.

    >>> faults = schedule(seed=3, window_s=300.0, disk=True)
    >>> [f.service for f in faults if f.kind == "kill"], len(faults), faults == schedule(3, 300.0, True)
    (['weakness', 'evaluator', 'auditor', 'agents', 'trainer', 'ingest'], 9, True)
    >>> all(0 <= a.at_s < b.at_s < 300 for a, b in zip(faults, faults[1:]))
    True
    """
    rng = random.Random(seed)
    kinds: list[tuple[FaultKind, str]] = [("kill", service) for service in SERVICES]
    special: list[tuple[FaultKind, str]] = [("kill_mid_checkpoint", "trainer"), ("stop", rng.choice(GROUP_MEMBERS))]
    if disk:
        special.append(("disk_full", "trainer"))
    for item in special:
        kinds.insert(rng.randint(0, len(kinds)), item)
    slot = window_s / len(kinds)
    return [Fault(round(index * slot + rng.uniform(0, slot / 2), 1), kind, service)
            for index, (kind, service) in enumerate(kinds)]


@dataclass(frozen=True)
class FaultResult:
    """What applying a fault did: when (soak seconds), in words, whether it went as it should, and whether it
    delivered a SIGKILL."""

    fault: Fault
    started_s: float
    ended_s: float
    outcome: str
    ok: bool
    killed: bool = False


@dataclass(frozen=True)
class ChaosSettings:
    """How long the chaos waits for things, and how long a SIGSTOP lasts."""

    stop_s: float
    """SIGSTOP to SIGCONT: longer than the consumer session timeout."""
    restart_timeout_s: float = 90.0
    write_timeout_s: float = 240.0
    """Longest wait for the trainer's next checkpoint write (mid-checkpoint kill, full disk)."""
    poll_s: float = 0.002
    """How often the checkpoint folder is looked at for a staging folder."""
    exit_grace_s: float = 30.0
    """How long a trainer whose write failed is given to exit before it counts as having survived."""


class Chaos:
    """Applies faults to the services of one `dpe run` process (`run`)."""

    def __init__(self, run: psutil.Process, store: CheckpointStore, trainer_log: Path, settings: ChaosSettings,
                 clock: Callable[[], float]):
        self.run = run
        self.store = store
        self.trainer_log = trainer_log
        self.settings = settings
        self.clock = clock

    async def apply(self, fault: Fault) -> FaultResult:
        """Apply `fault` and wait for its outcome."""
        started = self.clock()
        action = {"kill": self._kill, "kill_mid_checkpoint": self._kill_mid_checkpoint, "stop": self._stop,
                  "disk_full": self._fill_disk}[fault.kind]
        outcome, ok, killed = await action(fault.service)
        return FaultResult(fault, started, self.clock(), outcome, ok, killed)

    async def service(self, name: str, other_than: int | None = None) -> psutil.Process | None:
        """The running process of service `name` (one other than pid `other_than`), waiting for it up to the restart
        timeout; None if none comes."""
        deadline = time.monotonic() + self.settings.restart_timeout_s
        while time.monotonic() < deadline:
            for process in processes_by_role(self.run).get(name, []):
                if process.pid != other_than:
                    return process
            await asyncio.sleep(0.25)
        return None

    async def _restarted(self, name: str, pid: int, killed_at: float) -> tuple[str, bool]:
        again = await self.service(name, other_than=pid)
        if again is None:
            return f"not running again within {self.settings.restart_timeout_s:.0f}s", False
        return f"restarted as pid {again.pid} after {self.clock() - killed_at:.1f}s", True

    async def _kill(self, name: str) -> tuple[str, bool, bool]:
        process = await self.service(name)
        if process is None:
            return f"{name} was not running", False, False
        os.kill(process.pid, signal.SIGKILL)
        restarted, ok = await self._restarted(name, process.pid, self.clock())
        return f"pid {process.pid} killed; {restarted}", ok, True

    async def _kill_mid_checkpoint(self, name: str) -> tuple[str, bool, bool]:
        if await self.service(name) is None:
            return f"{name} was not running", False, False
        caught = await asyncio.to_thread(self._kill_when_staging, name)
        if caught is None:
            return f"no checkpoint write began within {self.settings.write_timeout_s:.0f}s", False, False
        pid, staging = caught
        left = staging.exists()
        restarted, ok = await self._restarted(name, pid, self.clock())
        cleared = await self._gone(staging)
        outcome = (f"pid {pid} killed while writing {staging.name} ({'left half-written' if left else 'already gone'});"
                   f" {restarted}; {'cleared' if cleared else 'NOT cleared'} by the restarted trainer")
        return outcome, ok and cleared, True

    def _kill_when_staging(self, name: str) -> tuple[int, Path] | None:
        """Watch the checkpoint folder for the next staging folder and SIGKILL the trainer the moment it appears
        (one left over from an earlier failed write does not count)."""
        deadline = time.monotonic() + self.settings.write_timeout_s
        stale = _identity(self.store.staging(self.store.next_version()))
        while time.monotonic() < deadline:
            staging = self.store.staging(self.store.next_version())
            found = _identity(staging)
            if found is not None and found != stale:
                for process in processes_by_role(self.run).get(name, []):
                    os.kill(process.pid, signal.SIGKILL)
                    return process.pid, staging
            time.sleep(self.settings.poll_s)
        return None

    async def _gone(self, path: Path) -> bool:
        """Whether `path` disappears within the write timeout."""
        deadline = time.monotonic() + self.settings.write_timeout_s
        while path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        return not path.exists()

    async def _new_checkpoint(self, before: set[Path]) -> str | None:
        """The name of a complete checkpoint not in `before`, waiting up to the write timeout for one."""
        deadline = time.monotonic() + self.settings.write_timeout_s
        while time.monotonic() < deadline:
            new = set(self.store.complete()) - before
            if new:
                return min(new).name
            await asyncio.sleep(0.5)
        return None

    async def _stop(self, name: str) -> tuple[str, bool, bool]:
        process = await self.service(name)
        if process is None:
            return f"{name} was not running", False, False
        os.kill(process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.settings.stop_s)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        await asyncio.sleep(self.settings.stop_s)
        alive = await self.service(name)
        state = ("still running" if alive is not None and alive.pid == process.pid else
                 f"running again as pid {alive.pid}" if alive is not None else "NOT running")
        return f"pid {process.pid} stopped for {self.settings.stop_s:.0f}s, continued; {state}", alive is not None, False

    async def _fill_disk(self, name: str) -> tuple[str, bool, bool]:
        process = await self.service(name)
        if process is None:
            return f"{name} was not running", False, False
        offset = self.trainer_log.stat().st_size if self.trainer_log.exists() else 0
        before = set(self.store.complete())
        ballast = fill(self.store.folder, BALLAST_LEAVES_BYTES)
        try:
            failure = await self._write_failure(process, offset, before)
            exited = failure is not None and await self._exits(process)
        finally:
            ballast.unlink()
        if failure is None:
            return f"no checkpoint write within {self.settings.write_timeout_s:.0f}s", False, False
        if failure.startswith("wrote"):
            return f"{failure} despite the full disk", False, False
        went_on = await self._new_checkpoint(set(self.store.complete()))
        trainer = "the trainer exited and was restarted" if exited else "the trainer kept running"
        after = (f"it went on: {went_on} written" if went_on else
                 f"NO checkpoint written within {self.settings.write_timeout_s:.0f}s")
        return f"{failure}; {trainer}; ballast removed; {after}", went_on is not None, False

    async def _write_failure(self, process: psutil.Process, log_offset: int, before: set[Path]) -> str | None:
        """How the next checkpoint write showed on the full disk: the trainer logged 'No space left on device',
        exited, or wrote one all the same; None if none of that happened within the write timeout."""
        deadline = time.monotonic() + self.settings.write_timeout_s
        while time.monotonic() < deadline:
            if "No space left on device" in _log_since(self.trainer_log, log_offset):
                return "the checkpoint write failed with 'No space left on device'"
            if not _alive(process):
                return "the trainer exited while the disk was full (no 'No space left on device' in its log)"
            new = set(self.store.complete()) - before
            if new:
                return f"wrote {', '.join(sorted(path.name for path in new))}"
            await asyncio.sleep(0.1)
        return None

    async def _exits(self, process: psutil.Process) -> bool:
        """Whether `process` exits within `exit_grace_s` (a failed write may end the trainer, slowly)."""
        deadline = time.monotonic() + self.settings.exit_grace_s
        while _alive(process) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return not _alive(process)


def _identity(path: Path) -> tuple[int, int] | None:
    """Inode and change time of `path` (None when it does not exist): a folder made anew under the same name differs."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_ctime_ns


def _alive(process: psutil.Process) -> bool:
    """Whether `process` runs (a zombie, dead but not yet reaped by its supervisor, does not)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _log_since(path: Path, offset: int) -> str:
    """What was appended to a log file after `offset` bytes."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
