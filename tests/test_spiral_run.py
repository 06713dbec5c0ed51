"""`dpe run` as a user runs it: its supervisor restarts a service that dies and Ctrl-C stops everything.

The run is real (embedded broker, every service its own process) on a quickly warmed base model; it
runs `--forever`, so only Ctrl-C ends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def test_a_killed_service_is_restarted_and_ctrl_c_stops_every_process_and_writes_the_report(tmp_path):
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
    try:
        run = psutil.Process(proc.pid)
        wait_until(running(lambda: set(services_of(run)) == set(SERVICES), proc, log), 120, "every service")
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
    alive = [pid for pid in descendants if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"processes left running after Ctrl-C: {alive}"
    summary = json.loads(summary_path.read_text())
    assert summary["completed"] is False and summary["rounds_requested"] is None
    assert [r["policy_version"] for r in summary["rounds"]][:2] == [0, 1], "the report keeps what was done"
    assert (tmp_path / "runs" / "r" / "report.html").exists()
