"""A real Prometheus scrapes real dpe /metrics endpoints and answers PromQL over its HTTP API.

`start_prometheus` is a fixture factory: call it with scrape targets (job name -> "host:port" list) to
start Debian's `prometheus` on a free loopback port with a 1 s scrape interval and the project's
rules; every server it started is stopped after the test.

`short_run` runs the README's first command, shortened, once for this module: every service as its
own process, scraped by a real Prometheus. Its tests check the run, and prove the dashboards the
next best way to opening them in Grafana: every panel, annotation and variable query of every
dashboard (variables filled as Grafana would, from the run's label values), every recording rule and
what every alert measures must return series over the run; every alert expression must evaluate.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kafka import KafkaProducer
from monitoring_queries import (
    ROOT,
    RULES,
    Query,
    alerting_rules,
    capped_offsets,
    dashboard_queries,
    duration_seconds,
    grafana_builtins,
    label_values_query,
    load_dashboards,
    measured_quantities,
    recording_rules,
    scrape_interval_s,
    selected_values,
)
from PIL import Image
from prometheus_server import (
    PrometheusServer,
    Result,
    free_port,
    stop_process,
    wait_until,
)

from dpe.broker import EmbeddedBroker
from dpe.bus.admin import ensure_topics
from dpe.events import UnlabeledItem
from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up
from dpe.settings import Settings
from dpe.topics import topic_for
from dpe.world import CAPABILITIES
from tests.agent_helpers import FAST_PATH, QUICK_EVAL

pytestmark = pytest.mark.spiral

RULE_FILES = sorted(RULES.glob("*.yml"))

ERROR_RATES = {"counting": 0.42, "colour": 0.17, "ocr": 0.63}
QUOTAS = {"counting": 500, "colour": 100, "ocr": 400}

SERVICE_SECTIONS = {"weakness": "stream", "evaluator": "evaluator", "auditor": "auditor", "agents": "agents",
                    "trainer": "trainer", "ingest": "ingest"}
"""Each service of `dpe run` (its Prometheus job) -> the config section that sets its metrics port."""

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
        options.setdefault("rule_files", RULE_FILES)
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


# --- every query of the monitoring, evaluated as Grafana and Prometheus would ----------------------


@dataclass(frozen=True)
class Window:
    """A dashboard's time range, in Unix seconds; `compared_since`: when the series that queries compare
    with their past (the weakness) first appeared, `start` unless told."""

    start: float
    end: float
    compared_since: float | None = None

    @property
    def builtins(self) -> dict[str, str]:
        """Grafana's built-in variables ($__interval, $__rate_interval, $__range, ...) for this range."""
        return grafana_builtins(self.end - self.start, scrape_interval_s())

    @property
    def lookback_s(self) -> int:
        """The longest `offset` a query is evaluated with: a quarter of the time the compared series existed.

        A run of minutes has no data from hours before; with offsets capped, a query that compares
        with the past (`x - x offset 30m`) still reads the same series, only a shorter way back.
        On a loaded machine the weakness may appear only late in the run: the cap follows it.

        >>> Window(0, 100).lookback_s, Window(0, 100, compared_since=80).lookback_s
        (25, 5)
        """
        since = self.start if self.compared_since is None else self.compared_since
        return max(1, int((self.end - since) / 4))


def evaluate(server: PrometheusServer, query: Query, window: Window) -> Result:
    """`query` over `window` as Grafana sends it: instant at the end, or a range query with its last point at the end.

    Raises ValueError when Prometheus refuses it (a parse error, an unknown function, ...).
    """
    expr = capped_offsets(query.expr, window.lookback_s)
    if query.instant:
        return server.query(expr, at=window.end)
    step = max(duration_seconds(window.builtins["__interval"]), duration_seconds(query.min_step))
    points = math.ceil((window.end - window.start) / step)
    return server.query_range(expr, window.end - points * step, window.end, step)


def problems(server: PrometheusServer, queries: Mapping[str, Query], window: Window,
             *, need_series: bool = True) -> dict[str, str]:
    """Where -> what is wrong, for each of `queries` that Prometheus refuses or (with `need_series`) that
    returns no series over `window`."""
    found = {}
    for where, query in queries.items():
        try:
            if not evaluate(server, query, window) and need_series:
                found[where] = f"no series: {query.expr}"
        except ValueError as error:
            found[where] = str(error)
    return found


def live_dashboard_queries(server: PrometheusServer, dashboard: dict[str, Any], window: Window) -> dict[str, Query]:
    """Every query of `dashboard` as it opens on `window`: each query variable offers its label values
    in Prometheus (Grafana's label_values()), and keeps its saved selection ("All")."""
    options = {
        variable["name"]: server.label_values(label, selector, window.start, window.end)
        for variable in dashboard.get("templating", {}).get("list", []) if variable["type"] == "query"
        for selector, label in [label_values_query(variable)]
    }
    return dashboard_queries(dashboard, selected_values(dashboard, options, window.builtins), options)


def alert_expressions() -> dict[str, Query]:
    """Every alert's whole expression: empty while the alert does not fire, but it must evaluate."""
    return {f"alert {rule['alert']}": Query(rule["expr"]) for rule in alerting_rules()}


def measured_series() -> dict[str, Query]:
    """What every alert compares with its thresholds (`measured_quantities`), and every recording rule."""
    measured = {f"alert {rule['alert']}: {quantity}": Query(quantity)
                for rule in alerting_rules() for quantity in measured_quantities(rule["expr"])}
    return measured | {f"record {rule['record']}": Query(rule["expr"]) for rule in recording_rules()}


# --- the short run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShortRun:
    """A finished short `dpe run` and the Prometheus that scraped it (still running).

    `window` runs from the start of the run to the last scrape at which every service was up.
    """

    server: PrometheusServer
    run_dir: Path
    window: Window


def publish_a_record_that_is_no_event(config: Path, bootstrap: str) -> None:
    """Create the run's topics and put a record that is not JSON on its unlabeled topic.

    The services that read it (agents, auditor) dead-letter it, as a healthy run dead-letters the
    odd malformed record from outside: so the dead-letter metrics are exercised.
    """
    settings = Settings.load(config)
    ensure_topics(settings, bootstrap)
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        producer.send(topic_for(UnlabeledItem, settings.kafka.topic_prefix), b"not an event").get(timeout=30)
    finally:
        producer.close()


def evaluator_exercises(folder: Path) -> dict[str, Any]:
    """Evaluator settings under which the short run also counts its failures: a judge at a port nothing
    listens on (each request fails, the rules attribute instead) and a benchmark in `folder` of two
    rows, one of them with an image outside its folder (skipped and counted)."""
    Image.new("RGB", (32, 32), "white").save(folder / "blank.png")
    rows = [{"question": "How many circles are there?", "answer": "0", "answer_type": "number", "image": image,
             "capability": "counting"} for image in ("blank.png", "../elsewhere.png")]
    (folder / "tiny.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"judge": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "judge", "max_retries": 0},
            "benchmarks": [{"name": "tiny", "path": str(folder / "tiny.jsonl"), "format": "jsonl"}]}


def last_all_up(server: PrometheusServer, jobs: Sequence[str], start: float, end: float) -> float:
    """The last second between `start` and `end` at which Prometheus scraped every one of `jobs` up."""
    selector = f'count(up{{job=~"{"|".join(jobs)}"}} == 1)'
    counts = [(float(t), float(v)) for series in server.query_range(selector, start, end, 1) for t, v in series["values"]]
    up = [t for t, count in counts if count == len(jobs)]
    assert up, f"never were all of {jobs} up at once: {counts}"
    return max(up)


def first_seen(server: PrometheusServer, selector: str, start: float, end: float) -> float:
    """The first second between `start` and `end` at which Prometheus has a sample of `selector`."""
    seen = [float(t) for series in server.query_range(selector, start, end, 1) for t, _ in series["values"]]
    assert seen, f"no sample of {selector} between {start} and {end}"
    return min(seen)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory, broker: EmbeddedBroker) -> Iterator[ShortRun]:
    """The README's first command, shortened (one round of 24 samples, a quickly warmed base model, the agents
    on the benchmarks' labelled fast path), on the session's broker, every service its own process, scraped by a
    real Prometheus while it runs.

    So that every dashboard panel has data, the run also meets what a healthy run meets now and then:
    a malformed record on the bus, an unreachable judge, a benchmark row it cannot use."""
    workdir = tmp_path_factory.mktemp("short-run")
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    ports = {service: free_port() for service in SERVICE_SECTIONS}
    config = workdir / "dpe.yaml"
    sections = {section: {"metrics_port": ports[service]} for service, section in SERVICE_SECTIONS.items()}
    sections["evaluator"] |= evaluator_exercises(workdir) | QUICK_EVAL
    sections["agents"] |= FAST_PATH["agents"]  # the dashboards, not the crew, are under test: the quick crew
    sections["ingest"] |= FAST_PATH["ingest"]
    kafka = {"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": f"short{uuid.uuid4().hex[:8]}."}
    metrics = {"last_scrape_s": 3}  # this Prometheus scrapes each second
    config.write_text(yaml.safe_dump(sections | {"kafka": kafka, "metrics": metrics}))
    publish_a_record_that_is_no_event(config, broker.bootstrap_servers)
    targets = {service: [f"127.0.0.1:{port}"] for service, port in ports.items()}
    with PrometheusServer.start(workdir / "prometheus", targets, rule_files=RULE_FILES) as server:
        env = {key: value for key, value in os.environ.items() if not key.startswith("DPE_")}
        command = [sys.executable, "-m", "dpe", "--config", str(config), "run", "--rounds", "1",
                   "--round-samples", "24", "--base-model", str(base_model), "--no-live",
                   "--runs-dir", str(workdir / "runs"), "--run-id", "short", "--timeout", "600"]
        started = time.time()
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=720)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        end = last_all_up(server, list(SERVICE_SECTIONS), started, time.time())
        weakness_since = first_seen(server, "dpe_weakness_error_rate", started, end)
        yield ShortRun(server, workdir / "runs" / "short", Window(started, end, weakness_since))


def test_a_short_dpe_run_completes_a_round_and_prometheus_has_weakness_per_capability(short_run: ShortRun) -> None:
    summary = json.loads((short_run.run_dir / "summary.json").read_text())
    assert summary["completed"] is True
    assert [r["policy_version"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][1]["samples_trained"] == 24
    assert all(r["heldout_items"] == QUICK_EVAL["synthetic"]["heldout_items"] for r in summary["rounds"]), \
        "both versions graded on the held-out suite"
    assert sum(summary["rounds"][0]["quota_plan"].values()) == 24
    assert (short_run.run_dir / "report.html").stat().st_size > 10_000, "the report holds its plots"

    server = short_run.server
    weakness = by_capability(server.query('last_over_time(dpe_weakness_error_rate{job="weakness"}[30m])'))
    assert set(weakness) == set(CAPABILITIES) and all(0.0 <= rate <= 1.0 for rate in weakness.values())
    trained = server.query('max_over_time(dpe_trainer_policy_version{job="trainer"}[30m])')
    assert len(trained) == 1 and float(trained[0]["value"][1]) >= 1.0, "the trainer announced version 1"
    scraped = server.query('max_over_time(up[30m])')
    assert {series["metric"]["job"]: float(series["value"][1]) for series in scraped} == dict.fromkeys(
        SERVICE_SECTIONS, 1.0)


def test_every_dashboard_query_and_alert_reads_series_of_the_short_run(short_run: ShortRun) -> None:
    server, window = short_run.server, short_run.window
    failing = problems(server, alert_expressions(), window, need_series=False)
    failing |= problems(server, measured_series(), window)
    for name, dashboard in load_dashboards().items():
        queries = live_dashboard_queries(server, dashboard, window)
        failing |= problems(server, {f"{name}: {where}": query for where, query in queries.items()}, window)
    assert failing == {}


def test_the_query_check_reports_a_misspelt_metric_and_a_query_that_does_not_parse(
    start_prometheus: StartPrometheus, weakness_metrics: str
) -> None:
    started = time.time()
    server = start_prometheus({"weakness": [weakness_metrics]})
    server.wait_for("dpe_weakness_error_rate", lambda r: len(r) == len(ERROR_RATES))
    [capability, *_] = load_dashboards()["dpe-spiral"]["templating"]["list"]
    targets = [{"refId": "A", "expr": 'max(dpe_weakness_error_rate{capability=~"$capability"})'},
               {"refId": "B", "expr": 'max(dpe_weakness_eror_rate{capability=~"$capability"})'},
               {"refId": "C", "expr": 'max(dpe_weakness_error_rate{capability=~"$capability"}'}]
    dashboard = {"templating": {"list": [capability]}, "panels": [{"id": 1, "targets": targets}]}
    window = Window(started, time.time())

    found = problems(server, live_dashboard_queries(server, dashboard, window), window)

    assert set(found) == {"panel_1_B", "panel_1_C"}, found
    assert found["panel_1_B"] == 'no series: max(dpe_weakness_eror_rate{capability=~"(colour|counting|ocr)"})'
    assert "parse error" in found["panel_1_C"]
