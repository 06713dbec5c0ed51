"""The `dpe` command against the real embedded broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ValidationError

from dpe.broker import BrokerError, wait_until_answers
from dpe.cli import main, user_error
from dpe.events import Checkpoint
from dpe.topics import TOPICS
from tests.test_config import SECRET


def cli(settings, *args: str, input: str | None = None, env: dict | None = None):
    flags = ["--bootstrap", settings.kafka.bootstrap_servers, "--topic-prefix", settings.kafka.topic_prefix,
             "--home", str(settings.home)]
    return CliRunner().invoke(main, [*flags, *args], input=input, env=env, catch_exceptions=False)


def test_topics_create_is_idempotent(settings):
    first = cli(settings, "topics", "create")
    second = cli(settings, "topics", "create")
    assert first.exit_code == 0 and second.exit_code == 0
    assert "created" not in second.output and second.output.count("exists") == len(TOPICS)


def test_publish_validates_lines_then_tail_shows_them(settings):
    lines = "\n".join([Checkpoint(policy_version=4, uri="/ckpt/4").model_dump_json(), '{"policy_version": "four"}',
                       Checkpoint(policy_version=5, parent_version=4, uri="/ckpt/5").model_dump_json()])
    published = cli(settings, "publish", "checkpoints", "-", input=lines)
    assert published.exit_code == 1, "an invalid line makes the command fail"
    assert "line 2" in published.output and "published 2" in published.output
    shown = cli(settings, "tail", "checkpoints", "-n", "10")
    assert shown.exit_code == 0
    assert '"uri": "/ckpt/4"' in shown.output and '"uri": "/ckpt/5"' in shown.output
    assert "four" not in shown.output


def test_tail_marks_invalid_records_without_dead_lettering(settings):
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    producer.send(f"{settings.kafka.topic_prefix}checkpoints", b"not json").get(timeout=10)
    producer.close()
    shown = cli(settings, "tail", "checkpoints")
    assert "invalid" in shown.output and "MalformedJSON" in shown.output
    letters = cli(settings, "tail", "deadletter")
    assert "DeadLetter" not in letters.output


def test_unknown_topic_is_a_usage_error(settings):
    result = CliRunner().invoke(main, ["--bootstrap", settings.kafka.bootstrap_servers, "tail", "nope"])
    assert result.exit_code == 2 and "unknown topic 'nope'" in result.output


def test_doctor_reports_health_and_hides_secrets(settings):
    env = {"DPE_KAFKA__SASL_PASSWORD": SECRET, "DPE_BLOB__URL": str(settings.home / "blobs")}
    result = cli(settings, "doctor", env=env)
    assert result.exit_code == 0, result.output
    assert "broker reachable" in result.output and "topics present" in result.output
    assert SECRET not in result.output and '"***"' in result.output


def test_doctor_masks_credentials_written_into_urls(settings):
    judge = json.dumps({"base_url": f"http://user:{SECRET}@judge.internal/v1", "model": "judge"})
    env = {"DPE_BLOB__URL": f"memory://key:{SECRET}@bucket/blobs", "DPE_EVALUATOR__JUDGE": judge}
    result = cli(settings, "doctor", env=env)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert result.output.count("memory://***@bucket/blobs") == 2, "the blob check's detail and the configuration"
    assert "http://***@judge.internal/v1" in result.output


def test_broker_errors_mask_credentials_written_into_urls():
    with pytest.raises(BrokerError) as error:
        wait_until_answers(f"SASL_SSL://svc:{SECRET}@127.0.0.1:1", timeout_s=0.2)
    assert SECRET not in str(error.value) and "SASL_SSL://***@127.0.0.1:1" in str(error.value)


def test_doctor_fails_without_a_broker(tmp_path):
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "doctor"], env={"DPE_BLOB__URL": str(tmp_path / "b")})
    assert result.exit_code == 1
    assert "no Kafka broker" in result.output


def test_broker_command_serves_until_terminated(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPE_")}
    proc = subprocess.Popen([sys.executable, "-m", "dpe", "--home", str(tmp_path), "broker"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "broker.json"
    try:
        for _ in range(200):
            if state.exists():
                break
            time.sleep(0.1)
        bootstrap = json.loads(state.read_text())["bootstrap_servers"]
        listed = CliRunner().invoke(main, ["--home", str(tmp_path), "topics", "list"])
        assert listed.exit_code == 0 and "no" not in listed.output.split("on broker")[1].replace("│", " ").split()
        assert bootstrap.startswith("127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "broker stopped" in output
    assert not state.exists(), "the state file is removed on a clean stop"


BENCHMARK_CONFIG = "evaluator:\n  benchmarks:\n    - {name: mmstar, path: /nowhere/mmstar.tsv, format: vlmeval_tsv}\n"
BAD_FORMAT_CONFIG = "evaluator:\n  benchmarks:\n    - {name: mmstar, path: /nowhere/mmstar.tsv, format: csv}\n"


@pytest.mark.parametrize(("config", "env", "args", "expected"), [
    (None, {}, ["--config", "/nowhere/dpe.yaml", "topics", "list"], "/nowhere/dpe.yaml: No such file or directory"),
    (None, {"DPE_KAFKA__SESSION_TIMEOUT_MS": "5"}, ["topics", "list"],
     "invalid setting kafka.session_timeout_ms (DPE_KAFKA__SESSION_TIMEOUT_MS): Input should be greater than"),
    (BAD_FORMAT_CONFIG, {}, ["eval"],
     "invalid setting evaluator.benchmarks.0.format (DPE_EVALUATOR__BENCHMARKS): Input should be 'vlmeval_tsv'"),
    (None, {"DPE_KAFKA": "{not json"}, ["topics", "list"], 'error parsing value for field "kafka"'),
    (None, {}, ["samples", "export", "--format", "trl", "--out", "x"], "no Kafka broker: set DPE_KAFKA__"),
    (None, {}, ["--bootstrap", "127.0.0.1:1", "samples", "export", "--format", "trl", "--out", "x"],
     "broker unreachable: KafkaConnectionError: Unable to bootstrap from"),
    (BENCHMARK_CONFIG, {}, ["eval", "--checkpoint", "/nowhere/ckpt", "--policy-version", "0", "--no-publish"],
     "benchmark file /nowhere/mmstar.tsv does not exist"),
], ids=["missing-config", "bad-env-setting", "bad-yaml-setting", "unparsable-env", "no-broker", "unreachable-broker",
        "missing-benchmark"])
def test_a_user_error_is_one_line_and_a_failure_not_a_traceback(tmp_path, config, env, args, expected):
    if config is not None:
        (tmp_path / "dpe.yaml").write_text(config)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DPE_")}
    result = subprocess.run([sys.executable, "-m", "dpe", "--home", str(tmp_path / "home"), *args], cwd=tmp_path,
                            env=clean | env | ({"DPE_CONFIG": str(tmp_path / "dpe.yaml")} if config else {}),
                            capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], output


class Point(BaseModel):
    x: int


def test_other_exceptions_are_bugs_and_keep_their_traceback():
    with pytest.raises(ValidationError) as invalid:
        Point(x="not a number")
    assert user_error(invalid.value) is None, "only a settings class's validation error is the user's"
    assert user_error(KeyError("x")) is None and user_error(RuntimeError("boom")) is None
    missing = FileNotFoundError(2, "No such file or directory", "a.yaml")
    assert user_error(missing) == "a.yaml: No such file or directory"

