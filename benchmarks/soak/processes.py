"""The spiral under test as processes: `dpe run` started in its own session, its children found by role.

`dpe run` starts the embedded broker and every service as its own child process; a child's role
comes from its command line (``... serve NAME``, ``... ingest ...``, the broker's
``--listener-url``). The run is stopped with SIGTERM, never SIGINT: a child started from a
non-interactive shell ignores SIGINT, and SIGTERM is what ``docker stop`` and systemd send.

Example:
    >>> role_of(["python", "-m", "dpe", "--log-level", "INFO", "serve", "trainer"])
    'trainer'
    >>> role_of(["python", "-m", "dpe", "--log-level", "INFO", "ingest", "--synthetic"])
    'ingest'
    >>> role_of(["/root/.calfkit/bin/tansu", "broker", "--listener-url", "tcp://127.0.0.1:4000"])
    'broker'
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

SERVICES = ("weakness", "evaluator", "auditor", "agents", "trainer", "ingest")
"""The services of `dpe run`, in the order the soak kills them."""
RUN = "run"
BROKER = "broker"


def role_of(args: Sequence[str]) -> str | None:
    """The role of one of `dpe run`'s children from its command line (None: not one of the spiral's)."""
    if "serve" in args[:-1]:
        return args[list(args).index("serve") + 1]
    if "ingest" in args:
        return "ingest"
    if "--listener-url" in args:
        return BROKER
    return None


def processes_by_role(run: psutil.Process) -> dict[str, list[psutil.Process]]:
    """The run's direct children by role (a roll of the bus may briefly show two brokers)."""
    found: dict[str, list[psutil.Process]] = defaultdict(list)
    for child in run.children():
        try:
            role = role_of(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if role is not None:
            found[role].append(child)
    return dict(found)


@dataclass(frozen=True)
class SpiralCommand:
    """How the soak runs the spiral: `dpe run --forever --no-live` with small rounds, in a known folder."""

    run_dir: Path
    round_samples: int = 24
    bus_memory_mb: float | None = None
    """Roll the embedded broker past this resident memory (None: `dpe run`'s default)."""
    base_model: Path | None = None
    """A local model folder to start from (None: `dpe run`'s warmed tiny model)."""

    def args(self) -> list[str]:
        """The command line.

        >>> SpiralCommand(Path("runs/s1")).args()[3:]
        ['run', '--forever', '--no-live', '--round-samples', '24', '--runs-dir', 'runs', '--run-id', 's1']
        >>> SpiralCommand(Path("runs/s1"), bus_memory_mb=300, base_model=Path("m")).args()[-4:]
        ['--bus-memory-mb', '300', '--base-model', 'm']
        """
        bound = ["--bus-memory-mb", f"{self.bus_memory_mb:g}"] if self.bus_memory_mb is not None else []
        model = ["--base-model", str(self.base_model)] if self.base_model is not None else []
        return [sys.executable, "-m", "dpe", "run", "--forever", "--no-live", "--round-samples",
                str(self.round_samples), "--runs-dir", str(self.run_dir.parent), "--run-id", self.run_dir.name,
                *bound, *model]

    def start(self, log: Path) -> subprocess.Popen[bytes]:
        """Start the run in its own session (a signal meant for the soak never reaches it), output to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            return subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> int:
    """SIGTERM the run and wait for its exit code; past `timeout_s`, SIGKILL its whole session (code -9)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -signal.SIGKILL
