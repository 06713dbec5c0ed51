"""Run several dpe services as child processes and shut them all down cleanly.

Each service is its own process (`python -m dpe serve NAME`), as in production, so a crash or a
kill -9 of one never takes the others down. The supervisor restarts a service that dies
unexpectedly (with backoff), telling `on_restart` about each restart, and, on stop, sends SIGTERM
to all, waits, then SIGKILLs stragglers. It gives up on a service that needed `max_restarts`
restarts within `window_s` (a crash loop), never on one that crashed now and then over a week.

Example:
    >>> sup = Supervisor(env=dict(os.environ, DPE_CONFIG="run.yaml"), log_dir=Path("/tmp"))  # doctest: +SKIP
    >>> sup.start(ServiceSpec("weakness", ["serve", "weakness"]))                                      # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dpe.lifecycle import die_with_parent


@dataclass(frozen=True)
class ServiceSpec:
    """A service: its name and the `dpe` arguments that run it."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    niceness: int = 0
    """Added to the process's nice value: a service off the critical path yields the CPU to the others."""


@dataclass(frozen=True)
class Restart:
    """A service that died and was started again: its exit code and its restarts within the window.

    >>> str(Restart("agents", 1, restarts=2, max_restarts=5, window_s=600))
    'service agents exited with code 1; restart 2 of 5 within 10 min'
    """

    name: str
    exit_code: int
    restarts: int
    max_restarts: int
    window_s: float

    def __str__(self) -> str:
        return (f"service {self.name} exited with code {self.exit_code}; "
                f"restart {self.restarts} of {self.max_restarts} within {self.window_s / 60:.0f} min")


def _in_child(niceness: int) -> None:
    """Before exec: die with the supervisor, at the spec's niceness."""
    die_with_parent()
    if niceness:
        os.nice(niceness)


@dataclass
class _Running:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes]
    started: float
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)
    """When the restarts within the window happened."""


class Supervisor:
    """Starts, watches, restarts and stops service processes; `env` is their whole environment.

    `on_restart`, when given, hears of every restart as it happens (`check`).
    """

    def __init__(self, env: dict[str, str], log_dir: Path, max_restarts: int = 5, window_s: float = 600.0,
                 on_restart: Callable[[Restart], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.env = env
        self.log_dir = log_dir
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.on_restart = on_restart
        self._running: dict[str, _Running] = {}
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, spec: ServiceSpec) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{spec.name}.log", "ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "dpe", *spec.args],
                env={**self.env, **spec.env},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=functools.partial(_in_child, spec.niceness),
            )
        finally:
            log.close()

    def start(self, spec: ServiceSpec) -> None:
        self._running[spec.name] = _Running(spec, self._spawn(spec), self.clock())

    def pid(self, name: str) -> int:
        return self._running[name].proc.pid

    def status(self) -> dict[str, str]:
        """Name -> 'running', 'restarting (n)' or 'exited (code)'."""
        out = {}
        for name, run in self._running.items():
            code = run.proc.poll()
            out[name] = "running" if code is None else f"exited ({code})"
            if code is None and run.restarts:
                out[name] = f"running (restarted {run.restarts}x)"
        return out

    def check(self) -> list[str]:
        """Restart services that died; returns the names of those given up on (too many restarts)."""
        failed = []
        for name, run in self._running.items():
            code = run.proc.poll()
            if code is None or code == 0:
                continue
            now = self.clock()
            while run.recent and now - run.recent[0] > self.window_s:
                run.recent.popleft()
            if len(run.recent) >= self.max_restarts:
                failed.append(name)
                continue
            backoff = min(10.0, 0.5 * 2 ** len(run.recent))
            if now - run.started >= backoff:
                run.proc = self._spawn(run.spec)
                run.started = now
                run.restarts += 1
                run.recent.append(now)
                if self.on_restart is not None:
                    self.on_restart(Restart(name, code, len(run.recent), self.max_restarts, self.window_s))
        return failed

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM everyone, wait up to `timeout_s`, then SIGKILL what is left."""
        for run in self._running.values():
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for run in self._running.values():
            try:
                run.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
