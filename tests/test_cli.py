"""The `dpe` command against the real embedded broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from dpe.cli import main
from dpe.events import Checkpoint
from tests.test_config import SECRET


def cli(settings, *args: str, input: str | None = None, env: dict | None = None):
    flags = ["--bootstrap", settings.kafka.bootstrap_servers, "--topic-prefix", settings.kafka.topic_prefix,
             "--home", str(settings.home)]
    return CliRunner().invoke(main, [*flags, *args], input=input, env=env, catch_exceptions=False)


def test_topics_create_is_idempotent(settings):
    first = cli(settings, "topics", "create")
    second = cli(settings, "topics", "create")
    assert first.exit_code == 0 and second.exit_code == 0
    assert "created" not in second.output and second.output.count("exists") == 9


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


