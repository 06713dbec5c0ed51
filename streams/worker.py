"""Running a weakness-stream worker: `run_worker(settings)` blocks until SIGTERM or SIGINT.

Start as many as you like with the same settings; they share the evidence partitions. The metrics
endpoint uses ``metrics.port`` if set, else ``stream.metrics_port`` (give each worker on one host its
own port, or 0 for none).

Example:
    >>> run_worker(load_settings())                               # doctest: +SKIP
"""

from __future__ import annotations

from faust.worker import Worker

from dpe.broker import resolve_bootstrap
from dpe.bus.admin import ensure_topics
from dpe.config import Settings
from monitoring.metrics import serve_metrics
from streams.app import create_app


def run_worker(settings: Settings) -> None:
    """Create the registry topics if needed, expose metrics, and run one worker of the stream."""
    bootstrap = resolve_bootstrap(settings)
    ensure_topics(settings, bootstrap)
    settings.home.mkdir(parents=True, exist_ok=True)
    serve_metrics(settings.metrics.port_for(settings.stream.metrics_port), settings.metrics.addr)
    app = create_app(settings, bootstrap)
    Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
