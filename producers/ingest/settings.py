"""Settings of the ingest service (`dpe ingest`), the ``ingest`` section.

`IngestConfig` is what ingest reads: the core settings plus this section.

Example:
    >>> IngestSettings(allowed_roots=["/data/images", "s3://bucket/unlabeled"]).metrics_port
    9106
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from dpe.config import CoreSettings
from dpe.section import Section


class IngestSettings(Section):
    """Where ingest may read from, how it remembers what it published, how it paces itself."""

    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Folders or fsspec URL prefixes that manifest entries may point into. Empty: only the "
        "manifest's own folder (the working folder for a manifest on standard input).",
    )
    index_file: Path | None = Field(
        default=None, description="Local index of published content hashes (default <home>/ingest/published.txt)."
    )
    poll_interval_s: float = Field(default=2.0, gt=0, description="How often --watch looks for new files.")
    settle_polls: int = Field(
        default=1, ge=0, description="--watch ingests a file once its size and mtime stayed the same this many polls."
    )
    max_manifest_line_bytes: int = Field(default=1_000_000, ge=100, description="Longer manifest lines are refused.")
    synthetic_seed: int = Field(default=0, ge=0, description="Seed of the synthetic world's unlabeled scene stream.")
    image_size: int = Field(default=64, ge=16, le=1024, description="Side of synthetic images in pixels.")
    answer_key: bool = Field(
        default=False, description="Keep the world's answer key: synthetic items carry their scene as metadata, and "
        "a scene's fields in a manifest's metadata are kept. Only for the benchmarks' fast path (`agents.backends: "
        "programmatic`); by default they are stripped and the agents see pixels, hints and notes only."
    )
    ack_every: int = Field(default=256, ge=1, description="Wait for broker acks (and update the index) this often.")
    max_backlog: int | None = Field(
        default=None, ge=0, description="Wait while more published items than this are unconsumed by the slowest "
        "consumer group (None: never wait). `dpe run` sets it: its endless synthetic stream should not outrun the agents."
    )
    metrics_port: int = Field(default=9106, ge=0, le=65535, description="Prometheus port; 0 disables it.")


class IngestConfig(CoreSettings):
    """What ingest reads: the core settings and its own section."""

    ingest: IngestSettings = Field(default_factory=IngestSettings)
