"""A real Prometheus for tests: Debian's `prometheus` binary on a free loopback port.

`PrometheusServer.start` writes a config into a work folder (scrape the given targets every
second, optionally with rule files), starts the server with its storage in that folder and waits,
bounded, until it is ready; `stop` (or leaving the `with` block) ends it. Queries go to the HTTP API.

Example:
    with PrometheusServer.start(tmp_path, {"weakness": ["127.0.0.1:9101"]}) as prom:
        series = prom.wait_for('dpe_weakness_error_rate', lambda result: len(result) >= 3)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import yaml

INSTALL_HINT = "run .ci/install-tools to install it"

Result = list[dict[str, Any]]
"""The `data.result` list of an instant query: one {"metric": labels, "value": [ts, "v"]} per series."""

RangeResult = list[dict[str, Any]]
"""The `data.result` list of a range query: one {"metric": labels, "values": [[ts, "v"], ...]} per series."""


def require_tool(env_var: str, default: str) -> str:
    """Path of an external tool, from `env_var` or `default` on PATH; fails (never skips) if missing."""
    candidate = os.environ.get(env_var) or default
    found = shutil.which(candidate)
    if found is None:
        pytest.fail(f"{candidate} not found (set {env_var} or {INSTALL_HINT})")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `check` until it returns True; raise TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:g} s")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate `process`, killing it after `timeout` seconds; a no-op if it has exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def scrape_config(
    targets: Mapping[str, Sequence[str]], scrape_interval: str, rule_files: Sequence[Path]
) -> dict[str, Any]:
    """Prometheus configuration: one job per entry of `targets` (job name -> "host:port" list)."""
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(hosts)}]} for job, hosts in targets.items()
        ],
    }


@dataclass
class PrometheusServer:
    """A running Prometheus; `url` is its HTTP API root, `log_path` its combined output."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls,
        workdir: Path,
        targets: Mapping[str, Sequence[str]],
        *,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        ready_timeout: float = 30.0,
    ) -> PrometheusServer:
        """Start Prometheus in `workdir` (config, storage, log) scraping `targets`; wait until ready."""
        binary = require_tool("DPE_PROMETHEUS", "prometheus")
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(targets, scrape_interval, rule_files)))
        port = free_port()
        log_path = workdir / "prometheus.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        server = cls(f"http://127.0.0.1:{port}", process, log_path)
        try:
            wait_until(server.ready, ready_timeout, "Prometheus /-/ready")
        except (TimeoutError, RuntimeError) as error:
            server.stop()
            raise RuntimeError(f"Prometheus did not start:\n{server.log_tail()}") from error
        except BaseException:
            server.stop()
            raise
        return server

    def ready(self) -> bool:
        """True once the server answers /-/ready; raises if the process has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"Prometheus exited with {self.process.returncode}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, params: dict[str, Any]) -> Any:
        """The `data` of a GET of `/api/v1/<path>`; raises ValueError on an error answer (a bad query)."""
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise ValueError(f"{path} {params} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> Result:
        """Evaluate an instant PromQL query now (or at Unix time `at`); raises on an error answer."""
        return list(self.api("query", {"query": expr} | ({"time": at} if at is not None else {}))["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> RangeResult:
        """Evaluate a PromQL range query from `start` to `end` (Unix times), a point every `step` seconds."""
        return list(self.api("query_range", {"query": expr, "start": start, "end": end, "step": step})["result"])

    def label_values(self, label: str, selector: str, start: float, end: float) -> list[str]:
        """Values of `label` on the series of `selector` between `start` and `end`, as Grafana's label_values()."""
        return list(self.api(f"label/{label}/values", {"match[]": selector, "start": start, "end": end}))

    def wait_for(self, expr: str, accept: Callable[[Result], bool] = bool, timeout: float = 30.0) -> Result:
        """Re-run `expr` until `accept(result)`; on timeout fail with the last result and the log."""
        last: Result = []

        def accepted() -> bool:
            nonlocal last
            last = self.query(expr)
            return accept(last)

        try:
            wait_until(accepted, timeout, f"query {expr!r}", interval=0.5)
        except TimeoutError as error:
            raise AssertionError(f"{error}; last result {last}\n{self.log_tail()}") from None
        return last

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's output, for failure messages."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the server (kill if it lingers); safe to call twice."""
        stop_process(self.process)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
