"""Client options for each Kafka library, from one `KafkaSettings`.

Tuned for the embedded broker and still right for a real cluster: short session timeout and
1 s heartbeat (group joins wait about half the session timeout), small fetch wait (end-to-end
latency is about `fetch_max_wait_ms`), batching with a short linger. Security settings pass through.

Example:
    >>> from dpe.config import KafkaSettings
    >>> aiokafka_options(KafkaSettings(), "127.0.0.1:9092")["bootstrap_servers"]
    '127.0.0.1:9092'
"""

from __future__ import annotations

import ssl
from typing import Any

from dpe.config import KafkaSettings


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def _ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
    if kafka.ssl_certfile:
        context.load_cert_chain(str(kafka.ssl_certfile), str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
                                _secret(kafka.ssl_password))
    return context


def security_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Security keyword arguments shared by aiokafka and kafka-python."""
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.sasl_mechanism:
        options.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username,
                       sasl_plain_password=_secret(kafka.sasl_password))
    return options


def _client_id(kafka: KafkaSettings, role: str | None) -> str:
    return f"{kafka.client_id}-{role}" if role else kafka.client_id


def aiokafka_options(kafka: KafkaSettings, bootstrap: str, role: str | None = None) -> dict[str, Any]:
    """Common options for AIOKafkaProducer/AIOKafkaConsumer/AIOKafkaAdminClient; `role` names the client."""
    options = {"bootstrap_servers": bootstrap, "client_id": _client_id(kafka, role), **security_options(kafka)}
    context = _ssl_context(kafka)
    if context is not None:
        options["ssl_context"] = context
    return options


def kafka_python_options(kafka: KafkaSettings, bootstrap: str, role: str | None = None) -> dict[str, Any]:
    """Common options for kafka-python clients; `role` names the client."""
    options = {"bootstrap_servers": bootstrap.split(","), "client_id": _client_id(kafka, role),
               **security_options(kafka)}
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(kafka, name)
        if value is not None:
            options[name] = str(value)
    if kafka.ssl_password is not None:
        options["ssl_password"] = _secret(kafka.ssl_password)
    return options


def producer_tuning(kafka: KafkaSettings) -> dict[str, Any]:
    """Batching and durability options understood by both aiokafka and kafka-python producers."""
    return {"acks": "all", "linger_ms": kafka.linger_ms, "max_request_size": kafka.max_event_bytes * 5}


def consumer_tuning(kafka: KafkaSettings) -> dict[str, Any]:
    """Fast group joins and low fetch latency for aiokafka and kafka-python consumers."""
    return {
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": max(kafka.max_event_bytes * 2, 1 << 20),
    }
