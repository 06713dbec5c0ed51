"""The run's bus: the configured Kafka, or an embedded broker replaced by a fresh one before it grows too big.

The embedded broker keeps every record in memory, with no retention. `RunBus` watches its resident
memory; past `memory_mb` the run stops its services, carries the bus's state over to a fresh broker
(`dpe.bus.carry`: unconsumed records, each compacted key's latest, group offsets) and starts them
again: a roll, a pause of seconds. The same state is saved in ``<run>/bus/state.jsonl.gz`` whenever
the run stops, so ``dpe run --resume`` goes on from it. ``<run>/bus.json`` says where the bus is now
(its bootstrap servers and epoch: rolls so far) for anyone watching from outside.

A configured external Kafka is never rolled, saved or restored: it has retention and keeps its data.

Example:
    >>> bus = RunBus(settings, run_dir, memory_mb=1024, max_tail=20_000)   # doctest: +SKIP
    >>> bus.start(resume=False).bootstrap                                  # doctest: +SKIP
    '127.0.0.1:40123'
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import psutil

from dpe.broker import EmbeddedBroker
from dpe.bus.carry import BusState, load_state, read_state, save_state, write_state
from dpe.config import CoreSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roll:
    """One replacement of the embedded broker, said in words in the run's log."""

    epoch: int
    rss_mb: float
    carried: int
    dropped: int

    def __str__(self) -> str:
        dropped = f", {self.dropped} unconsumed records past the tail bound dropped" if self.dropped else ""
        return (f"bus rolled to epoch {self.epoch}: the embedded broker held {self.rss_mb:.0f} MB; "
                f"{self.carried} records carried to a fresh one{dropped}")


class RunBus:
    """The bus of one run folder (see the module docstring)."""

    def __init__(self, settings: CoreSettings, run_dir: Path, *, memory_mb: float | None, max_tail: int):
        self.settings = settings
        self.run_dir = run_dir
        self.memory_mb = memory_mb
        self.max_tail = max_tail
        self.epoch = 0
        self.baseline_mb = 0.0
        """The broker's resident memory right after it started and took the carried state."""
        self._broker: EmbeddedBroker | None = None
        self._external = settings.kafka.bootstrap_servers

    @property
    def state_path(self) -> Path:
        return self.run_dir / "bus" / "state.jsonl.gz"

    @property
    def bootstrap(self) -> str:
        if self._external:
            return self._external
        if self._broker is None:
            raise RuntimeError("the run's bus is not started")
        return self._broker.bootstrap_servers

    @property
    def embedded(self) -> bool:
        return not self._external

    def start(self, *, resume: bool) -> RunBus:
        """Start the embedded broker (restoring the saved state when `resume`); nothing for an external Kafka."""
        if self.embedded:
            state = self._saved_state() if resume else None
            self._start_broker(state)
        if resume and self.location_path.is_file():
            self.epoch = int(json.loads(self.location_path.read_text())["epoch"]) + 1
        self._write_location()
        return self

    def _saved_state(self) -> BusState:
        if not self.state_path.is_file():
            raise FileNotFoundError(f"no saved bus at {self.state_path}: was the run stopped by Ctrl-C, SIGTERM "
                                    "or its timeout? (a killed run saves nothing; start a new one)")
        state = load_state(self.state_path)
        log.info("resuming the bus of %s: %d records, %d groups", self.state_path, state.records, len(state.groups))
        return state

    def _start_broker(self, state: BusState | None) -> None:
        log_path = self.run_dir / "logs" / "broker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._broker = EmbeddedBroker(log_path=log_path).start()
        if state is not None:
            write_state(self.settings, self._broker.bootstrap_servers, state)
        self.baseline_mb = self.rss_mb() or 0.0
        if self.memory_mb is not None and self.baseline_mb > self.memory_mb / 2:
            log.warning("the carried bus alone holds %.0f MB, over half of bus_memory_mb (%.0f): the broker will be "
                        "rolled less often than asked; raise the bound or lower bus_max_tail", self.baseline_mb,
                        self.memory_mb)

    @property
    def location_path(self) -> Path:
        return self.run_dir / "bus.json"

    def _write_location(self) -> None:
        path = self.location_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bootstrap_servers": self.bootstrap, "epoch": self.epoch,
                                   "embedded": self.embedded}))
        tmp.replace(path)

    def rss_mb(self) -> float | None:
        """The embedded broker's resident memory in MB (None for an external Kafka)."""
        if self._broker is None or self._broker.pid is None:
            return None
        try:
            return psutil.Process(self._broker.pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            return None

    def due(self) -> bool:
        """Whether the embedded broker has outgrown `memory_mb` and a roll would free at least half of it
        (it never rolls in a loop when the carried state alone is large)."""
        rss = self.rss_mb()
        if self.memory_mb is None or rss is None:
            return False
        return rss > self.memory_mb and rss - self.baseline_mb > self.memory_mb / 2

    def save(self) -> BusState | None:
        """Save the embedded bus's state for a resume (call with every writer stopped)."""
        if self._broker is None:
            return None
        state = read_state(self.settings, self._broker.bootstrap_servers, max_tail=self.max_tail)
        save_state(state, self.state_path)
        return state

    def roll(self) -> Roll:
        """Carry the embedded bus over to a fresh broker (call with every service stopped)."""
        rss = self.rss_mb() or 0.0
        state = self.save()
        assert state is not None, "only an embedded bus rolls"
        self._stop_broker()
        self._start_broker(state)
        self.epoch += 1
        self._write_location()
        return Roll(self.epoch, rss, state.records, state.dropped)

    def _stop_broker(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.stop()

    def stop(self, *, save: bool = True) -> None:
        """Save the embedded bus for ``--resume`` (unless not to `save`) and stop its broker."""
        try:
            if save and self._broker is not None and self._broker.pid is not None:
                self.save()
        finally:
            self._stop_broker()
