"""A real Prometheus scrapes a real dpe /metrics endpoint and answers PromQL over its HTTP API.

`start_prometheus` is a fixture factory: call it with scrape targets (job name -> "host:port" list) to
start Debian's `prometheus` on a free loopback port with a 1 s scrape interval and the project's
rules; every server it started is stopped after the test. Use it to scrape any dpe service, e.g.
a short `dpe run` serving its metrics on known ports (the last test here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_server import PrometheusServer, free_port, stop_process, wait_until

from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up
from dpe.world import CAPABILITIES

ROOT = Path(__file__).resolve().parents[1]
RULES = sorted((ROOT / "monitoring/prometheus/rules").glob("*.yml"))

ERROR_RATES = {"counting": 0.42, "colour": 0.17, "ocr": 0.63}
QUOTAS = {"counting": 500, "colour": 100, "ocr": 400}

SERVE_METRICS = """
import json, sys
from monitoring.metrics import QUOTA_SAMPLES, WEAKNESS_ERROR_RATE, serve_metrics
for capability, rate in json.loads(sys.argv[2]).items():
    WEAKNESS_ERROR_RATE.labels(capability).set(rate)
for capability, samples in json.loads(sys.argv[3]).items():
    QUOTA_SAMPLES.labels(capability).set(samples)
serve_metrics(int(sys.argv[1]), addr="127.0.0.1")
sys.stdin.read()
"""
"""Sets the weakness and quota gauges, serves them with `serve_metrics`, runs until stdin closes."""

StartPrometheus = Callable[..., PrometheusServer]


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[StartPrometheus]:
    """Start Prometheus servers: `start_prometheus({"job": ["127.0.0.1:port"]}, **options)`; all stopped after.

    Options go to `PrometheusServer.start` (`scrape_interval`, `rule_files`, `ready_timeout`); the
    project's rule files are loaded unless `rule_files` says otherwise.
    """
    servers: list[PrometheusServer] = []

    def start(targets: Mapping[str, Sequence[str]], **options: Any) -> PrometheusServer:
        options.setdefault("rule_files", RULES)
        server = PrometheusServer.start(tmp_path / f"prometheus-{len(servers)}", targets, **options)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def metrics_ready(url: str, process: subprocess.Popen[bytes]) -> bool:
    """True once `url` answers; raises if the serving process has exited."""
    if process.poll() is not None:
        raise RuntimeError(f"metrics process exited with {process.returncode}")
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def weakness_metrics(tmp_path: Path) -> Iterator[str]:
    """A subprocess serving dpe's registry with per-capability weakness and quotas; yields "host:port"."""
    port = free_port()
    log = tmp_path / "metrics.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE_METRICS, str(port), json.dumps(ERROR_RATES), json.dumps(QUOTAS)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_until(lambda: metrics_ready(f"http://127.0.0.1:{port}/metrics", process), 30, "metrics endpoint")
        except (TimeoutError, RuntimeError) as error:
            raise RuntimeError(f"{error}\n{log.read_text(errors='replace')}") from error
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process)


def by_capability(result: list[dict[str, Any]]) -> dict[str, float]:
    return {series["metric"]["capability"]: float(series["value"][1]) for series in result}


def test_prometheus_scrapes_the_weakness_gauge_per_capability(
    start_prometheus: StartPrometheus, weakness_metrics: str
) -> None:
    server = start_prometheus({"weakness": [weakness_metrics]})

    result = server.wait_for('dpe_weakness_error_rate{job="weakness"}', lambda r: len(r) == len(ERROR_RATES))

    assert by_capability(result) == ERROR_RATES
    assert {series["metric"]["instance"] for series in result} == {weakness_metrics}
    assert [float(series["value"][1]) for series in server.query('up{job="weakness"}')] == [1.0]


def test_prometheus_evaluates_the_recording_rules_on_scraped_metrics(
    start_prometheus: StartPrometheus, weakness_metrics: str
) -> None:
    server = start_prometheus({"weakness": [weakness_metrics]})

    shares = server.wait_for("capability:dpe_quota_samples:share", lambda r: len(r) == len(QUOTAS))
    weakness = server.wait_for("capability:dpe_weakness_error_rate:max", lambda r: len(r) == len(ERROR_RATES))

    total = sum(QUOTAS.values())
    assert by_capability(shares) == pytest.approx({name: n / total for name, n in QUOTAS.items()})
    assert by_capability(weakness) == ERROR_RATES


def test_a_short_dpe_run_completes_a_round_and_prometheus_has_weakness_per_capability(
    start_prometheus: StartPrometheus, tmp_path: Path
) -> None:
    """The README's first command, shortened (one round of 24 samples, a quickly warmed base model):
    every service as its own process, scraped by a real Prometheus while it runs."""
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    sections = {"weakness": "stream", "evaluator": "evaluator", "auditor": "auditor", "agents": "agents",
                "trainer": "trainer", "ingest": "ingest"}
    ports = {service: free_port() for service in sections}
    config = tmp_path / "dpe.yaml"
    config.write_text(yaml.safe_dump({section: {"metrics_port": ports[service]} for service, section in sections.items()}))
    server = start_prometheus({service: [f"127.0.0.1:{port}"] for service, port in ports.items()})
    env = {key: value for key, value in os.environ.items() if not key.startswith("DPE_")}
    command = [sys.executable, "-m", "dpe", "--config", str(config), "run", "--rounds", "1", "--round-samples", "24",
               "--base-model", str(base_model), "--no-live", "--runs-dir", str(tmp_path / "runs"), "--run-id", "short",
               "--timeout", "600"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=720)
    run_dir = tmp_path / "runs" / "short"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True
    assert [r["policy_version"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][1]["samples_trained"] == 24
    assert all(r["heldout_items"] == 210 for r in summary["rounds"]), "both versions graded on the held-out suite"
    assert sum(summary["rounds"][0]["quota_plan"].values()) == 24
    assert (run_dir / "report.html").stat().st_size > 10_000, "the report holds its plots"

    weakness = by_capability(server.query('last_over_time(dpe_weakness_error_rate{job="weakness"}[30m])'))
    assert set(weakness) == set(CAPABILITIES) and all(0.0 <= rate <= 1.0 for rate in weakness.values())
    trained = server.query('max_over_time(dpe_trainer_policy_version{job="trainer"}[30m])')
    assert len(trained) == 1 and float(trained[0]["value"][1]) >= 1.0, "the trainer announced version 1"
    scraped = server.query('max_over_time(up[30m])')
    assert {series["metric"]["job"]: float(series["value"][1]) for series in scraped} == dict.fromkeys(sections, 1.0)
