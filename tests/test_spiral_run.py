"""`dpe run` as a user runs it: its supervisor restarts a service that dies, Ctrl-C or SIGTERM stops
everything and still writes the report, and a run killed outright leaves no orphans.

The run is real (embedded broker, every service its own process) on a quickly warmed base model; it
runs `--forever`, so only a signal ends it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
import yaml
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from PIL import Image, ImageDraw
from prometheus_server import wait_until

from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up
from tests.agent_helpers import FAST_PATH, QUICK_EVAL

SERVICES = ("weakness", "evaluator", "auditor", "agents", "trainer", "ingest")

pytestmark = [pytest.mark.timeout(600), pytest.mark.spiral]


def services_of(run: psutil.Process) -> dict[str, psutil.Process]:
    """The run's service processes by name (`python -m dpe ... serve NAME` or `... ingest`)."""
    found = {}
    for child in run.children():
        try:
            args = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        name = args[args.index("serve") + 1] if "serve" in args else "ingest" if "ingest" in args else None
        if name is not None:
            found[name] = child
    return found


def running(check: Callable[[], object], proc: subprocess.Popen, log: Path) -> Callable[[], bool]:
    """`check` for `wait_until`, failing at once (with the run's log) if `dpe run` has exited."""
    def checked() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"dpe run exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        return bool(check())
    return checked


_RUNS: list[subprocess.Popen] = []
"""Every `dpe run` a test started: killed at the test's end if still running."""


@pytest.fixture(autouse=True)
def no_run_outlives_its_test() -> Iterator[None]:
    """A test that fails half-way must not leave its `dpe run` running (its services die with it)."""
    yield
    while _RUNS:
        proc = _RUNS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def launch(tmp_path: Path, how: list[str], log_name: str = "run.log", max_versions: int = 4,
           fast_path: bool = True, command: str = "run") -> tuple[subprocess.Popen, Path]:
    """`dpe run` (or `dpe experiment`) with the options `how`, without metrics ports and with `QUICK_EVAL`:
    (process, its log). `max_versions` is the trainer's staleness bound; `fast_path` puts the agents and ingest
    on `FAST_PATH`."""
    config = tmp_path / "dpe.yaml"
    sections = {section: {"metrics_port": 0}
                for section in ("stream", "evaluator", "auditor", "agents", "ingest", "policy")}
    sections["evaluator"] |= QUICK_EVAL
    if fast_path:
        for section in ("agents", "ingest"):
            sections[section] |= FAST_PATH[section]
    trainer = {"metrics_port": 0, "staleness": {"max_versions": max_versions}}
    config.write_text(yaml.safe_dump(sections | {"trainer": trainer}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("DPE_")}
    log = tmp_path / log_name
    argv = [sys.executable, "-m", "dpe", "--config", str(config), command, *how, "--no-live",
            "--runs-dir", str(tmp_path / "runs")]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    _RUNS.append(proc)
    return proc, log


def start_forever_run(tmp_path: Path, *extra: str, log_name: str = "run.log", max_versions: int = 4
                      ) -> tuple[subprocess.Popen, psutil.Process, Path]:
    """`dpe run --forever` (or `dpe run` with `extra` options) on a quickly warmed base model, once every
    service is running: (process, its psutil view, its log). `max_versions` is the trainer's staleness bound.

    These tests are about processes, signals and the bus, not about who writes the samples: the agents run on
    the benchmarks' labelled fast path (`FAST_PATH`), which is quicker than the default pixel crew."""
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    how = list(extra) or ["--forever", "--round-samples", "24", "--base-model", str(base_model), "--run-id", "r"]
    proc, log = launch(tmp_path, how, log_name, max_versions)
    run = psutil.Process(proc.pid)
    try:
        wait_until(running(lambda: set(services_of(run)) == set(SERVICES), proc, log), 120, "every service")
    except BaseException:
        proc.kill()
        raise
    return proc, run, log


def still_alive(processes: set[psutil.Process]) -> list[str]:
    """The command lines of `processes` still running. `is_running` compares start times, so a pid that an
    unrelated process took meanwhile (pids wrap at 32768 here) is not taken for a survivor."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid}: {' '.join(process.cmdline())}")
        except psutil.NoSuchProcess:
            continue
    return alive


def test_a_killed_service_is_restarted_and_ctrl_c_stops_every_process_and_writes_the_report(tmp_path):
    proc, run, log = start_forever_run(tmp_path)
    try:
        started = services_of(run)
        descendants = set(run.children(recursive=True))

        started["agents"].kill()
        wait_until(running(lambda: services_of(run).get("agents", started["agents"]).pid != started["agents"].pid,
                           proc, log), 30, "the agents restarted")
        descendants.add(services_of(run)["agents"])
        summary_path = tmp_path / "runs" / "r" / "summary.json"
        wait_until(running(lambda: "policy v1:" in log.read_text(errors="replace"), proc, log), 240,
                   "a first trained round, graded: the run has seen it (the trainer's own log says so earlier)")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "Ctrl-C is how a --forever run ends"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (alive := still_alive(descendants)), f"processes left running after Ctrl-C: {alive}"
    summary = json.loads(summary_path.read_text())
    assert summary["completed"] is False and summary["rounds_requested"] is None
    assert [r["policy_version"] for r in summary["rounds"]][:2] == [0, 1], "the report keeps what was done"
    assert (tmp_path / "runs" / "r" / "report.html").exists()


def newest_checkpoint(run_dir: Path) -> int:
    """Policy version of the newest complete checkpoint on disk (0: none yet; older ones are pruned)."""
    return max((int(path.name[1:]) for path in (run_dir / "home" / "checkpoints").glob("v*") if path.name[1:].isdigit()),
               default=0)


def stop_with_sigterm(proc: subprocess.Popen, run: psutil.Process, log: Path) -> None:
    """What `docker stop` and systemd send: exit 0, and no process of the run left behind."""
    descendants = set(run.children(recursive=True))
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (alive := still_alive(descendants)), f"SIGTERM left processes running: {alive}"


def ballast(run_dir: Path, megabytes: int) -> None:
    """Put `megabytes` of records in the run's embedded broker on a topic no service reads (a roll carries only
    dpe's topics over): the broker outgrows its memory bound now instead of after minutes of traffic."""
    bootstrap = json.loads((run_dir / "bus.json").read_text())["bootstrap_servers"]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("ballast", 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=1 << 20)
    for _ in range(megabytes * 2):
        producer.send("ballast", os.urandom(512 << 10))
    producer.flush()
    producer.close()


@pytest.mark.timeout(900)
def test_sigterm_stops_dpe_run_like_ctrl_c_and_resume_goes_on_across_a_bus_roll(tmp_path):
    """A run whose embedded broker outgrows its bound (36 MB, ballast added) is rolled to a fresh one and trains
    on; SIGTERM stops it like Ctrl-C (report written, run saved); `--resume` goes on from its last checkpoint: the
    next version number, no second version 0, no sample trained twice, every round planned.

    The trainer's staleness bound is 1 version, and the run goes past 3 versions: every round still trains all
    its samples (each sample names the version it was made against, so none is dropped as stale)."""
    run_dir = tmp_path / "runs" / "r"
    proc, run, log = start_forever_run(tmp_path, "--forever", "--round-samples", "24", "--run-id", "r",
                                       "--bus-memory-mb", "36", "--base-model",
                                       str(warm_up(WarmupConfig(steps=60), show_progress=False).folder),
                                       max_versions=1)
    ballast(run_dir, 24)
    rolled = lambda: "bus rolled to epoch 1" in log.read_text(errors="replace")  # noqa: E731
    wait_until(running(rolled, proc, log), 240, "the embedded broker to be rolled")
    enough = max(3, newest_checkpoint(run_dir) + 1)
    wait_until(running(lambda: newest_checkpoint(run_dir) >= enough, proc, log), 360,
               f"version {enough}, trained after the roll")
    stop_with_sigterm(proc, run, log)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and summary["bus_epochs"] >= 2
    assert (run_dir / "report.html").exists() and (run_dir / "bus" / "state.jsonl.gz").exists()
    stopped_at = newest_checkpoint(run_dir)

    proc, run, log = start_forever_run(tmp_path, "--resume", "r", log_name="resume.log", max_versions=1)
    wait_until(running(lambda: newest_checkpoint(run_dir) > stopped_at, proc, log), 240,
               "a version trained after the resume")
    stop_with_sigterm(proc, run, log)

    summary = json.loads((run_dir / "summary.json").read_text())
    versions = [r["policy_version"] for r in summary["rounds"]]
    assert summary["resumed"] is True and versions == list(range(versions[-1] + 1)) and versions[-1] >= stopped_at, \
        "the report goes on from the stopped run's rounds (a version still being graded at the stop is not in it)"
    assert newest_checkpoint(run_dir) > stopped_at, "the resumed run trained a new version"
    assert all(sum(r["quota_plan"].values()) == 24 for r in summary["rounds"][:-1]), "every trained round was planned"
    assert versions[-1] >= 3 and all(r["samples_trained"] == 24 for r in summary["rounds"][1:]), \
        "past the staleness bound, every round trains all its samples"
    trainer_log = (run_dir / "logs" / "trainer.log").read_text(errors="replace")
    assert trainer_log.count("announced policy version 0 ") == 1, "version 0 announced once, not again on resume"
    manifests = [json.loads((path / "manifest.json").read_text())
                 for path in (run_dir / "home" / "checkpoints").glob("v*") if path.name[1:].isdigit()]
    trained = [sample_id for manifest in manifests for sample_id in manifest["event"]["sample_ids"]]
    assert len(trained) == len(set(trained)) > 0, "no sample trained twice"


def test_a_killed_dpe_run_takes_its_services_and_broker_with_it(tmp_path):
    """kill -9 of the parent leaves no orphans: each child asked the kernel for SIGTERM when its parent dies."""
    proc, run, log = start_forever_run(tmp_path)
    descendants = set(run.children(recursive=True))
    proc.kill()
    proc.wait()
    wait_until(lambda: not still_alive(descendants), 30, "the orphans to stop")


def drawn_images(folder: Path, count: int, seed: int = 0) -> None:
    """PNGs drawn with Pillow, not rendered by the synthetic world: two to four discs and squares in primary
    colours on white, at sizes and places of their own."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    colours = [(230, 30, 30), (30, 160, 50), (30, 70, 230), (240, 200, 20)]
    for number in range(count):
        image = Image.new("RGB", (128, 128), "white")
        draw = ImageDraw.Draw(image)
        for slot in range(rng.randint(2, 4)):
            x, y = 18 + slot % 2 * 60 + rng.randint(0, 12), 18 + slot // 2 * 60 + rng.randint(0, 12)
            size, colour = rng.randint(22, 32), rng.choice(colours)
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + size, y + size), fill=colour)
        image.save(folder / f"drawn-{number:03d}.png")


def test_dpe_run_images_trains_on_a_folder_of_pngs_drawn_outside_the_synthetic_world(tmp_path):
    """`dpe run --images DIR` with the default pixel crew: the folder is the only data, and a round trains on it.
    Its plan asks for every capability; the round closes 30 s after its first sample (`--round-timeout`)."""
    drawn_images(tmp_path / "inbox", 40)
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    proc, log = launch(tmp_path, ["--images", str(tmp_path / "inbox"), "--rounds", "1", "--round-samples", "12",
                                  "--round-timeout", "30", "--base-model", str(base_model), "--run-id", "r"],
                       fast_path=False)
    assert proc.wait(540) == 0, log.read_text(errors="replace")[-3000:]
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["completed"] is True and summary["rounds"][1]["samples_trained"] > 0, summary["rounds"]
    assert summary["samples_accepted"] >= summary["rounds"][1]["samples_trained"]
    trained = summary["rounds"][1]["samples_trained_by_capability"]
    assert sum(trained.values()) == summary["rounds"][1]["samples_trained"], "each trained sample has its capability"



def test_dpe_experiment_starts_every_arm_from_the_given_base_model_and_writes_its_tidy_table(tmp_path):
    """`dpe experiment --base-model DIR` is the command a GPU machine runs with a real checkpoint: every arm starts
    from DIR, trains its rounds and is graded on the same held-out suite; its runs, never resumed, leave no bus."""
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    proc, log = launch(tmp_path, ["--arm", "static", "--arm", "uniform", "--seed", "0", "--rounds", "1",
                                  "--round-samples", "16", "--heldout-per-capability", "4",
                                  "--base-model", str(base_model)], command="experiment")
    assert proc.wait(540) == 0, log.read_text(errors="replace")[-3000:]
    [folder] = (tmp_path / "runs").iterdir()
    data = json.loads((folder / "experiment.json").read_text())
    assert data["base_model"] == str(base_model) and data["seconds"] > 0
    assert sorted((row["arm"], row["round"]) for row in data["runs"]) == [
        ("static", 0), ("static", 1), ("uniform", 0), ("uniform", 1)]
    assert all(set(row["heldout_items"].values()) == {4} for row in data["runs"])
    assert [sum(row["samples_trained"].values()) for row in data["runs"] if row["round"] == 1] == [16, 16]
    for arm in ("static", "uniform"):
        summary = json.loads((folder / arm / "seed0" / "summary.json").read_text())
        assert summary["base_model"] == str(base_model) and summary["strategy"] == arm
        assert not (folder / arm / "seed0" / "bus").exists(), "an experiment's run saves no bus"


def two_graded_rounds(tmp_path: Path, *how: str) -> tuple[Path, Path]:
    """`dpe run --rounds 2 --round-samples 24` with the options `how` on a quickly warmed base, which must complete
    with every version graded: (the run's folder, the base model's)."""
    base_model = warm_up(WarmupConfig(steps=60), show_progress=False).folder
    proc, log = launch(tmp_path, [*how, "--rounds", "2", "--round-samples", "24", "--base-model", str(base_model),
                                  "--run-id", "r"])
    assert proc.wait(540) == 0, log.read_text(errors="replace")[-3000:]
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] is True
    assert [record["policy_version"] for record in summary["rounds"]] == [0, 1, 2]
    assert all(record["heldout_items"] > 0 for record in summary["rounds"]), "every version was graded"
    return run, base_model


@pytest.mark.parametrize("lora", [None, 8], ids=["full", "lora"])
def test_dpe_run_inference_server_grades_every_version_through_one_policy_server(tmp_path, lora):
    """`dpe run --inference server` (and with `--lora 8`): the run starts `dpe serve policy`, which loads each
    version (with LoRA, the trainer's adapter-only checkpoints, merged onto their base); the evaluator, the difficulty
    band and the auditor load none and ask it for `dpe-policy@vN`, so every round is graded by the version it
    names."""
    run, base_model = two_graded_rounds(tmp_path, "--inference", "server", *(["--lora", str(lora)] if lora else []))
    logs = {name: (run / "logs" / f"{name}.log").read_text() for name in ("policy", "evaluator", "agents", "auditor")}
    assert all(f"serving policy v{version} " in logs["policy"] for version in (0, 1, 2)), logs["policy"][-2000:]
    for version in (0, 1, 2):
        assert f"policy v{version}: answered by the policy server" in logs["evaluator"], logs["evaluator"][-2000:]
    assert "policy v0: answered by the policy server" in logs["agents"], "the band asked the server"
    assert "answered by the policy server" in logs["auditor"], "the auditor's target is served"
    if lora:
        checkpoints = sorted((run / "home" / "checkpoints").glob("v*"))
        names = {folder.name for folder in checkpoints}
        assert {"v00000001", "v00000002"} <= names, "(a round may end as the run stops)"
        for folder in checkpoints:
            adapter = json.loads((folder / "adapter_config.json").read_text())
            assert adapter["base_model_name_or_path"] == str(base_model)
            assert not (folder / "model.safetensors").exists(), "adapter-only checkpoints"
