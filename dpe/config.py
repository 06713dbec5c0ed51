"""One settings object for every service.

Sources, lowest to highest precedence: defaults, a YAML file (``--config`` or ``DPE_CONFIG``),
``DPE_``-prefixed environment variables (``__`` separates nested fields, e.g.
``DPE_KAFKA__BOOTSTRAP_SERVERS``), then CLI flags. Secrets are `SecretStr`; they can also be read
from files (``sasl_password_file``) and never appear in ``repr``, logs or ``summary()``.

Example:
    >>> s = load_settings(overrides={"kafka": {"bootstrap_servers": "k1:9092"}})
    >>> s.kafka.bootstrap_servers
    'k1:9092'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from consumers.settings import AgentSettings
from dpe.blobstore import ImageLimits
from streams.settings import StreamSettings
from trainer.settings import TrainerSettings
from producers.settings import IngestSettings
from producers.diagnosis_settings import AuditorSettings, EvaluatorSettings


class KafkaSettings(BaseModel):
    """Where the bus is and how to talk to it. No bootstrap servers means the embedded broker."""

    bootstrap_servers: str | None = None
    topic_prefix: str = "dpe."
    client_id: str = "dpe"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    session_timeout_ms: int = Field(6000, ge=1000, description="Short: group joins wait ~half of it.")
    heartbeat_interval_ms: int = Field(1000, ge=100)
    fetch_max_wait_ms: int = Field(10, ge=0, description="End-to-end latency is about this long.")
    max_poll_interval_ms: int = Field(
        1_800_000, ge=10_000, description="Longest handler run (e.g. one evaluation) before the group evicts it."
    )
    linger_ms: int = Field(5, ge=0)
    max_batch_bytes: int = Field(256 * 1024, ge=1024)
    max_event_bytes: int = Field(1024 * 1024, ge=1024, description="Larger events are refused/dead-lettered.")
    partitions_override: int | None = Field(None, ge=1, description="Force a partition count on every topic.")
    replication_factor: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _password_from_file(self) -> "KafkaSettings":
        if self.sasl_password is None and self.sasl_password_file is not None:
            self.sasl_password = SecretStr(self.sasl_password_file.read_text().strip())
        return self


class BlobSettings(BaseModel):
    """Content-addressed image store: a local folder or any fsspec URL."""

    url: str = ".dpe/blobs"
    limits: ImageLimits = Field(default_factory=ImageLimits)


class MetricsSettings(BaseModel):
    """Where this process exposes /metrics: each service section has its own ``metrics_port``
    (stream 9101, evaluator 9102, auditor 9103, agents 9104, trainer 9105, ingest 9106; 0 turns
    it off), and ``port``, when set, overrides it for the process (one container, one service)."""

    port: int = Field(0, ge=0, le=65535, description="This process's port, over the service's own (0: the service's).")
    addr: str = "0.0.0.0"

    def port_for(self, service_port: int) -> int:
        """The port to serve on (0: none).

        >>> MetricsSettings().port_for(9105), MetricsSettings(port=9200).port_for(9105)
        (9105, 9200)
        """
        return self.port or service_port


class Settings(BaseSettings):
    """Everything a dpe service can be told. Sections belong to the components that read them."""

    model_config = SettingsConfigDict(
        env_prefix="DPE_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    home: Path = Field(Path(".dpe"), description="Working folder: broker state, checkpoints, runs.")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    blob: BlobSettings = Field(default_factory=BlobSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    agents: AgentSettings = Field(default_factory=AgentSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    evaluator: EvaluatorSettings = Field(default_factory=EvaluatorSettings)
    auditor: AuditorSettings = Field(default_factory=AuditorSettings)
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    def summary(self) -> dict[str, Any]:
        """Configuration with every secret replaced by '***' (safe for logs and `dpe doctor`)."""
        return _redact(self.model_dump(mode="json"), self)


def _redact(value: Any, model: Any) -> Any:
    if isinstance(model, BaseModel):
        out = {}
        for name, item in value.items():
            attr = getattr(model, name, None)
            out[name] = "***" if isinstance(attr, SecretStr) else _redact(item, attr)
        return out
    return value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, nested mappings merged key by key.

    >>> deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}})
    {'a': {'b': 1, 'c': 3}}
    """
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build settings from YAML file < ``DPE_*`` environment < `overrides` (the CLI flags).

    `config_file` defaults to ``$DPE_CONFIG``. Overrides are nested dicts; `None` values are
    dropped so that unset flags do not mask lower layers.
    """
    layers = (
        _read_yaml(config_file or os.environ.get("DPE_CONFIG")),
        Settings().model_dump(exclude_unset=True),
        _drop_none(overrides or {}),
    )
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    return Settings(**merged)


def with_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """`settings` with `overrides` laid over it (secrets kept; `None` values dropped)."""
    return Settings(**deep_merge(settings.model_dump(), _drop_none(overrides)))


def secret_env(model: BaseModel, prefix: str = "DPE_") -> dict[str, str]:
    """Every secret in `model` as the ``DPE_*`` variable that sets it: how child processes get secrets,
    never through a written config file."""
    env: dict[str, str] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            env[f"{prefix}{name.upper()}"] = value.get_secret_value()
        elif isinstance(value, BaseModel):
            env |= secret_env(value, f"{prefix}{name.upper()}__")
    return env


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    if not path:
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def _drop_none(value: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        if isinstance(item, dict):
            item = _drop_none(item)
            if item:
                out[key] = item
        elif item is not None:
            out[key] = item
    return out
