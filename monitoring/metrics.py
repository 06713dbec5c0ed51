"""Every Prometheus metric dpe-stream exports, in one registry of names.

Names follow Prometheus conventions under the ``dpe_`` prefix; label sets are bounded (topic,
stage, error class, capability, reason code, role). Services expose them with `serve_metrics`.
"""

from __future__ import annotations

import functools

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

EVENTS_PUBLISHED = Counter("dpe_events_published_total", "Events published, by topic.", ["topic"])
EVENTS_CONSUMED = Counter("dpe_events_consumed_total", "Valid events consumed, by topic.", ["topic"])
DEADLETTERS = Counter(
    "dpe_deadletters_total", "Messages sent to the dead-letter topic, by origin topic, stage and error class.",
    ["topic", "stage", "error_class"],
)
CONSUMER_LAG = Gauge(
    "dpe_consumer_lag_messages", "Messages behind the fetch high-water mark, by group and topic.", ["group", "topic"]
)
HANDLE_SECONDS = Histogram(
    "dpe_handle_batch_seconds", "Time to handle one consumed batch, by service.", ["service"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)


@functools.cache
def published_counter(topic: str) -> Counter:
    """The labelled child of EVENTS_PUBLISHED for `topic` (cached: the publish path is hot)."""
    return EVENTS_PUBLISHED.labels(topic)


@functools.cache
def consumed_counter(topic: str) -> Counter:
    """The labelled child of EVENTS_CONSUMED for `topic` (cached: the consume path is hot)."""
    return EVENTS_CONSUMED.labels(topic)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Expose the default registry at http://addr:port/metrics (a no-op for port 0)."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
