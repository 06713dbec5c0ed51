"""Offline checks of the production deployment: docker-compose.yml, Prometheus and Grafana wiring.

There is no Docker engine here, so the compose file is validated against the compose-spec JSON
schema (check-jsonschema) and then checked for what the schema cannot see: every dpe service runs
a real subcommand from the project's image, every mounted host path exists, every metrics port is
scraped, vLLM stays behind the `gpu` profile, Kafka runs KRaft. Tools come from `.ci/install-tools`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dpe.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "monitoring/prometheus/prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "monitoring/grafana/provisioning"
INSTALL_HINT = "run .ci/install-tools to install it"

DPE_COMMANDS = {
    "topics": ["topics", "create"],
    "weakness": ["serve", "weakness"],
    "evaluator": ["serve", "evaluator"],
    "auditor": ["serve", "auditor"],
    "agents": ["serve", "agents"],
    "trainer": ["serve", "trainer", "--num-processes", "${DPE_TRAINER_GPUS:-1}"],
    "ingest": ["ingest", "--watch", "/data/inbox"],
    "policy": ["serve", "policy"],
    "auditor-trainer": ["serve", "auditor-trainer"],
}
METRICS_PORTS = {"weakness": 9101, "evaluator": 9102, "auditor": 9103, "agents": 9104, "trainer": 9105, "ingest": 9106,
                 "policy": 9107, "auditor-trainer": 9108}
ONE_SHOT = {"topics"}

VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str) -> str:
    """Resolve compose variables as an unset environment would: `${X:-d}` -> d, `${X:?m}` -> <X>.

    A bare `${X}` would silently become empty when X is unset, so it is an error here.
    """

    def resolve(match: re.Match[str]) -> str:
        op = match["op"]
        if op is None:
            raise AssertionError(f"{match[0]} has no default and is not marked required (use :- or :?)")
        return match["arg"] if op.endswith("-") else f"<{match['name']}>"

    return VARIABLE.sub(resolve, text.replace("$$", "\0")).replace("\0", "$")


def tool(env_var: str, default: Path | str) -> str:
    """Path of an external validator, from `env_var` or its default; fails (not skips) if missing."""
    candidate = os.environ.get(env_var) or str(default)
    found = shutil.which(candidate)
    if found is None:
        pytest.fail(f"{candidate} not found (set {env_var} or {INSTALL_HINT})")
    return found


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    validator = tool("DPE_CHECK_JSONSCHEMA", ROOT / ".cache/tools-venv/bin/check-jsonschema")
    return subprocess.run(
        [validator, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def dpe_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services built from the project's Dockerfile (everything that runs `dpe`)."""
    return {name: svc for name, svc in services.items() if "build" in svc}


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS.read_text())


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume, variables resolved; named volumes included."""
    mounts = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"use the short volume syntax: {volume!r}"
        source, target, *_ = interpolate(volume).split(":")
        mounts.append((source, target))
    return mounts


def is_host_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def container_port(spec: str | int) -> int:
    """The container side of a `ports`/`expose` entry ("127.0.0.1:9090:9090/tcp" -> 9090)."""
    return int(str(spec).split(":")[-1].split("/")[0])


# --- schema --------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def misspell_image(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    kafka["imgae"] = kafka.pop("image")


def ports_as_mapping(compose: dict[str, Any]) -> None:
    compose["services"]["kafka"]["ports"] = {"29092": "29092"}


def unknown_dependency_condition(compose: dict[str, Any]) -> None:
    compose["services"]["grafana"]["depends_on"]["prometheus"]["condition"] = "when_ready"


@pytest.mark.parametrize("breakage", [misspell_image, ports_as_mapping, unknown_dependency_condition])
def test_validator_rejects_a_broken_compose_file(tmp_path: Path, breakage: Any) -> None:
    broken = yaml.safe_load(COMPOSE.read_text())
    breakage(broken)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = check_compose_schema(path)
    assert result.returncode != 0, f"{breakage.__name__} was accepted:\n{result.stdout}"
    assert "Schema validation errors" in result.stdout, result.stdout + result.stderr


def test_every_variable_has_a_default_or_is_required() -> None:
    interpolate(COMPOSE.read_text())


# --- dpe services --------------------------------------------------------------------------------


def _resolves(args: list[str]) -> bool:
    """Whether `dpe ARGS` names a real dpe command (every group level resolves, then its --help runs)."""
    from click.testing import CliRunner

    from dpe.cli import main

    result = CliRunner().invoke(main, [*args, "--help"])
    return result.exit_code == 0



def test_dpe_services_build_the_project_image_and_run_dpe_subcommands(
    dpe_services: dict[str, dict[str, Any]],
) -> None:
    assert (ROOT / "Dockerfile").is_file()
    assert "ENTRYPOINT [\"dpe\"]" in (ROOT / "Dockerfile").read_text()
    assert {name: svc["command"] for name, svc in dpe_services.items()} == DPE_COMMANDS
    for name, svc in dpe_services.items():
        assert svc["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name
        command = [interpolate(arg) for arg in svc["command"]]
        assert _resolves(command), f"{name}: `dpe {' '.join(command)}` is not a dpe command"
        assert "entrypoint" not in svc, f"{name} must run the image's `dpe` entrypoint"
    assert len({svc["image"] for svc in dpe_services.values()}) == 1, "one image for every dpe service"


def test_dpe_services_are_configured_by_environment_and_the_mounted_yaml(
    dpe_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, svc in dpe_services.items():
        env = svc["environment"]
        assert env["DPE_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["DPE_BLOB__URL"] == "/data/blobs", name
        assert ("./deploy/dpe.yaml", env["DPE_CONFIG"]) in bind_mounts(svc), name
        if name not in ONE_SHOT:
            assert ("blobs", env["DPE_BLOB__URL"]) in bind_mounts(svc), name

    for var in [v for v in os.environ if v.startswith("DPE_")]:
        monkeypatch.delenv(var)
    settings = Settings.load(ROOT / "deploy/dpe.yaml")
    assert settings.blob.url == "/data/blobs"
    assert settings.evaluator.synthetic is not None
    assert settings.stream.quotas.round_evidence == settings.evaluator.synthetic.round_items > 0, \
        "production plans once per version, when its round suite is graded, as `dpe run` does"
    assert_known_keys(yaml.safe_load((ROOT / "deploy/dpe.yaml").read_text()), Settings, "deploy/dpe.yaml")


def assert_known_keys(data: dict[str, Any], model: type[BaseModel], where: str) -> None:
    """Every key in `data` names a field of `model` (Settings ignores unknown keys, so typos hide)."""
    for key, value in data.items():
        assert key in model.model_fields, f"{where}: unknown setting {key!r}"
        annotation = model.model_fields[key].annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            assert_known_keys(value, annotation, f"{where}:{key}")


def test_services_wait_for_kafka_and_topics(dpe_services: dict[str, dict[str, Any]]) -> None:
    for name, svc in dpe_services.items():
        depends = svc["depends_on"]
        assert depends["kafka"] == {"condition": "service_healthy"}, name
        if name in ONE_SHOT:
            assert svc["restart"] == "no" and svc["healthcheck"] == {"disable": True}
        else:
            assert depends["topics"] == {"condition": "service_completed_successfully"}, name
            assert svc["restart"] == "unless-stopped", name
            assert "DPE_METRICS__PORT" in str(svc["healthcheck"]["test"]), name


def test_every_mounted_host_path_exists_in_the_repository(
    compose: dict[str, Any], services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        for source, target in bind_mounts(svc):
            if is_host_path(source):
                path = (ROOT / source).resolve()
                inside = not Path(source).is_absolute() and path.is_relative_to(ROOT)
                assert inside, f"{name}: {source} is outside the repository"
                assert path.exists(), f"{name}: mounted host path {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name


# --- metrics -------------------------------------------------------------------------------------


def scrape_targets(prometheus: dict[str, Any]) -> dict[str, set[str]]:
    """job name -> "host:port" targets, from static and DNS service discovery."""
    jobs: dict[str, set[str]] = {}
    for job in prometheus["scrape_configs"]:
        targets = jobs.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets.update(f"{host}:{dns['port']}" for host in dns["names"])
    return jobs


def test_each_service_exports_metrics_on_its_own_port(dpe_services: dict[str, dict[str, Any]]) -> None:
    ports = {name: svc for name, svc in dpe_services.items() if name not in ONE_SHOT}
    assert set(ports) == set(METRICS_PORTS)
    for name, svc in ports.items():
        assert svc["environment"]["DPE_METRICS__PORT"] == str(METRICS_PORTS[name]), name
        assert [container_port(p) for p in svc["expose"]] == [METRICS_PORTS[name]], name


def test_every_scraped_dpe_container_serves_metrics_beyond_its_loopback(
    dpe_services: dict[str, dict[str, Any]], prometheus: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Metrics listen on 127.0.0.1 unless told otherwise: each container Prometheus scrapes tells it."""
    scraped = {target.rsplit(":", 1)[0] for targets in scrape_targets(prometheus).values() for target in targets}
    assert scraped & set(dpe_services) == set(METRICS_PORTS)
    for var in [v for v in os.environ if v.startswith("DPE_")]:
        monkeypatch.delenv(var)
    assert Settings.load().metrics.addr == "127.0.0.1"
    for name in sorted(scraped & set(dpe_services)):
        monkeypatch.setenv("DPE_METRICS__ADDR", dpe_services[name]["environment"].get("DPE_METRICS__ADDR", "unset"))
        assert Settings.load().metrics.addr == "0.0.0.0", name


def test_every_exposed_port_is_scraped(services: dict[str, dict[str, Any]], prometheus: dict[str, Any]) -> None:
    jobs = scrape_targets(prometheus)
    targets = set().union(*jobs.values())
    exposed = {f"{name}:{container_port(p)}" for name, svc in services.items() for p in svc.get("expose", [])}
    assert exposed, "no service exposes a metrics port"
    assert exposed - targets == set(), "exposed ports nobody scrapes"
    for name, port in METRICS_PORTS.items():
        assert jobs[name] == {f"{name}:{port}"}
    for target in targets:
        host = target.rsplit(":", 1)[0]
        assert host in services or host == "localhost", f"scrape target {target} is not a compose service"


def test_prometheus_config_passes_promtool(services: dict[str, dict[str, Any]]) -> None:
    promtool = tool("DPE_PROMTOOL", "promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    mounts = dict(bind_mounts(services["prometheus"]))
    assert mounts["./monitoring/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./monitoring/prometheus/rules"] == "/etc/prometheus/rules"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(services: dict[str, dict[str, Any]]) -> None:
    mounts = dict(bind_mounts(services["grafana"]))
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"

    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources/prometheus.yml").read_text())["datasources"]
    [source] = datasources
    assert (source["type"], source["uid"], source["isDefault"]) == ("prometheus", "prometheus", True)
    host_port = source["url"].removeprefix("http://")
    assert host_port in {f"prometheus:{container_port(p)}" for p in services["prometheus"]["ports"]}

    [provider] = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards/dpe.yml").read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts["./monitoring/grafana/dashboards"]


# --- GPUs, the policy server, vLLM and Kafka -----------------------------------------------------


def gpu_count(svc: dict[str, Any]) -> int:
    """The NVIDIA GPUs a service reserves (0: none), with its variables at their defaults."""
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return sum(int(interpolate(str(device["count"]))) for device in devices
               if device.get("driver") == "nvidia" and "gpu" in device["capabilities"])


def test_the_trainers_and_the_policy_server_reserve_gpus_and_the_trainer_one_rank_per_gpu(
    dpe_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    reserving = {name: gpu_count(svc) for name, svc in dpe_services.items() if gpu_count(svc)}
    assert reserving == {"trainer": 1, "policy": 1, "auditor-trainer": 1}
    trainer = dpe_services["trainer"]
    assert trainer["command"][-1] == trainer["deploy"]["resources"]["reservations"]["devices"][0]["count"], \
        "as many DeepSpeed ranks as reserved GPUs"
    for var in [v for v in os.environ if v.startswith("DPE_")]:
        monkeypatch.delenv(var)
    assert Settings.load(ROOT / "deploy/dpe.yaml").placement.device == "auto", "a reserved GPU is used when present"


def test_the_policy_server_answers_for_every_service_that_grades_or_filters_by_the_policy(
    dpe_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Served inference is the compose default: the evaluator, the agents' difficulty band and the auditor ask the
    policy server, at the address it listens on, for the model it serves."""
    for var in [v for v in os.environ if v.startswith("DPE_")]:
        monkeypatch.delenv(var)
    policy = dpe_services["policy"]["environment"]
    with monkeypatch.context() as server_env:
        for name, value in policy.items():
            server_env.setenv(name, value)
        server = Settings.load(ROOT / "deploy/dpe.yaml").policy
    assert server.host == "0.0.0.0"
    for name in ("evaluator", "agents", "auditor"):
        with monkeypatch.context() as client_env:
            for variable, value in dpe_services[name]["environment"].items():
                client_env.setenv(variable, value)
            inference = Settings.load(ROOT / "deploy/dpe.yaml").inference
        assert inference.mode == "server", name
        assert inference.url == f"http://policy:{server.port}/v1" and inference.model == server.model_name, name
    for name in ("weakness", "trainer", "ingest"):
        assert "DPE_INFERENCE__MODE" not in dpe_services[name]["environment"], name


# --- vLLM and Kafka ------------------------------------------------------------------------------


def test_vllm_runs_only_in_the_gpu_profile_from_local_weights(services: dict[str, dict[str, Any]]) -> None:
    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm.get("profiles") == ["gpu"]
    assert [name for name, svc in services.items() if "profiles" in svc] == ["vllm"]
    assert services["agents"]["depends_on"]["vllm"]["required"] is False, "agents must start without the gpu profile"

    [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    assert vllm["environment"]["HF_HUB_OFFLINE"] == "1"
    model = interpolate(vllm["command"][0])
    assert any(model.startswith(target + "/") for source, target in bind_mounts(vllm) if is_host_path(source)), (
        f"model {model} is not under a mounted folder"
    )


def test_kafka_runs_kraft_without_zookeeper(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert interpolate(env["CLUSTER_ID"])
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert ("kafka-data", env["KAFKA_LOG_DIRS"]) in bind_mounts(kafka)
    assert "zookeeper" not in COMPOSE.read_text().lower()
