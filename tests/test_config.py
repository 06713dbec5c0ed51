"""Settings: precedence of YAML < environment < flags, and secrets that never leak."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from dpe.settings import Settings

SECRET = "s3cr3t-Pa55word-do-not-leak"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("DPE_"):
            monkeypatch.delenv(name)


def test_yaml_then_environment_then_flags(tmp_path, monkeypatch):
    config = tmp_path / "dpe.yaml"
    config.write_text("kafka:\n  bootstrap_servers: yaml:9092\n  topic_prefix: y.\n  linger_ms: 7\nhome: /from/yaml\n")
    assert Settings.load(config).kafka.bootstrap_servers == "yaml:9092"

    monkeypatch.setenv("DPE_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("DPE_HOME", "/from/env")
    settings = Settings.load(config)
    assert settings.kafka.bootstrap_servers == "env:9092"
    assert settings.kafka.topic_prefix == "y.", "fields the environment does not set keep the YAML value"
    assert settings.kafka.linger_ms == 7
    assert str(settings.home) == "/from/env"

    flagged = Settings.load(config, {"kafka": {"bootstrap_servers": "flag:9092", "topic_prefix": None}})
    assert flagged.kafka.bootstrap_servers == "flag:9092"
    assert flagged.kafka.topic_prefix == "y.", "an unset flag (None) must not mask lower layers"


def test_config_file_from_environment_variable(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("log_level: DEBUG\n")
    monkeypatch.setenv("DPE_CONFIG", str(config))
    assert Settings.load().log_level == "DEBUG"


def test_bad_config_file_is_a_clear_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        Settings.load(config)


def test_secrets_never_appear_in_repr_summary_or_errors(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DPE_KAFKA__SASL_PASSWORD", SECRET)
    settings = Settings.load(overrides={"kafka": {"sasl_mechanism": "PLAIN", "sasl_username": "u"}})
    assert settings.kafka.sasl_password.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert SECRET not in str(settings.summary())
    assert settings.summary()["kafka"]["sasl_password"] == "***"
    with pytest.raises(ValidationError) as error:
        Settings.load(overrides={"kafka": {"session_timeout_ms": -5, "security_protocol": "BOGUS"}})
    assert SECRET not in str(error.value)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("dpe").info("settings: %s", settings)
    assert SECRET not in caplog.text


def test_password_from_file(tmp_path):
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET + "\n")
    settings = Settings.load(overrides={"kafka": {"sasl_password_file": str(secret_file)}})
    assert settings.kafka.sasl_password.get_secret_value() == SECRET
    assert SECRET not in str(settings.summary())


def test_security_settings_reach_every_client_library():
    from dpe.bus.options import aiokafka_options, kafka_python_options

    settings = Settings.load(overrides={"kafka": {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                                  "sasl_username": "svc", "sasl_password": SECRET}})
    for options in (aiokafka_options(settings.kafka, "k:9092"), kafka_python_options(settings.kafka, "k:9092")):
        assert options["security_protocol"] == "SASL_PLAINTEXT"
        assert options["sasl_mechanism"] == "SCRAM-SHA-512"
        assert options["sasl_plain_username"] == "svc"
        assert options["sasl_plain_password"] == SECRET


def test_metrics_listen_on_loopback_unless_told_otherwise(monkeypatch):
    assert Settings.load().metrics.addr == "127.0.0.1"
    monkeypatch.setenv("DPE_METRICS__ADDR", "0.0.0.0")
    assert Settings.load().metrics.addr == "0.0.0.0", "containers say so (docker-compose.yml)"


def test_summary_masks_credentials_written_into_urls():
    endpoint = {"base_url": f"https://user:{SECRET}@api.example/v1", "model": "big-vlm"}
    settings = Settings.load(overrides={
        "kafka": {"bootstrap_servers": f"SASL_SSL://svc:{SECRET}@k1:9092,SASL_SSL://svc:{SECRET}@k2:9092"},
        "blob": {"url": f"s3://key:{SECRET}@minio:9000/bucket/blobs"},
        "evaluator": {"judge": endpoint},
        "auditor": {"references": [{"kind": "endpoint", "name": "big", "endpoint": endpoint}]},
    })
    summary = settings.summary()
    assert SECRET not in json.dumps(summary)
    assert summary["kafka"]["bootstrap_servers"] == "SASL_SSL://***@k1:9092,SASL_SSL://***@k2:9092"
    assert summary["blob"]["url"] == "s3://***@minio:9000/bucket/blobs"
    assert summary["evaluator"]["judge"]["base_url"] == "https://***@api.example/v1"
    assert summary["auditor"]["references"][0]["endpoint"]["base_url"] == "https://***@api.example/v1", "lists too"
    assert settings.blob.url == f"s3://key:{SECRET}@minio:9000/bucket/blobs", "the settings themselves keep them"


def test_the_default_taxonomy_is_the_synthetic_worlds():
    from dpe.config import WORLD_CAPABILITIES
    from dpe.world import CAPABILITIES

    assert WORLD_CAPABILITIES == tuple(CAPABILITIES)


def test_the_taxonomy_is_one_setting_every_section_follows():
    """`capabilities` sets what the evaluator, the stream and the auditor name; a section's own list set by hand to
    something else is refused, and a taxonomy without the synthetic world's capabilities turns its suites off."""
    default = Settings.load()
    assert default.stream.scoring.taxonomy == default.evaluator.capabilities == default.auditor.capabilities \
        == default.evaluator.synthetic.capabilities == default.capabilities
    mixed = Settings.load(overrides={"capabilities": ["color", "chart_graph", "math_formula"]})
    assert mixed.stream.scoring.taxonomy == mixed.auditor.capabilities == ("color", "chart_graph", "math_formula")
    assert mixed.evaluator.synthetic.capabilities == ("color",), "the synthetic suites cover the world's part"
    assert {probe.capability for probe in mixed.auditor.generic_probes} == {"color"}
    image_types = Settings.load(overrides={"capabilities": ["chart_graph", "mixed"]})
    assert image_types.evaluator.synthetic is None
    assert image_types.model_dump(exclude_unset=True) == {"capabilities": ("chart_graph", "mixed")}, \
        "derived sections are never taken for settings given by hand"
    with pytest.raises(ValidationError, match="set the top-level capabilities instead"):
        Settings.load(overrides={"stream": {"scoring": {"taxonomy": ["color"]}}})
    with pytest.raises(ValidationError, match="more than once"):
        Settings.load(overrides={"capabilities": ["color", "color"]})
