"""Shared fixtures: one real embedded broker per test session, fresh topics per test."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dpe.broker import EmbeddedBroker  # noqa: E402
from dpe.bus.admin import ensure_topics  # noqa: E402
from dpe.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """The embedded Tansu broker, started once for the whole session."""
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log) as running:
        yield running


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path, monkeypatch) -> Settings:
    """Settings pointing at the session broker, with this test's own topics and folders."""
    for name in list(os.environ):
        if name.startswith("DPE_"):
            monkeypatch.delenv(name)
    prefix = f"t{uuid.uuid4().hex[:10]}."
    configured = Settings.load(overrides={
        "home": str(tmp_path / "home"),
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix},
        "blob": {"url": str(tmp_path / "blobs")},
    })
    ensure_topics(configured, broker.bootstrap_servers)
    return configured
