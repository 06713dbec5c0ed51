"""Run the whole spiral on one machine: bus, base model, every service, live view, report.

`run_spiral` starts the embedded broker (unless Kafka is configured), makes sure the warmed tiny
base model exists (cached by recipe), writes the run's configuration, starts each service as its
own process under a `Supervisor` (the trainer announces the base model as policy version 0), and
watches the topics (read-only) until the trainer has published `rounds` checkpoints and the
evaluator has graded the last one on the held-out suite. It then stops every service and writes
``summary.json`` and ``report.html`` into ``runs/<id>/``.

Always on: when the embedded broker outgrows ``bus_memory_mb`` the services are stopped, the bus is
carried over to a fresh broker and they start again (`dpe.spiral.bus`). Whenever the run stops
(done, Ctrl-C, SIGTERM, timeout) it saves its bus and history (``state.json``), so
``dpe run --resume <id>`` goes on with the same options, checkpoints, version numbers, weakness
state and plans.

With a terminal it shows a live view; without one (``--no-live``, or output to a file or a pipe)
it prints one line per round (`RoundLog`) and one per service restart instead.

The run's ``config.yaml`` holds no secret: the services get theirs by environment (`dpe.config.child_env`).

Example:
    >>> result = run_spiral(Settings.load(), SpiralOptions(rounds=3))   # doctest: +SKIP
    >>> result.rounds[-1].heldout_accuracy                              # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.live import Live

from dpe.broker import free_port
from dpe.bus.admin import ensure_topics
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.config import child_env, with_overrides, write_config
from dpe.events import (
    AcceptedSample,
    Checkpoint,
    EvalOutcome,
    FailureTypes,
    QuotaPlan,
    RejectedSample,
    WeaknessSnapshot,
)
from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up
from dpe.settings import Settings, section_of
from dpe.spiral.bus import RunBus
from dpe.spiral.report import write_report
from dpe.spiral.state import RoundRecord, SpiralState
from dpe.spiral.view import RoundLog, StallLog, render_view
from dpe.supervisor import ServiceSpec, Supervisor

OBSERVED = [EvalOutcome, AcceptedSample, RejectedSample, Checkpoint, WeaknessSnapshot, QuotaPlan, FailureTypes]


@dataclass(frozen=True)
class SpiralOptions:
    """What one run does; the services' own behaviour comes from `Settings`."""

    rounds: int | None = 3
    round_samples: int = 240
    round_timeout_s: float = 300.0
    """A round the agents cannot fill in this time is trained with what it has (data short of a capability)."""
    strategy: str | None = None
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    runs_dir: Path = Path("runs")
    ingest_rate: float = 40.0
    images: Path | None = None
    """A folder of images ingested once (beside the synthetic stream only with `synthetic`)."""
    watch: Path | None = None
    """A folder watched for new images for as long as the run lasts."""
    synthetic: bool | None = None
    """Ingest the synthetic world's endless stream (None: only when no folder is given)."""
    auditor: bool = True
    auditor_trainer: bool = False
    """Also train the auditor model (`dpe serve auditor-trainer`, in the background): a second GRPO trainer."""
    difficulty: bool = True
    """The agents keep only samples the current policy solves 3-7 times of 9 (`agents.qc.difficulty`), which GRPO
    can learn from; capabilities out of its reach give their quota room to the others."""
    live: bool = True
    stall_after_s: float = 900.0
    """No new policy version for this long is a stall, said in words in the view, the log and the report."""
    timeout_s: float | None = 1800.0
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    base_model: Path | None = None
    """A local model folder to start from instead of the warmed tiny model."""
    lora: int | None = None
    """Train a LoRA adapter of this rank instead of every weight (None: as the settings say, ``trainer.lora``)."""
    inference: Literal["local", "server"] | None = None
    """``server``: the run starts a policy server (`dpe serve policy`) and the evaluator, the difficulty band and the
    auditor ask it for each version's answers; ``local``: each loads its own copy (None: as ``inference.mode``
    says, with the server it names)."""
    bus_memory_mb: float | None = 1024.0
    """The embedded broker is rolled (its state carried over to a fresh one) past this resident memory."""
    bus_max_tail: int = 20_000
    """Most unconsumed records per partition a roll or a resume carries over (older ones are dropped)."""
    resume: bool = False
    """Go on with the stopped run `run_id`: its options, bus, checkpoints and history (`resumed`)."""
    keep_bus: bool = True
    """Save the embedded bus when the run stops, for a resume (tens of seconds once the weakness tables'
    changelogs are long; an experiment, whose runs are never resumed, skips it)."""

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_id

    def save(self) -> None:
        """Write the options a resume goes on with to ``<run>/run.json``."""
        kept = {name: getattr(self, name) for name in RESUMED_OPTIONS}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run.json").write_text(json.dumps(to_jsonable_python(kept), indent=1))

    @classmethod
    def resumed(cls, runs_dir: Path, run_id: str, **now: Any) -> "SpiralOptions":
        """The options of the stopped run `run_id`, with `now`'s (how to show and bound this session) on top."""
        path = runs_dir / run_id / "run.json"
        if not path.is_file():
            raise FileNotFoundError(f"no run to resume at {path} (was it started with `dpe run`?)")
        saved = json.loads(path.read_text())
        for name in ("base_model", "images", "watch"):
            saved[name] = Path(saved[name]) if saved.get(name) else None
        return cls(runs_dir=runs_dir, run_id=run_id, resume=True, **saved, **now)


RESUMED_OPTIONS = ("rounds", "round_samples", "round_timeout_s", "strategy", "ingest_rate", "images", "watch",
                   "synthetic", "auditor", "auditor_trainer", "difficulty", "stall_after_s", "base_model", "lora",
                   "inference", "bus_memory_mb", "bus_max_tail")
"""What a resumed run keeps of the run it goes on with (the rest says how this session shows and ends)."""


STATE_FILE = "state.json"
"""The run's history (`SpiralState.to_json`), written whenever it stops or rolls; a resume starts from it."""


@dataclass
class SpiralResult:
    run_dir: Path
    rounds: list[RoundRecord]
    seconds: float
    completed: bool
    samples_by_origin: dict[str, dict[str, int]]
    """Accepted and rejected samples by origin (`SpiralState.by_origin`)."""


INGEST_BACKLOG = 2000
"""Unconsumed unlabeled items the run's endless synthetic ingest stays under (`ingest.max_backlog`)."""


def run_settings(settings: Settings, options: SpiralOptions, bootstrap: str, base_model: Path) -> Settings:
    """The settings every service of this run reads: the user's, plus the run's bus, folders, model and rounds.

    The base model's folder joins the checkpoint roots: version 0 is announced from there. With ``--inference
    server`` the run's policy server listens on a loopback port free at the time, and every service asks it.

    A round is one policy version: its plan is made once the evaluator has graded the version's
    round suite, and the trainer closes it when the plan's `round_samples` samples have arrived (or
    `round_timeout_s` after its first sample, when the unlabeled data cannot fill the plan).
    """
    home = options.run_dir / "home"
    synthetic = settings.evaluator.synthetic
    quotas: dict[str, Any] = {"budget": options.round_samples,
                              "round_evidence": synthetic.round_items if synthetic is not None else 0}
    if options.strategy is not None:
        quotas["strategy"] = options.strategy
    overrides: dict[str, Any] = {
        "home": str(home),
        "checkpoint_roots": [*map(str, settings.checkpoint_roots), str(base_model)],
        "kafka": {"bootstrap_servers": bootstrap},
        "blob": {"url": str(home / "blobs")},
        "stream": {"quotas": quotas},
        "ingest": {"max_backlog": INGEST_BACKLOG},
        "trainer": {"base_model": str(base_model),
                    "rounds": {"max_samples": options.round_samples, "max_seconds": options.round_timeout_s}},
    }
    if options.lora is not None:
        overrides["trainer"]["lora"] = {"rank": options.lora}
    if options.inference == "server":
        port = free_port()
        overrides["policy"] = {"host": "127.0.0.1", "port": port}
        overrides["inference"] = {"mode": "server", "url": f"http://127.0.0.1:{port}/v1",
                                  "model": settings.policy.model_name}
    elif options.inference == "local":
        overrides["inference"] = {"mode": "local"}
    return with_overrides(settings, overrides)


BACKGROUND = frozenset({"auditor", "auditor-trainer", "ingest", "ingest-watch", "ingest-images"})
"""Services no round waits for: the plan follows the evaluator's grades, and ingest keeps a backlog ahead."""
BACKGROUND_NICENESS = 10
"""They run at this niceness, so on a small machine the round's own work (grading, agents, training) comes first."""


def service_specs(options: SpiralOptions, base_model: Path) -> list[ServiceSpec]:
    """The services of the spiral, each run as ``python -m dpe ...``."""
    specs = [
        *([ServiceSpec("policy", ["serve", "policy"])] if options.inference == "server" else []),
        ServiceSpec("weakness", ["serve", "weakness"]),
        ServiceSpec("evaluator", ["serve", "evaluator"]),
        ServiceSpec("agents", ["serve", "agents", "--base-policy", str(base_model),
                               "--difficulty" if options.difficulty else "--no-difficulty"]),
        ServiceSpec("trainer", ["serve", "trainer"]),
        *ingest_specs(options),
    ]
    if options.auditor:
        specs.append(ServiceSpec("auditor", ["serve", "auditor"]))
    if options.auditor_trainer:
        specs.append(ServiceSpec("auditor-trainer", ["serve", "auditor-trainer"]))
    return [ServiceSpec(spec.name, ["--log-level", "INFO", *spec.args],
                        niceness=BACKGROUND_NICENESS if spec.name in BACKGROUND else 0) for spec in specs]


def ingest_specs(options: SpiralOptions) -> list[ServiceSpec]:
    """The run's ingest services: the synthetic stream, a watched folder, a folder read once (`images`).

    The synthetic stream runs unless a folder is given (`synthetic` None) or `synthetic` says otherwise.
    Each extra ingest process has its metrics off: the run's ``ingest`` job is the main one.

    Example:
        >>> [spec.args[0:2] for spec in ingest_specs(SpiralOptions(images=Path("in")))]
        [['ingest', 'in']]
        >>> [spec.name for spec in ingest_specs(SpiralOptions(watch=Path("in"), synthetic=True))]
        ['ingest', 'ingest-watch']
    """
    rate = ["--rate", str(options.ingest_rate)]
    synthetic = options.synthetic if options.synthetic is not None else options.images is None and options.watch is None
    folders = [(folder, args) for folder, args in ((options.watch, ["--watch"]), (options.images, [])) if folder]
    specs = [ServiceSpec("ingest", ["ingest", "--synthetic", *rate])] if synthetic else []
    for folder, args in folders:
        name = "ingest" if not specs else "ingest-watch" if args else "ingest-images"
        extra = ["--metrics-port", "0"] if specs else []
        specs.append(ServiceSpec(name, ["ingest", *args, str(folder), "--allowed-root", str(folder), *rate, *extra]))
    return specs


def _say(console: Console, started: float, line: str) -> None:
    """One unwrapped, unstyled line with the seconds since the run started."""
    console.print(f"[{time.monotonic() - started:.0f}s] {line}", soft_wrap=True, markup=False, highlight=False)


def _done(state: SpiralState, rounds: int | None, heldout_items: int) -> bool:
    return rounds is not None and state.policy_version >= rounds and state.heldout_items(rounds) >= heldout_items


async def _watch(settings: Settings, options: SpiralOptions, state: SpiralState, log: RoundLog, stalls: StallLog,
                 supervisor: Supervisor, bus: RunBus, console: Console, started: float) -> str:
    """Fold the observed topics into `state` until the run is done ("done"), times out ("timeout") or its
    embedded broker outgrew its memory bound ("roll"), saying any stall in words (`stalls`)."""
    heldout_items = log.heldout_items
    async with AsyncPublisher(settings, producer_name="dpe-run") as pub:
        async with AsyncSubscriber(settings, OBSERVED, group_id=None, service="run", publisher=pub,
                                   subscribe=False, read_only=True) as sub:
            await sub.assign_all()
            live = Live(console=console, refresh_per_second=2, transient=False) if options.live else None
            checked_bus = time.monotonic()
            with live or contextlib.nullcontext():
                while not _done(state, options.rounds, heldout_items):
                    for delivery in await sub.fetch(max_records=5000, timeout_ms=250):
                        state.apply(delivery.event)
                    failed = supervisor.check()
                    if failed:
                        raise RuntimeError(f"services kept failing: {', '.join(failed)} (see {supervisor.log_dir})")
                    elapsed = time.monotonic() - started
                    began = stalls.update(state)
                    if live is not None:
                        live.update(render_view(state, options.rounds, supervisor.status(), elapsed, stalls.current))
                    else:
                        for line in [*log.new_lines(state), *([began] if began else [])]:
                            _say(console, started, line)
                    if options.timeout_s is not None and elapsed > options.timeout_s:
                        return "timeout"
                    if time.monotonic() - checked_bus >= BUS_CHECK_S:
                        checked_bus = time.monotonic()
                        if bus.due():
                            return "roll"
    return "done"


BUS_CHECK_S = 10.0
"""How often the watcher checks the embedded broker's memory against `SpiralOptions.bus_memory_mb`."""


def _base_model(options: SpiralOptions, console: Console) -> Path:
    """`options.base_model`, or the warmed tiny model (built and cached on first use)."""
    if options.base_model is not None:
        if not (options.base_model / "config.json").is_file():
            raise FileNotFoundError(f"{options.base_model} is not a model folder (no config.json)")
        console.print(f"base model: {options.base_model}")
        return options.base_model
    warmed = warm_up(options.warmup, show_progress=options.live)
    console.print(f"base model: {warmed.folder} ({'cached' if warmed.from_cache else f'warmed in {warmed.seconds:.0f}s'})")
    return warmed.folder


def _initial_state(settings: Settings, options: SpiralOptions) -> SpiralState:
    """The saved history of a resumed run, else an empty one."""
    path = options.run_dir / STATE_FILE
    if options.resume:
        if not path.is_file():
            raise FileNotFoundError(f"no history to resume at {path} (a killed run saves none; start a new one)")
        return SpiralState.from_json(json.loads(path.read_text()))
    synthetic = settings.evaluator.synthetic
    return SpiralState(heldout_suite=synthetic.heldout_suite if synthetic is not None else "heldout")


def _save_state(run_dir: Path, state: SpiralState) -> None:
    tmp = run_dir / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state.to_json()))
    tmp.replace(run_dir / STATE_FILE)


def _run_epoch(settings: Settings, options: SpiralOptions, bus: RunBus, state: SpiralState, log: RoundLog,
               stalls: StallLog, base_model: Path, console: Console, started: float) -> str:
    """Run every service on the bus as it is now, until `_watch` says why to stop; stop them."""
    configured = run_settings(settings, options, bus.bootstrap, base_model)
    ensure_topics(configured, bus.bootstrap)
    config_path = options.run_dir / "config.yaml"
    write_config(configured, config_path)
    supervisor = Supervisor(env=child_env(config_path, configured), log_dir=options.run_dir / "logs",
                            on_restart=None if options.live else lambda event: _say(console, started, str(event)))
    specs = service_specs(options, base_model)
    try:
        for spec in specs:
            supervisor.start(spec)
        outcome = asyncio.run(_watch(configured, options, state, log, stalls, supervisor, bus, console, started))
        if outcome == "done" and (wait := last_scrape_s(configured, [spec.name for spec in specs])):
            _say(console, started, f"done; the services stay up {wait:.0f}s for Prometheus's last scrape")
            time.sleep(wait)
        return outcome
    finally:
        supervisor.stop()


def last_scrape_s(settings: Settings, services: Collection[str]) -> float:
    """How long a finished run keeps its services up for a last scrape: `metrics.last_scrape_s` when one of the
    `services` it started (`ServiceSpec` names) serves /metrics, else 0.

    >>> run = ["weakness", "evaluator", "agents", "trainer", "ingest", "auditor"]
    >>> shorter = with_overrides(Settings(), {"metrics": {"last_scrape_s": 2}})
    >>> last_scrape_s(Settings(), run), last_scrape_s(shorter, run), last_scrape_s(Settings(), ["ingest-watch"])
    (10.0, 2.0, 10.0)
    >>> off = {"metrics_port": 0}
    >>> last_scrape_s(with_overrides(Settings(), {s: off for s in ("stream", "evaluator", "auditor", "agents",
    ...                                                              "trainer", "ingest")}), run)
    0.0
    """
    sections = {section_of(name) for name in services}
    ports = [getattr(settings, section).metrics_port for section in sections]
    return settings.metrics.last_scrape_s if any(map(settings.metrics.port_for, ports)) else 0.0


def run_spiral(settings: Settings, options: SpiralOptions, console: Console | None = None) -> SpiralResult:
    """Run the spiral for `options.rounds` rounds (None: until interrupted); see the module docstring."""
    console = console or Console()
    options = replace(options, live=options.live and console.is_terminal)
    started = time.monotonic()
    base_model = _base_model(options, console)
    options = replace(options, base_model=base_model)
    state = _initial_state(settings, options)
    options.save()
    bus = RunBus(settings, options.run_dir, memory_mb=options.bus_memory_mb, max_tail=options.bus_max_tail)
    synthetic = settings.evaluator.synthetic
    log = RoundLog(synthetic.heldout_items if synthetic is not None else 0, next_version=state.policy_version)
    stalls = StallLog(options.stall_after_s)
    outcome = "stopped"
    try:
        bus.start(resume=options.resume)
        while (outcome := _run_epoch(settings, options, bus, state, log, stalls, base_model, console,
                                     started)) == "roll":
            _say(console, started, str(bus.roll()))
            _save_state(options.run_dir, state)
    except KeyboardInterrupt:
        outcome = "stopped"
    finally:
        bus.stop(save=options.keep_bus)
        _save_state(options.run_dir, state)
    seconds = time.monotonic() - started
    rounds = state.rounds()
    meta = {"run_id": options.run_id, "rounds_requested": options.rounds, "completed": outcome == "done",
            "resumed": options.resume, "seconds": round(seconds, 1),
            "strategy": options.strategy or settings.stream.quotas.strategy, "round_samples": options.round_samples,
            "base_model": str(base_model), "bus_epochs": bus.epoch + 1,
            "samples_accepted": state.accepted, "samples_rejected_by_reason": dict(state.rejected_by_reason),
            "samples_by_origin": state.by_origin,
            "stalls": stalls.seen}
    write_report(options.run_dir, rounds, meta)
    return SpiralResult(options.run_dir, rounds, seconds, outcome == "done", state.by_origin)
