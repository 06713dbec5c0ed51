"""Settings every service shares, and how settings are loaded and overridden.

`CoreSettings` holds what every process reads (home, kafka, blob store, metrics, policy placement, log
level, and the taxonomy: ``capabilities``, which every section that names capabilities follows). Each
service adds its own section in its ``settings.py`` as a subclass (``AgentsConfig(CoreSettings)``
with an ``agents: AgentSettings`` field), so a service reads only the sections it declares; the
application shell composes all of them into one `Settings` (`dpe.settings`). Every section is
a `dpe.section.Section`: frozen, unknown keys refused.

Sources, lowest to highest precedence: defaults, a YAML file (``--config`` or ``DPE_CONFIG``),
``DPE_``-prefixed environment variables (``__`` separates nested fields, e.g.
``DPE_KAFKA__BOOTSTRAP_SERVERS``), then CLI flags (`with_overrides`). Secrets are `SecretStr`; they
can also be read from files (``sasl_password_file``) and never appear in ``repr``, logs or
``summary()``, nor do credentials written into a URL (`mask_userinfo`).

Example:
    >>> s = CoreSettings.load(overrides={"kafka": {"bootstrap_servers": "k1:9092"}})
    >>> s.kafka.bootstrap_servers
    'k1:9092'
    >>> with_overrides(s, {"kafka": {"topic_prefix": "t."}}).kafka.topic_prefix
    't.'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, SecretStr, TypeAdapter, field_validator, model_validator
from pydantic_core import to_jsonable_python
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dpe.blobstore import ImageLimits
from dpe.section import Section

S = TypeVar("S", bound="CoreSettings")


class KafkaSettings(Section):
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
    fetch_max_wait_ms: int = Field(
        100, ge=0, description="How long a fetch waits for data: each hop's latency on the embedded broker, which "
        "wakes no waiting fetch. Idle consumers ask this often (at 10 ms, ten of them and the broker took a core)."
    )
    max_poll_interval_ms: int = Field(
        1_800_000, ge=10_000, description="Longest handler run (e.g. one evaluation) before the group evicts it."
    )
    linger_ms: int = Field(5, ge=0)
    max_batch_bytes: int = Field(256 * 1024, ge=1024)
    max_event_bytes: int = Field(1024 * 1024, ge=1024, description="Larger events are refused/dead-lettered.")
    partitions_override: int | None = Field(None, ge=1, description="Force a partition count on every topic.")
    replication_factor: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _password_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sasl_password") is None and data.get("sasl_password_file"):
            data = {**data, "sasl_password": SecretStr(Path(data["sasl_password_file"]).read_text().strip())}
        return data


class BlobSettings(Section):
    """Content-addressed image store: a local folder or any fsspec URL."""

    url: str = ".dpe/blobs"
    limits: ImageLimits = Field(default_factory=ImageLimits)


class MetricsSettings(Section):
    """Where this process exposes /metrics: each service section has its own ``metrics_port`` (stream 9101,
    evaluator 9102, auditor 9103, agents 9104, trainer 9105, ingest 9106, policy 9107, auditor-trainer 9108; 0 turns
    it off), and ``port``, when set, overrides it for the process (one container, one service)."""

    port: int = Field(0, ge=0, le=65535, description="This process's port, over the service's own (0: the service's).")
    addr: str = Field("127.0.0.1", description="Listen address: loopback unless told (0.0.0.0 in containers).")
    last_scrape_s: float = Field(
        10.0, ge=0, description="A finished dpe run keeps its services up this long, so that Prometheus scrapes "
                                "their last state (twice the shipped 5 s scrape interval; only when some service "
                                "serves /metrics)."
    )

    def port_for(self, service_port: int) -> int:
        """The port to serve on (0: none).

        >>> MetricsSettings().port_for(9105), MetricsSettings(port=9200).port_for(9105)
        (9105, 9200)
        """
        return self.port or service_port


TINY_MAX_PARAMETERS = 50_000_000
"""A checkpoint of at most this many parameters is tiny (the embedded default is under a million): it runs in float32
and trains with the ``tiny`` GRPO preset unless told otherwise; anything larger is a real checkpoint."""


class PlacementSettings(Section):
    """Where and in what precision every process loads a policy to run it (the evaluator, the difficulty band, the
    auditor's models, the policy server); `dpe.policy.placement` turns it into a device, dtype and attention kernel.

    ``auto`` picks a CUDA GPU when there is one; float32 for a checkpoint small enough that precision is free (the
    tiny model) and otherwise the checkpoint's own half precision (bfloat16 when it declares none), so a real
    checkpoint never runs in float32 on the CPU by accident; flash attention where it is installed and can run.
    A setting that asks for what the machine lacks (``cuda`` without a GPU, ``flash_attention_2`` without
    flash-attn) is an error at load, never a silent fallback.
    """

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    float32_max_parameters: int = Field(
        TINY_MAX_PARAMETERS, ge=0,
        description="With dtype auto, checkpoints up to this many parameters load in float32.",
    )


class InferenceSettings(Section):
    """Where the evaluator, the difficulty band and the auditor's target get the current policy's answers.

    ``local``: each loads its own copy of every checkpoint (where ``placement`` says). ``server``: they ask the
    policy server (`dpe serve policy`, vLLM in production) at `url` for ``model@vN``, the version they grade, and
    load nothing; a version the server has not loaded yet is waited for, up to `wait_s`, and a reply that names
    another version is refused, so an outcome is never attributed to the wrong version.

    >>> InferenceSettings(mode="server").versioned(3)
    'dpe-policy@v3'
    """

    mode: Literal["local", "server"] = "local"
    url: str = Field("http://127.0.0.1:8100/v1", description="The policy server's OpenAI base URL.")
    model: str = Field("dpe-policy", pattern=r"^[A-Za-z0-9_.-]+$", description="Its model name (policy.model_name).")
    wait_s: float = Field(600.0, gt=0, description="How long to wait for the server to serve a version.")
    timeout_s: float = Field(300.0, gt=0, description="Per request (a batch of n completions).")
    concurrency: int = Field(16, ge=1, description="Requests in flight per caller; the server batches them.")

    def versioned(self, version: int) -> str:
        """The model name that asks for policy version `version` itself."""
        return versioned_model(self.model, version)


def versioned_model(model: str, version: int) -> str:
    """The name a policy server answers policy version `version` of `model` under (`model_version` reads it)."""
    return f"{model}@v{version}"


def model_version(name: str) -> tuple[str, int | None]:
    """The model and the version a served model name asks for (None: the newest); ValueError for a bad version.

    >>> model_version("dpe-policy@v12"), model_version("dpe-policy")
    (('dpe-policy', 12), ('dpe-policy', None))
    """
    model, _, version = name.partition("@v")
    if version and not version.isdigit():
        raise ValueError(f"{name!r} names no policy version (model@vN)")
    return model, int(version) if version else None


WORLD_CAPABILITIES: tuple[str, ...] = (
    "counting", "color", "spatial", "existence", "text_reading", "chart", "arithmetic",
)
"""The synthetic world's capabilities (`dpe.world.CAPABILITIES`, which the core may not import), the default
taxonomy; a test keeps the two equal."""


def world_capabilities() -> tuple[str, ...]:
    """`WORLD_CAPABILITIES`, as a field's default factory."""
    return WORLD_CAPABILITIES


SectionT = TypeVar("SectionT", bound=Section)


def following(section: SectionT, where: str, field: str, capabilities: tuple[str, ...]) -> SectionT:
    """`section` with its `field` set to the deployment's `capabilities`; a different value set by hand is
    refused, so the taxonomy is set in one place.

    >>> from streams.settings import ScoringSettings
    >>> following(ScoringSettings(), "stream.scoring", "taxonomy", ("chart",)).taxonomy
    ('chart',)
    >>> following(ScoringSettings(taxonomy=("color",)), "stream.scoring", "taxonomy", ("chart",))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: stream.scoring.taxonomy ['color'] differs from capabilities ['chart']: set the top-level ...
    """
    if field in section.model_fields_set and tuple(getattr(section, field)) != capabilities:
        raise ValueError(f"{where}.{field} {list(getattr(section, field))} differs from capabilities "
                         f"{list(capabilities)}: set the top-level capabilities instead")
    return derived(section, **{field: capabilities})


def derived(section: SectionT, **values: Any) -> SectionT:
    """`section` with `values` derived from other settings; what counts as set by hand stays as it was."""
    copied = section.model_copy(update=values)
    copied.__pydantic_fields_set__ = set(section.model_fields_set)
    return copied


def set_derived(settings: BaseSettings, name: str, value: Any) -> None:
    """Replace section `name` of `settings` by a value derived from other settings, without marking it as set
    (so ``model_dump(exclude_unset=True)`` in `CoreSettings.load` never turns it into an override)."""
    settings.__dict__[name] = value


class CoreSettings(BaseSettings):
    """What every dpe process reads. Services subclass it with their own section (see the module doc)."""

    model_config = SettingsConfigDict(
        env_prefix="DPE_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    home: Path = Field(Path(".dpe"), description="Working folder: broker state, checkpoints, runs.")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    blob: BlobSettings = Field(default_factory=BlobSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    log_level: str = "INFO"
    capabilities: tuple[str, ...] = Field(
        default_factory=world_capabilities, min_length=1,
        description="The taxonomy: every capability the deployment evaluates, scores, plans and audits (the "
        "synthetic world's 7 by default; DPE's image types, `dpe.taxonomy.DPE_IMAGE_TYPES`, or a benchmark's own "
        "categories). Every section that names capabilities follows it.",
    )
    checkpoint_roots: tuple[Path, ...] = Field(
        (), description="Folders announced checkpoints may also be loaded from, besides <home>/checkpoints and the "
        "model cache (e.g. a base model's folder, or trainer.checkpoints.folder when it is elsewhere).",
    )

    @field_validator("capabilities")
    @classmethod
    def _distinct_capabilities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"capabilities lists {twice} more than once")
        return value

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

    @classmethod
    def load(cls: type[S], config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> S:
        """Build settings from YAML file < ``DPE_*`` environment < `overrides` (the CLI flags).

        `config_file` defaults to ``$DPE_CONFIG``. Overrides are nested dicts; `None` values are
        dropped so that unset flags do not mask lower layers.
        """
        layers = (
            _read_yaml(config_file or os.environ.get("DPE_CONFIG")),
            cls().model_dump(exclude_unset=True),
            _drop_none(overrides or {}),
        )
        merged: dict[str, Any] = {}
        for layer in layers:
            merged = deep_merge(merged, layer)
        return cls(**merged)

    def summary(self) -> dict[str, Any]:
        """Configuration with every secret replaced by '***' and the credentials of every URL masked
        (safe for logs and `dpe doctor`).

        >>> CoreSettings(blob={"url": "s3://key:secret@minio/blobs"}).summary()["blob"]["url"]
        's3://***@minio/blobs'
        """
        return _masked(_redact(self.model_dump(mode="json"), self))


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
"""``scheme://user:password@``: the userinfo runs to the last ``@`` before the path, query or fragment."""


def mask_userinfo(text: str) -> str:
    """`text` with the credentials (``user:password@``) of every URL in it replaced by ``***@``.

    Example:
        >>> mask_userinfo("broker at SASL_SSL://svc:p@ss@k1:9092,SASL_SSL://k2:9092 did not answer")
        'broker at SASL_SSL://***@k1:9092,SASL_SSL://k2:9092 did not answer'
        >>> mask_userinfo("http://vllm:8000/v1?user=a@b")
        'http://vllm:8000/v1?user=a@b'
    """
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _masked(value: Any) -> Any:
    """Plain data with `mask_userinfo` applied to every string in it, however deeply nested.

    >>> _masked({"refs": [{"base_url": "http://u:p@h/v1"}], "n": 1})
    {'refs': [{'base_url': 'http://***@h/v1'}], 'n': 1}
    """
    if isinstance(value, str):
        return mask_userinfo(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


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


def with_overrides(settings: S, overrides: dict[str, Any]) -> S:
    """`settings` with `overrides` laid over it, validated again (secrets kept; `None` values dropped).

    The one way command-line flags reach settings: `model_copy` would skip validation.
    """
    return type(settings)(**deep_merge(settings.model_dump(), _drop_none(overrides)))


def secret_env(model: BaseModel, prefix: str = "DPE_") -> dict[str, str]:
    """The ``DPE_*`` variables that give a child process every secret in `model`: how child processes get
    secrets, never through a written config file.

    A section holding a secret travels whole, as JSON, in its variable (``DPE_AGENTS``), so that it
    validates on its own as `CoreSettings.load` validates the environment: a lone
    ``DPE_EVALUATOR__JUDGE__API_KEY`` would lack the judge's required fields, and pydantic-settings reads
    no list index from a variable's name (``DPE_AUDITOR__REFERENCES__1__ENDPOINT__API_KEY`` is refused).

    Example:
        >>> class Ref(BaseModel):
        ...     name: str
        ...     key: SecretStr
        >>> class Demo(BaseModel):
        ...     token: SecretStr
        ...     refs: list[Ref]
        ...     plain: list[str] = []
        >>> secret_env(Demo(token="t", refs=[{"name": "b", "key": "k"}]))
        {'DPE_TOKEN': 't', 'DPE_REFS': '[{"name": "b", "key": "k"}]'}
    """
    env: dict[str, str] = {}
    for name in type(model).model_fields:
        value, variable = getattr(model, name), f"{prefix}{name.upper()}"
        if isinstance(value, SecretStr):
            env[variable] = value.get_secret_value()
        elif _holds_secret(data := _PLAIN.dump_python(value)):
            env[variable] = json.dumps(data, default=_revealed)
    return env


_PLAIN = TypeAdapter(Any)
"""Dumps any value to plain Python data, models included, with their secrets still `SecretStr`."""


def _holds_secret(data: Any) -> bool:
    """Whether plain data holds a `SecretStr` anywhere.

    >>> _holds_secret({"a": [1, {"b": SecretStr("x")}]}), _holds_secret([1, "x"])
    (True, False)
    """
    if isinstance(data, SecretStr):
        return True
    items = data.values() if isinstance(data, dict) else data
    return isinstance(items, Iterable) and not isinstance(items, (str, bytes)) and any(map(_holds_secret, items))


def _revealed(value: Any) -> Any:
    """`json.dumps`'s fallback: a secret in clear, anything else as pydantic writes it in JSON."""
    return value.get_secret_value() if isinstance(value, SecretStr) else to_jsonable_python(value)


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


def write_config(settings: BaseSettings, path: Path) -> None:
    """`settings` as YAML at `path`, every secret left out, wherever it is (`child_env` carries them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_jsonable_python(_without_secrets(settings.model_dump()))
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _without_secrets(data: Any) -> Any:
    """Plain data (a model's python-mode dump) with every `SecretStr` left out, in mappings and lists alike.

    >>> _without_secrets({"a": 1, "key": SecretStr("k"), "refs": [{"key": SecretStr("k"), "b": 2}]})
    {'a': 1, 'refs': [{'b': 2}]}
    """
    if isinstance(data, dict):
        return {key: _without_secrets(value) for key, value in data.items() if not isinstance(value, SecretStr)}
    if isinstance(data, (list, tuple)):
        return [_without_secrets(value) for value in data if not isinstance(value, SecretStr)]
    return data


def child_env(config_path: Path, settings: BaseSettings) -> dict[str, str]:
    """A child dpe process's environment: ours without ``DPE_*``, the config `write_config` wrote, and `settings`'
    secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPE_")}
    return env | {"DPE_CONFIG": str(config_path.resolve())} | secret_env(settings)
