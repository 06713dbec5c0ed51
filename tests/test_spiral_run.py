"""`dpe run` as a user runs it: its supervisor restarts a service that dies, Ctrl-C or SIGTERM stops
everything and still writes the report, and a run killed outright leaves no orphans.

The run is real (embedded broker, every service its own process) on a quickly warmed base model; it
runs `--forever`, so only a signal ends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import psutil
import pytest
import yaml
from prometheus_server import wait_until

from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up

SERVICES = ("weakness", "evaluator", "auditor", "agents", "trainer", "ingest")

pytestmark = pytest.mark.timeout(600)


def services_of(run: psutil.Process) -> dict[str, psutil.Process]:
    """The run's service processes by name (`python -m dpe ... serve NAME` or `... ingest`)."""
    found = {}
    for child in run.children():
        try:
            args = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        name = args[args.index("serve") + 1] if "serve" in args else "ingest" if "ingest" in args else None
        if name is not None:
            found[name] = child
    return found


def running(check: Callable[[], object], proc: subprocess.Popen, log: Path) -> Callable[[], bool]:
    """`check` for `wait_until`, failing at once (with the run's log) if `dpe run` has exited."""
    def checked() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"dpe run exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        return bool(check())
    return checked


def start_forever_run(tmp_path: Path) -> tuple[subprocess.Popen, psutil.Process, Path]:
    """`dpe run --forever` on a quickly warmed base model, once every service is running: (process, its
    psutil view, its log)."""
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    config = tmp_path / "dpe.yaml"
    config.write_text(yaml.safe_dump({section: {"metrics_port": 0} for section in
                                      ("stream", "evaluator", "auditor", "agents", "trainer", "ingest")}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("DPE_")}
    log = tmp_path / "run.log"
    command = [sys.executable, "-m", "dpe", "--config", str(config), "run", "--forever", "--round-samples", "24",
               "--base-model", str(base_model), "--no-live", "--runs-dir", str(tmp_path / "runs"), "--run-id", "r"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    run = psutil.Process(proc.pid)
    try:
        wait_until(running(lambda: set(services_of(run)) == set(SERVICES), proc, log), 120, "every service")
    except BaseException:
        proc.kill()
        raise
    return proc, run, log


def still_alive(pids: set[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_a_killed_service_is_restarted_and_ctrl_c_stops_every_process_and_writes_the_report(tmp_path):
    proc, run, log = start_forever_run(tmp_path)
    try:
        started = services_of(run)
        descendants = {p.pid for p in run.children(recursive=True)}

        started["agents"].kill()
        wait_until(running(lambda: services_of(run).get("agents", started["agents"]).pid != started["agents"].pid,
                           proc, log), 30, "the agents restarted")
        descendants.add(services_of(run)["agents"].pid)
        summary_path = tmp_path / "runs" / "r" / "summary.json"
        trainer_log = tmp_path / "runs" / "r" / "logs" / "trainer.log"
        wait_until(running(lambda: "announced policy version 1" in trainer_log.read_text(errors="replace"), proc, log),
                   240, "a first trained round")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "Ctrl-C is how a --forever run ends"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not still_alive(descendants), "processes left running after Ctrl-C"
    summary = json.loads(summary_path.read_text())
    assert summary["completed"] is False and summary["rounds_requested"] is None
    assert [r["policy_version"] for r in summary["rounds"]][:2] == [0, 1], "the report keeps what was done"
    assert (tmp_path / "runs" / "r" / "report.html").exists()


def test_sigterm_stops_dpe_run_like_ctrl_c(tmp_path):
    """What `docker stop` and systemd send: every service stopped, the report written, exit 0."""
    proc, run, log = start_forever_run(tmp_path)
    try:
        descendants = {p.pid for p in run.children(recursive=True)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not still_alive(descendants), "SIGTERM left processes running"
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["completed"] is False
    assert (tmp_path / "runs" / "r" / "report.html").exists()


def test_a_killed_dpe_run_takes_its_services_and_broker_with_it(tmp_path):
    """kill -9 of the parent leaves no orphans: each child asked the kernel for SIGTERM when its parent dies."""
    proc, run, log = start_forever_run(tmp_path)
    descendants = {p.pid for p in run.children(recursive=True)}
    proc.kill()
    proc.wait()
    wait_until(lambda: not still_alive(descendants), 30, "the orphans to stop")


def test_training_never_stops_past_the_staleness_bound(tmp_path):
    """More versions than `staleness.max_versions` + 2 through the real services: every round trains its
    samples (each sample names the version it was made against, so none is dropped as stale)."""
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    config = tmp_path / "dpe.yaml"
    sections = {section: {"metrics_port": 0} for section in ("stream", "evaluator", "auditor", "agents", "ingest")}
    config.write_text(yaml.safe_dump(sections | {"trainer": {"metrics_port": 0, "staleness": {"max_versions": 1}}}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("DPE_")}
    command = [sys.executable, "-m", "dpe", "--config", str(config), "run", "--rounds", "4", "--round-samples", "8",
               "--base-model", str(base_model), "--no-live", "--runs-dir", str(tmp_path / "runs"), "--run-id", "r",
               "--timeout", "420"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    trained = {r["policy_version"]: r["samples_trained"] for r in summary["rounds"]}
    assert trained == {0: 0, 1: 8, 2: 8, 3: 8, 4: 8}, trained
