"""How every long-running process starts and stops: one stop event for SIGINT and SIGTERM, metrics, logs,
and children that never outlive their parent.

A service's main coroutine takes a `stop` event and returns once it is set; `run_until_stopped`
runs it in a fresh event loop with SIGINT (Ctrl-C) and SIGTERM (``docker stop``, systemd, the
supervisor) both setting it, so every service stops the same way, after finishing what it holds.
A process that starts children (the supervisor of ``dpe run``, the embedded broker) starts them
with `die_with_parent`, so that a parent killed with SIGKILL leaves no orphans behind.

Example:
    >>> async def main(stop):
    ...     stop.set()           # a real service waits for a signal here
    ...     return "stopped"
    >>> run_until_stopped(main)
    'stopped'
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dpe.config import CoreSettings
from monitoring.metrics import serve_metrics

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_event() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets (call it inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    return stop


def run_until_stopped(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run `main(stop)` in a fresh event loop, `stop` being set by SIGINT or SIGTERM; its result."""

    async def runner() -> T:
        return await main(stop_event())

    return asyncio.run(runner())


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child, before exec: the kernel sends it SIGTERM when its parent dies (Linux; elsewhere a no-op).

    Pass it as ``preexec_fn`` to `subprocess.Popen`; the child then stops as on ``docker stop``.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def sigterm_interrupts() -> None:
    """Make SIGTERM stop this process the way Ctrl-C does (as `KeyboardInterrupt`): for a foreground command
    such as ``dpe run``, whose Ctrl-C path stops its children and still writes its report."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


QUIET_LOGGERS = {"kafka.net.selector": logging.ERROR}
"""Library loggers whose warnings say nothing to a user (kafka-python timing its own event loop)."""


def configure_logging(level: str) -> None:
    """Log lines with time, level and logger at `level`; the `QUIET_LOGGERS` only from their level up."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)


def start_service(settings: CoreSettings, service_port: int) -> None:
    """Log at the configured level and expose /metrics on the service's port (``metrics.port`` overrides;
    0 for a service that serves them itself)."""
    configure_logging(settings.log_level)
    serve_metrics(settings.metrics.port_for(service_port), settings.metrics.addr)
