"""One soak: the spiral run for a while, faults applied on schedule, then stopped and checked.

Timeline (seconds on the soak's clock, from the start of `dpe run`):

1. before the run, with chaos, a tmpfs is mounted at the checkpoint folder (`benchmarks.soak.disk`);
2. warm-up: until the trainer's first trained version (v1) is announced, or 40 % of the soak;
3. chaos window: one pass of faults (`benchmarks.soak.chaos.schedule`) spread up to `settle_s`
   before the end;
4. settle: no faults, the spiral catches up; at least `settle_s` after the last fault ended, so a
   soak whose faults ran late (waiting for a checkpoint write on a busy machine) runs longer;
5. quiesce: the evidence producers (evaluator, auditor) are SIGSTOPped until the observer has read
   everything and the weakness stream's last snapshot matches a recomputation from the log (or a
   timeout), then SIGCONTed;
6. `dpe run` is stopped with SIGTERM (it saves and reports), the tmpfs unmounted.

Meanwhile the observer reads the bus, the checkpoint manifests are collected and every process's
RSS is sampled; the invariants are computed from all that at the end (`SoakResult`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.soak.chaos import Chaos, ChaosSettings, FaultResult, schedule
from benchmarks.soak.disk import mount_tmpfs, unmount
from benchmarks.soak.invariants import (
    Fates,
    Frontier,
    PlanFill,
    WeaknessDiff,
    busy_share,
    lineage,
    plan_fills,
    sample_fates,
    stalls,
    trained_twice,
    version_gaps,
    weakness_diffs,
)
from benchmarks.soak.observer import CONFIG_FILE, Manifests, Observations, observe
from benchmarks.soak.processes import SpiralCommand, processes_by_role, stop
from benchmarks.soak.rss import RssSampler
from dpe.events import AcceptedSample, Checkpoint
from dpe.settings import Settings
from dpe.topics import topic_for
from trainer.checkpoints import CheckpointStore
from trainer.settings import checkpoint_root

EVIDENCE_PRODUCERS = ("evaluator", "auditor")


@dataclass(frozen=True)
class SoakOptions:
    """What one soak does."""

    minutes: float = 10.0
    chaos: bool = False
    seed: int = 0
    round_samples: int = 24
    run_dir: Path = Path("runs") / time.strftime("soak-%Y%m%d-%H%M%S")
    stall_after_s: float = 240.0
    """No new policy version for this long is a stall (a round takes ~20 s on a quiet 2-core machine, minutes on a
    busy one)."""
    bus_memory_mb: float | None = None
    """Passed to `dpe run --bus-memory-mb` (None: its default); a small bound shows rolls within a short soak."""
    base_model: Path | None = None
    """Passed to `dpe run --base-model` (None: the default warmed tiny model)."""
    tmpfs_mb: int = 160
    """Size of the checkpoint disk: room for the kept checkpoints (5 x ~13 MB) and one being written."""
    sample_every_s: float = 3.0
    quiesce_timeout_s: float = 90.0
    weakness_tolerance: float = 1e-6

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    @property
    def settle_s(self) -> float:
        """Quiet time between the last fault and the end."""
        return min(120.0, 0.2 * self.duration_s)


@dataclass
class SoakResult:
    """Everything a soak measured and found; `summary` is the JSON line, `failures` the broken invariants."""

    options: SoakOptions
    observations: Observations
    chain: list[Checkpoint]
    fates: Fates
    fills: list[PlanFill]
    diffs: list[WeaknessDiff]
    faults: list[FaultResult]
    faults_skipped: dict[str, str]
    rss: RssSampler
    warm_s: float
    ended_s: float
    """When the soak proper ended (the quiesce began: from then on no version is expected)."""
    exit_code: int | None
    died: str | None
    manifests_missing: list[int]
    summary_stalls: int
    twice: dict[str, list[int]] = field(init=False)
    gaps: list[int] = field(init=False)
    stalled: list[tuple[float, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.twice = trained_twice(self.chain)
        self.gaps = version_gaps(self.observations.checkpoints)
        seen = self.observations.version_seen_at
        self.stalled = stalls(seen.values(), seen.get(0, self.warm_s), self.ended_s, self.options.stall_after_s)

    def recovery_s(self, result: FaultResult) -> float | None:
        """Seconds from the end of a fault to the next new policy version (None: none came)."""
        later = [t for t in self.observations.version_seen_at.values() if t >= result.ended_s]
        return min(later) - result.ended_s if later else None

    @property
    def rss_after_s(self) -> float:
        """Where the RSS warm-up ends: when the first trained version was announced (every service has loaded
        its model and done a round by then), or at the end of the soak's warm-up."""
        return self.observations.version_seen_at.get(1, self.warm_s)

    def busy_share(self) -> float:
        """The trainer's busy share: training seconds over the wall time since version 0 was announced."""
        since = self.observations.version_seen_at.get(0, self.warm_s)
        return busy_share(self.chain, self.ended_s - since)

    def summary(self) -> dict[str, Any]:
        growth = {role: round(mb, 1) for role, mb in self.rss.growth(self.rss_after_s).items() if mb is not None}
        fills = [fill for fill in self.fills if fill.failed]
        return {
            "minutes": self.options.minutes,
            "chaos": self.options.chaos,
            "seed": self.options.seed,
            "versions_advanced": self.observations.newest_version or 0,
            "kills": sum(result.killed for result in self.faults),
            "faults": len(self.faults),
            "faults_failed": sum(not result.ok for result in self.faults),
            "faults_skipped": self.faults_skipped,
            "trained_twice": len(self.twice),
            "lost_samples": len(self.fates.lost),
            "pending_samples": len(self.fates.pending),
            "skipped_samples": len(self.fates.skipped),
            "trained_samples": len(self.fates.trained),
            "accepted_samples": len({record.sample_id for record in self.observations.accepted.values()}),
            "weakness_mismatch": len(self.diffs),
            "plans": len(self.fills),
            "plans_unfilled": len(fills),
            "plans_timed_out": sum(fill.status == "timed_out" for fill in self.fills),
            "plans_spilled": sum(fill.status == "spilled" for fill in self.fills),
            "version_gaps": len(self.gaps),
            "stalls": len(self.stalled) + self.summary_stalls,
            "max_rss_growth_mb": max(growth.values(), default=0.0),
            "rss_growth_mb": growth,
            "broker_rss_mb": round(self.rss.last_mb().get("broker", 0.0), 1),
            "trainer_busy_share": round(self.busy_share(), 3),
            "bus_epochs": (self.observations.epoch or 0) + 1,
            "manifests_missing": len(self.manifests_missing),
            "run_exit_code": self.exit_code,
            "run_dir": str(self.options.run_dir),
            "ok": not self.failures(),
        }

    def failures(self) -> list[str]:
        """The invariants that failed, in words."""
        checks = [
            (self.died is not None, f"dpe run died during the soak: {self.died}"),
            (self.exit_code != 0, f"dpe run exited with code {self.exit_code} on SIGTERM"),
            (not self.observations.newest_version, "no policy version beyond the base model"),
            (bool(self.twice), f"{len(self.twice)} samples trained twice along the lineage"),
            (bool(self.fates.lost), f"{len(self.fates.lost)} accepted samples lost"),
            (bool(self.diffs), f"weakness snapshot differs from its recomputation in {len(self.diffs)} figures"),
            (any(fill.failed for fill in self.fills), "plans not filled exactly"),
            (bool(self.gaps), f"policy versions missing: {self.gaps}"),
            (bool(self.stalled) or self.summary_stalls > 0, "the spiral stalled"),
            (any(not result.ok for result in self.faults), "faults that did not go as they should"),
        ]
        return [message for failed, message in checks if failed]


async def _wait_for_config(run_dir: Path, proc: subprocess.Popen[bytes], timeout_s: float = 600.0) -> Settings:
    """The run's settings once `dpe run` has written its ``config.yaml``."""
    deadline = time.monotonic() + timeout_s
    path = run_dir / CONFIG_FILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dpe run exited with code {proc.returncode} before writing {path}")
        with contextlib.suppress(FileNotFoundError, ValueError, yaml.YAMLError):
            return Settings.load(path)
        await asyncio.sleep(0.5)
    raise TimeoutError(f"dpe run wrote no {path} within {timeout_s:.0f}s")


class _Soak:
    """The running parts of one soak (see the module docstring)."""

    def __init__(self, options: SoakOptions, console: Console):
        self.options = options
        self.console = console
        self.t0 = time.monotonic()
        self.faults: list[FaultResult] = []
        self.skipped: dict[str, str] = {}
        self.died: str | None = None
        self.warm_s = 0.0
        self.prefix = ""

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def say(self, line: str) -> None:
        self.console.print(f"[{self.clock():5.0f}s] {line}", markup=False, highlight=False, soft_wrap=True)

    async def run(self) -> SoakResult:
        options = self.options
        mount = options.run_dir / "home" / "checkpoints"
        mounted = False
        if options.chaos:
            reason = mount_tmpfs(mount, options.tmpfs_mb)
            mounted = reason is None
            if reason is not None:
                self.skipped["disk_full"] = reason
                self.say(f"disk-full fault skipped: {reason}")
        command = SpiralCommand(options.run_dir, options.round_samples, options.bus_memory_mb, options.base_model)
        proc = command.start(options.run_dir / "soak-run.log")
        try:
            return await self._observed(proc, mount if mounted else None)
        finally:
            if proc.poll() is None:
                stop(proc)
            if mounted:
                unmount(mount)

    async def _observed(self, proc: subprocess.Popen[bytes], mount: Path | None) -> SoakResult:
        options = self.options
        settings = await _wait_for_config(options.run_dir, proc)
        self.prefix = settings.kafka.topic_prefix
        store = CheckpointStore(checkpoint_root(settings), settings.trainer.checkpoints.keep_last)
        if mount is not None and store.folder.resolve() != mount.resolve():
            self.skipped["disk_full"] = f"the trainer writes to {store.folder}, not to the tmpfs at {mount}"
        observations = Observations(settings.stream.scoring, self.clock)
        manifests = Manifests(store)
        run = psutil.Process(proc.pid)
        rss = RssSampler(run)
        done = asyncio.Event()
        tasks = [asyncio.create_task(observe(settings, options.run_dir, observations, done)),
                 asyncio.create_task(self._sample(rss, manifests, done))]
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=self.console,
                      transient=True) as progress:
            shown = progress.add_task("soak", total=options.duration_s)
            tasks.append(asyncio.create_task(self._show(progress, shown, observations, done)))
            try:
                await self._drive(proc, run, store, settings, observations)
                ended_s = self.clock()
                diffs = await self._quiesce(run, observations)
            finally:
                done.set()
                await asyncio.gather(*tasks, return_exceptions=True)
        exit_code = stop(proc) if self.died is None else proc.returncode
        self.say(f"dpe run stopped with SIGTERM: exit code {exit_code}")
        manifests.poll()
        return self._result(observations, manifests, rss, diffs, ended_s, exit_code)

    async def _drive(self, proc: subprocess.Popen[bytes], run: psutil.Process, store: CheckpointStore,
                     settings: Settings, observations: Observations) -> None:
        """Warm up, apply the faults on schedule, then wait out the soak; note if the run dies meanwhile."""
        options = self.options
        while (observations.newest_version or 0) < 1 and self.clock() < 0.4 * options.duration_s:
            if not await self._alive(proc, 1.0):
                return
        self.warm_s = self.clock()
        self.say(f"warmed up: policy v{observations.newest_version or 0}")
        if options.chaos:
            window = max(0.0, options.duration_s - options.settle_s - self.warm_s)
            faults = schedule(options.seed, window, disk="disk_full" not in self.skipped)
            self.say(f"chaos: {len(faults)} faults over {window:.0f}s, seed {options.seed}")
            stop_s = max(2 * settings.kafka.session_timeout_ms / 1000, settings.kafka.session_timeout_ms / 1000 + 5)
            chaos = Chaos(run, store, options.run_dir / "logs" / "trainer.log", ChaosSettings(stop_s=stop_s),
                          self.clock)
            for fault in faults:
                if not await self._alive(proc, self.warm_s + fault.at_s - self.clock()):
                    return
                self.say(f"fault: {fault}")
                result = await chaos.apply(fault)
                self.faults.append(result)
                self.say(f"  {'ok' if result.ok else 'FAILED'}: {result.outcome}")
        settled = self.faults[-1].ended_s + options.settle_s if self.faults else 0.0
        await self._alive(proc, max(options.duration_s, settled) - self.clock())

    async def _alive(self, proc: subprocess.Popen[bytes], wait_s: float) -> bool:
        """Wait `wait_s` seconds while `dpe run` lives; False (and the reason noted) if it exits."""
        deadline = self.clock() + wait_s
        while True:
            if proc.poll() is not None:
                self.died = f"exit code {proc.returncode} (see {self.options.run_dir / 'soak-run.log'})"
                self.say(f"dpe run died: {self.died}")
                return False
            if self.clock() >= deadline:
                return True
            await asyncio.sleep(min(1.0, max(0.0, deadline - self.clock())))

    async def _quiesce(self, run: psutil.Process, observations: Observations) -> list[WeaknessDiff]:
        """Pause the evidence producers until the weakness stream's last snapshot covers everything the log
        holds; the snapshot's differences from the recomputation then (or at the timeout)."""
        if self.died is not None:
            return []
        paused = [p for role in EVIDENCE_PRODUCERS for p in processes_by_role(run).get(role, [])]
        for process in paused:
            os.kill(process.pid, signal.SIGSTOP)
        self.say(f"quiesce: {', '.join(EVIDENCE_PRODUCERS)} paused; comparing the weakness with its recomputation")
        params = observations.params
        deadline = self.clock() + self.options.quiesce_timeout_s
        try:
            while True:
                await asyncio.sleep(1.0)
                snapshot = observations.snapshot
                diffs = [] if snapshot is None else weakness_diffs(snapshot, observations.evidence, params,
                                                                    self.options.weakness_tolerance)
                if (observations.caught_up and snapshot is not None and not diffs) or self.clock() >= deadline:
                    break
        finally:
            for process in paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
        if snapshot is None:
            return []
        self.say(f"weakness: {'matches' if not diffs else f'{len(diffs)} figures differ from'} the recomputation "
                 f"over {len(observations.evidence)} pieces of evidence")
        return diffs

    async def _sample(self, rss: RssSampler, manifests: Manifests, done: asyncio.Event) -> None:
        """Sample RSS every `sample_every_s` and read new checkpoint manifests every half second."""
        next_sample = 0.0
        while not done.is_set():
            manifests.poll()
            if self.clock() >= next_sample:
                await asyncio.to_thread(rss.sample, self.clock())
                next_sample = self.clock() + self.options.sample_every_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    async def _show(self, progress: Progress, task: Any, observations: Observations, done: asyncio.Event) -> None:
        """Keep the progress line current and say each new policy version."""
        said = -1
        while not done.is_set():
            newest = observations.newest_version
            for version in sorted(v for v in observations.checkpoints if v > said):
                checkpoint = observations.checkpoints[version]
                self.say(f"policy v{version} ({len(checkpoint.sample_ids)} samples trained)")
                said = version
            accepted = len({r.sample_id for r in observations.accepted.values()})
            progress.update(task, completed=min(self.clock(), self.options.duration_s),
                            description=f"soak v{newest if newest is not None else '-'} · {accepted} accepted · "
                                        f"{sum(r.killed for r in self.faults)} kills")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)

    def _result(self, observations: Observations, manifests: Manifests, rss: RssSampler, diffs: list[WeaknessDiff],
                ended_s: float, exit_code: int | None) -> SoakResult:
        chain = lineage(observations.checkpoints.values())
        skipped = {version: manifest.skipped for version, manifest in manifests.by_version.items()}
        topic = topic_for(AcceptedSample, self.prefix)
        fates = sample_fates(observations.accepted.values(), chain, skipped,
                             _frontier(chain, manifests, observations, topic))
        fills = plan_fills(observations.plans.values(), observations.accepted.values(), chain,
                           self.options.round_samples)
        missing = [c.policy_version for c in chain if c.policy_version > 0 and c.policy_version not in skipped]
        return SoakResult(self.options, observations, chain, fates, fills, diffs, self.faults, self.skipped, rss,
                          self.warm_s, ended_s, exit_code, self.died, missing, _summary_stalls(self.options.run_dir))


def _frontier(chain: list[Checkpoint], manifests: Manifests, observations: Observations, topic: str) -> Frontier | None:
    """Where the newest checkpoint of the lineage stopped reading accepted samples (on `topic`): its manifest's
    positions, else the ends of the ranges it trained on; None when nothing was trained yet."""
    if not chain or chain[-1].policy_version == 0:
        return None
    newest = chain[-1]
    epoch = observations.checkpoint_epochs.get(newest.policy_version, 0)
    manifest = manifests.by_version.get(newest.policy_version)
    if manifest is not None:
        return Frontier(epoch, manifest.positions.get(topic, {}))
    return Frontier(epoch, {r.partition: r.end for r in newest.trained_on})


def _summary_stalls(run_dir: Path) -> int:
    """Stalls `dpe run` itself reported in its ``summary.json`` (0 when it wrote none)."""
    try:
        return len(json.loads((run_dir / "summary.json").read_text()).get("stalls", []))
    except (FileNotFoundError, ValueError, AttributeError):
        return 0


def run_soak(options: SoakOptions, console: Console) -> SoakResult:
    """Run one soak (see the module docstring)."""
    return asyncio.run(_Soak(options, console).run())
