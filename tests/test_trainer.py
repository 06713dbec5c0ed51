"""The GRPO trainer on the tiny model through the real broker: rounds, DeepSpeed on CPU, optimiser
state across rounds and restarts, staleness, dead letters, checkpoint fallback, and kill -9 of a real
trainer process at several points with a ledger that shows every sample trained exactly once."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner
from PIL import Image
from prometheus_client import REGISTRY

from dpe.blobstore import BlobStore
from dpe.cli.model import model as model_cli
from dpe.broker import free_port
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.events import AcceptedSample, BlobRef, Checkpoint, DeadLetter, Event
from dpe.policy.architectures import build_published_policy
from dpe.policy.config import WarmupConfig
from dpe.policy.generation import SamplingParams, generate
from dpe.policy.model import Policy, load_policy
from dpe.policy.prompts import build_messages
from dpe.policy.warmup import warm_up
from dpe.recent import RecentIds
from dpe.settings import Settings
from dpe.topics import topic_for
from dpe.world import make_item
from trainer.checkpoints import ANNOUNCED, CheckpointStore, verify
from trainer.distributed import build_deepspeed_ops
from trainer.engine import GRPOEngine, step_batches
from trainer.samples import TrainingSample, staleness_weight
from trainer.service import RoundReport, checkpoint_root, run_trainer
from trainer.settings import StalenessSettings, TrainerSettings

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = TrainerSettings().extensions_dir.expanduser().resolve()
"""The trainer's own op folder (`trainer.extensions_dir`): `.ci/run` builds DeepSpeed's op there before the tests."""
RECIPE = WarmupConfig(mix={"color": 1.0}, levels=(1,), steps=40, batch_size=16)
"""A base model that answers the colour questions right part of the time: GRPO gets a signal."""


CLEAN_ENV: dict[str, str] = {}
"""The environment before this module's engines touched it (what trainer subprocesses get)."""


@pytest.fixture(scope="module", autouse=True)
def one_process_world():
    """One torch thread and the single-process DeepSpeed rendezvous for this module, undone afterwards
    (DeepSpeed, accelerate and transformers also leave variables of their own in the environment)."""
    threads = torch.get_num_threads()
    CLEAN_ENV.update(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                      TORCH_EXTENSIONS_DIR=str(EXTENSIONS))
    torch.set_num_threads(1)
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(CLEAN_ENV)


@pytest.fixture(scope="module")
def base_model(one_process_world) -> Path:
    """The warmed tiny model (cached by dpe.policy.warmup after the first run)."""
    return warm_up(RECIPE, show_progress=False).folder


def overrides(settings: Settings, base_model: Path, **trainer: Any) -> dict[str, Any]:
    """Settings of a test trainer: this test's topics and folders, a tiny fast GRPO."""
    section = {
        "base_model": str(base_model),
        "torch_threads": 1,
        "grpo": {"group_size": 4, "prompts_per_step": 4},
        "rounds": {"max_samples": 100, "max_seconds": 2.0},
        "checkpoints": {"keep_last": 1000},
    }
    for key, value in trainer.items():
        section[key] = section[key] | value if isinstance(value, dict) and key in section else value
    return {
        "home": str(settings.home),
        "log_level": "INFO",
        "kafka": {"bootstrap_servers": settings.kafka.bootstrap_servers, "topic_prefix": settings.kafka.topic_prefix},
        "blob": {"url": settings.blob.url},
        "metrics": {"port": free_port(), "addr": "127.0.0.1"},
        "trainer": section,
    }


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def accepted(blobs: BlobStore, index: int, *, policy_version: int = 0, sample_id: str | None = None,
             **body_changes: Any) -> AcceptedSample:
    item = make_item("color", 1, 10_000 + index)
    body = item.to_sample_body(blobs.put_image(png(item.image))).model_copy(update=body_changes)
    return AcceptedSample(sample_id=sample_id or f"sample-{index}", capability="color", body=body,
                          source_item_id=f"item-{index}", plan_id="plan-test", agents=[], qc=[],
                          policy_version=policy_version)


async def publish(settings: Settings, events: list[Event]) -> None:
    async with AsyncPublisher(settings, producer_name="test") as publisher:
        for event in events:
            await publisher.publish(event)
        await publisher.flush()


async def read_all(settings: Settings, model: type[Event], quiet_s: float = 1.5) -> list[Event]:
    """Every event of a topic, from the beginning, until nothing new arrives for `quiet_s`."""
    async with AsyncPublisher(settings, producer_name="test") as publisher, AsyncSubscriber(
        settings, [model], group_id=None, service="test", publisher=publisher, subscribe=False
    ) as subscriber:
        await subscriber.assign_all()
        events: list[Event] = []
        last = time.monotonic()
        while time.monotonic() - last < quiet_s:
            batch = await subscriber.fetch(timeout_ms=200)
            if batch:
                events.extend(delivery.event for delivery in batch)
                last = time.monotonic()
    return events


def training_sample(index: int, weight: float = 1.0) -> TrainingSample:
    item = make_item("color", 1, 20_000 + index)
    return TrainingSample(sample_id=f"t{index}", capability=item.capability, image=item.image, question=item.question,
                          answer=item.answer, answer_type=item.answer_type, options=item.options,
                          tolerance=item.tolerance, policy_version=0, weight=weight)


def versions(reports: list[RoundReport]) -> list[int]:
    return [report.version for report in reports]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- pure pieces -------------------------------------------------------------------------------------


def test_step_batches_repeat_each_prompt_group_size_times_and_shard_across_ranks():
    rows = [{"prompt": name} for name in "abcde"]
    steps = step_batches(rows, prompts_per_step=2, group_size=2)
    assert [[r["prompt"] for r in step] for step in steps] == [["a", "a", "b", "b"], ["c", "c", "d", "d"], ["e", "e"]]
    shards = [step_batches(rows[:2], 2, 4, rank=rank, world_size=2)[0] for rank in (0, 1)]
    assert [[r["prompt"] for r in shard] for shard in shards] == [["a"] * 4, ["b"] * 4]


def test_a_build_lock_left_by_a_killed_build_does_not_stall_the_next_trainer(tmp_path: Path):
    """torch waits forever on a `lock` file a killed op build left; dpe removes it under its own lock.

    The locks are left in the shared, built folder (torch takes a folder's lock even when nothing is to be built),
    so that the test needs no second compile of the ops. The second process is not told the folder through
    $TORCH_EXTENSIONS_DIR: it must build into the folder it is given, not compile the op again into torch's default
    folder (under $XDG_CACHE_HOME)."""
    folder = EXTENSIONS
    build_deepspeed_ops(folder)
    built = {path: path.stat().st_mtime_ns for path in folder.glob("*/*.so")}
    leftovers = [path / "lock" for path in folder.iterdir() if path.is_dir()]
    assert built and leftovers, "DeepSpeed built no op to leave a lock in"
    for lock in leftovers:
        lock.touch()
    env = {name: value for name, value in CLEAN_ENV.items() if name != "TORCH_EXTENSIONS_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    build = "import sys; from pathlib import Path; from trainer.distributed import build_deepspeed_ops as b; b(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", build, str(folder)], check=True, timeout=240, cwd=ROOT, env=env)
    assert not any(lock.exists() for lock in leftovers)
    assert {path: path.stat().st_mtime_ns for path in folder.glob("*/*.so")} == built, "the op was built again"
    assert not any(tmp_path.iterdir()), "the op was built into torch's default folder"


RENDEZVOUS = """
import json, os, psutil
from deepspeed import comm
from trainer.distributed import prepare_process
from trainer.settings import TrainerSettings
prepare_process(TrainerSettings(torch_threads=1))
comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
listening = [c.laddr for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]
print(json.dumps({"store": int(os.environ["MASTER_PORT"]), "listening": listening}))
"""
"""A trainer process up to its DeepSpeed rendezvous, as `GRPOEngine` starts it without a launcher (no model)."""


def test_the_one_process_rendezvous_listens_on_loopback_only():
    """torch's rendezvous store listens on every interface unless handed a socket; gloo on the host name's address."""
    env = {name: value for name, value in CLEAN_ENV.items() if not name.startswith("DPE_")}
    env["TORCH_EXTENSIONS_DIR"] = str(EXTENSIONS)
    done = subprocess.run([sys.executable, "-c", RENDEZVOUS], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env=env, check=True)
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["store"] in [port for _, port in report["listening"]], "the store is the one this process serves"
    assert {ip for ip, _ in report["listening"]} == {"127.0.0.1"}, report["listening"]


def test_staleness_weight_and_recent_ids():
    drop = StalenessSettings(max_versions=2)
    assert [staleness_weight(v, 5, drop) for v in (5, 3, 2, 7)] == [1.0, 1.0, None, 1.0]
    down = StalenessSettings(max_versions=2, action="downweight", decay=0.5)
    assert [staleness_weight(v, 5, down) for v in (3, 2, 0)] == [1.0, 0.5, 0.125]
    assert staleness_weight(0, 100, StalenessSettings(max_versions=None)) == 1.0
    recent = RecentIds(capacity=3, ids=["a", "b"])
    for sample_id in ("c", "d", "b"):
        recent.add(sample_id)
    assert recent.ids() == ["c", "d", "b"] and "a" not in recent and len(recent) == 3


# --- through the broker ------------------------------------------------------------------------------


async def test_round_through_the_broker_changes_the_weights_and_announces_a_checkpoint(settings, base_model):
    configured = Settings.load(overrides=overrides(settings, base_model))
    blobs = BlobStore(configured.blob.url, configured.blob.limits)
    good = [accepted(blobs, i) for i in range(8)]
    nowhere = BlobRef(sha256="ab" * 32, media_type="image/png", size_bytes=10, width=8, height=8)
    missing = accepted(blobs, 100, image=nowhere)
    corrupt = accepted(blobs, 101)
    sha = corrupt.body.image.sha256
    (Path(configured.blob.url) / sha[:2] / sha[2:4] / sha).write_bytes(b"not the bytes that were stored")
    ungradable = accepted(blobs, 102, answer="many", answer_type="number", options=None)
    await publish(configured, [*good, good[0], good[3], missing, corrupt, ungradable])
    unknown_type = json.loads(accepted(blobs, 103).model_dump_json())
    unknown_type["body"]["answer_type"] = "ranking"
    producer = AIOKafkaProducer(bootstrap_servers=configured.kafka.bootstrap_servers)
    await producer.start()
    topic = topic_for(AcceptedSample, configured.kafka.topic_prefix)
    await producer.send_and_wait(topic, json.dumps(unknown_type).encode(), key=b"x")
    await producer.stop()
    trained_before = metric("dpe_trainer_samples_total", outcome="trained")

    assert versions(await run_trainer(configured, max_rounds=1)) == [1]

    base, announcement = await read_all(configured, Checkpoint)
    assert (base.policy_version, base.uri) == (0, str(base_model)), "the base model is announced as version 0"
    assert announcement.policy_version == 1 and announcement.parent_version == 0
    assert sorted(announcement.sample_ids) == sorted(s.sample_id for s in good)
    assert sum(r.end - r.start for r in announcement.trained_on) == 14, "every record read is covered, trained or not"
    assert announcement.metrics["skipped_duplicate"] == 2 and announcement.metrics["skipped_dead_lettered"] == 3
    expected_metrics = {"reward_mean", "reward_std", "frac_zero_std", "kl", "loss", "step_time_s", "tokens_per_s"}
    assert expected_metrics <= set(announcement.metrics)
    letters = {letter.error_class: letter for letter in await read_all(configured, DeadLetter)}
    assert set(letters) == {"BlobMissing", "BlobCorrupt", "InvalidSample", "SchemaViolation"}
    assert all(letters[name].stage == "trainer.admit" for name in ("BlobMissing", "BlobCorrupt", "InvalidSample"))
    assert letters["SchemaViolation"].stage in ("decode", "validate")
    assert "answer_type" in letters["SchemaViolation"].error_message

    folder = Path(announcement.uri)
    manifest = verify(folder)
    assert manifest.event == announcement and manifest.global_step == 2
    assert (folder / "deepspeed").is_dir(), "optimizer state of the DeepSpeed engine (ZeRO-2, gloo, one process)"
    assert (folder / ANNOUNCED).exists()
    base, trained = load_policy(base_model).model, load_policy(folder).model
    pairs = zip(base.parameters(), trained.parameters(), strict=True)
    changed = [a for a, b in pairs if not torch.equal(a, b)]
    assert len(changed) > len(list(base.parameters())) // 2
    assert metric("dpe_trainer_samples_total", outcome="trained") - trained_before == 8
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{configured.metrics.port}/metrics", timeout=5).read().decode()
    for name in ("dpe_trainer_reward_mean", "dpe_trainer_kl", "dpe_trainer_step_seconds_bucket",
                 "dpe_trainer_checkpoint_write_seconds_count", "dpe_trainer_lag_messages", "dpe_trainer_rounds_total"):
        assert name in scraped


async def test_stale_samples_are_dropped_and_counted(settings, base_model):
    configured = Settings.load(overrides=overrides(settings, base_model, staleness={"max_versions": 0}))
    blobs = BlobStore(configured.blob.url, configured.blob.limits)
    await publish(configured, [accepted(blobs, i) for i in range(4)])
    assert versions(await run_trainer(configured, max_rounds=1)) == [1]
    stale = [accepted(blobs, i, policy_version=0) for i in range(10, 14)]
    fresh = [accepted(blobs, i, policy_version=1) for i in range(20, 24)]
    await publish(configured, [*stale, *fresh])
    dropped_before = metric("dpe_trainer_samples_total", outcome="stale_dropped")

    assert versions(await run_trainer(configured, max_rounds=1)) == [2]

    second = verify(checkpoint_root(configured) / "v00000002")
    assert sorted(second.event.sample_ids) == sorted(s.sample_id for s in fresh)
    assert sorted(second.skipped["stale_dropped"]) == sorted(s.sample_id for s in stale)
    assert second.event.metrics["skipped_stale_dropped"] == 4
    assert metric("dpe_trainer_samples_total", outcome="stale_dropped") - dropped_before == 4


async def test_corrupt_and_half_written_checkpoints_fall_back_and_never_reuse_a_version(settings, base_model, caplog):
    configured = Settings.load(overrides=overrides(settings, base_model, rounds={"max_samples": 4}))
    blobs = BlobStore(configured.blob.url, configured.blob.limits)
    await publish(configured, [accepted(blobs, i) for i in range(8)])
    assert versions(await run_trainer(configured, max_rounds=2)) == [1, 2]
    folder = checkpoint_root(configured)
    first, second = verify(folder / "v00000001"), verify(folder / "v00000002")
    weights = folder / "v00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    (folder / ".partial-v00000003").mkdir()
    (folder / ".partial-v00000003" / "model.safetensors").write_bytes(b"half")
    (folder / "v00000001" / ANNOUNCED).unlink()

    assert versions(await run_trainer(configured, max_rounds=1)) == [3]

    third = verify(folder / "v00000003")
    assert third.event.parent_version == 1
    assert sorted(third.event.sample_ids) == sorted(second.event.sample_ids), "the lost round is trained again"
    assert third.event.trained_on == second.event.trained_on
    assert "v00000002 is corrupt" in caplog.text and "half-written" in caplog.text
    events = [e for e in await read_all(configured, Checkpoint)]
    assert [e.policy_version for e in events] == [0, 1, 2, 1, 3]
    assert events[3] == events[1] == first.event, "a checkpoint not acknowledged is announced again, identically"


async def test_optimizer_state_carries_over_a_round_boundary_and_a_restart(settings, base_model, tmp_path):
    configured = Settings.load(overrides=overrides(settings, base_model)).trainer
    samples = [training_sample(i) for i in range(12)]
    engine = GRPOEngine(base_model, configured, tmp_path / "a")
    engine.train_round(samples[:4])
    after_one = adam_state(engine)
    engine.train_round(samples[4:8])
    after_two = adam_state(engine)
    assert after_one["step"] == 1 and after_two["step"] == 2, "Adam's step count continues across rounds"
    assert not torch.equal(after_one["exp_avg_sq"], after_two["exp_avg_sq"])
    assert torch.count_nonzero(after_one["exp_avg_sq"]) > 0

    saved = tmp_path / "saved"
    saved.mkdir()
    engine.save(saved)
    restarted = GRPOEngine(base_model, configured, tmp_path / "b")
    restarted.load_checkpoint(saved, engine.global_step)
    restored = adam_state(restarted)
    assert restored["step"] == 2 and restarted.global_step == 2
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(restored[key], after_two[key])

    for running in (engine, restarted):
        torch.manual_seed(7)
        running.train_round(samples[8:12])
    for a, b in zip(engine.policy.model.parameters(), restarted.policy.model.parameters(), strict=True):
        assert torch.equal(a, b), "a restarted engine takes exactly the step the running one takes"


async def test_zero_weight_samples_do_not_move_the_policy(settings, base_model, tmp_path):
    configured = Settings.load(overrides=overrides(settings, base_model)).trainer
    engine = GRPOEngine(base_model, configured, tmp_path / "w")
    before = [p.detach().clone() for p in engine.policy.model.parameters()]
    stats = engine.train_round([training_sample(i, weight=0.0) for i in range(4)])
    assert stats.steps and stats.summary()["loss"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, engine.policy.model.parameters(), strict=True))
    engine.train_round([training_sample(i, weight=1.0) for i in range(4, 8)])
    assert not all(torch.equal(a, b) for a, b in zip(before, engine.policy.model.parameters(), strict=True))


async def test_a_round_mixing_image_sizes_and_question_lengths_trains(settings, base_model, tmp_path):
    """Edited images (crops, side-by-side compositions) give prompts different numbers of image tokens."""
    configured = Settings.load(overrides=overrides(settings, base_model)).trainer
    engine = GRPOEngine(base_model, configured, tmp_path / "w")
    square, wide = training_sample(0), training_sample(1)
    canvas = Image.new("RGB", (wide.image.width * 2, wide.image.height), "white")
    canvas.paste(wide.image, (0, 0))
    wide = dataclasses.replace(wide, image=canvas, question="Look only at the left half of the image. " + wide.question)
    stats = engine.train_round([square, wide, training_sample(2), training_sample(3)])
    assert stats.steps and math.isfinite(stats.summary()["loss"])


async def test_a_round_trains_a_released_architecture_with_the_paper_preset_it_picks(settings, tmp_path):
    """Qwen2.5-VL-3B's published shape at one text and two vision layers (random weights): the trainer picks the
    paper preset for it (bf16 mixed precision, gradient checkpointing) and steps through DeepSpeed ZeRO-2 on the CPU.
    Random weights never answer in the format, so every group's rewards are equal and the step carries no signal:
    what is checked is that the whole path runs and reports; completions are kept short, and the GPU measurements
    are `benchmarks.gpu`'s."""
    folder = build_published_policy("qwen2.5-vl-3b", text_layers=1, vision_layers=2).save(tmp_path / "qwen2.5-vl-3b")
    configured = Settings.load(overrides=overrides(settings, folder, grpo={"max_completion_length": 6})).trainer
    engine = GRPOEngine(folder, configured, tmp_path / "w")
    assert (engine.settings.grpo.preset, engine.settings.grpo.bf16, engine.settings.grpo.gradient_checkpointing,
            engine.settings.grpo.max_completion_length) == ("paper", True, True, 6)
    assert engine.deepspeed and engine.policy.model.config.text_config.hidden_size == 2048
    summary = engine.train_round([training_sample(i) for i in range(4)]).summary()
    assert summary["frac_zero_std"] == 1.0 and summary["tokens_per_s"] > 0
    assert all(math.isfinite(summary[name]) for name in ("loss", "kl", "reward_mean"))


@pytest.mark.parametrize("deepspeed", [True, False], ids=["zero2", "torch"])
async def test_a_lora_round_trains_the_adapter_alone_and_its_checkpoint_loads_merged(settings, base_model, tmp_path,
                                                                                      deepspeed):
    configured = Settings.load(overrides=overrides(settings, base_model, lora={"rank": 4},
                                                   deepspeed={"enabled": deepspeed})).trainer
    engine = GRPOEngine(base_model, configured, tmp_path / "w")
    peft_model = engine.accelerator.unwrap_model(engine.model)
    named = lambda: {name: p.detach().clone() for name, p in peft_model.named_parameters()}  # noqa: E731
    before = named()
    trained = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all(".default." in name and "language_model" in name for name in trained)
    engine.train_round([training_sample(i) for i in range(8)])
    after = named()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".lora_" in name for name in changed), "the base stays frozen"
    assert all(torch.equal(after[name], after[name.replace(".default.", ".ref.")]) for name in trained), \
        "the KL reference is re-anchored on the trained adapter"

    folder = tmp_path / "v1"
    engine.save(folder)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists(), "an adapter checkpoint holds the adapter only"
    merged = load_policy(folder)
    item = training_sample(99)
    conversation = [build_messages(item.question, item.answer_type, item.options)]
    peft_model.eval()
    expected = generate(Policy(peft_model.get_base_model(), engine.policy.processor), [item.image], conversation,
                        SamplingParams(max_new_tokens=6))
    assert generate(merged, [item.image], conversation, SamplingParams(max_new_tokens=6)) == expected
    assert not any(hasattr(module, "lora_A") for module in merged.model.modules()), "merged into plain weights"
    refused = CliRunner().invoke(model_cli, ["export", str(folder), "-o", str(tmp_path / "full")])
    assert refused.exit_code == 2 and "is a LoRA adapter on" in refused.output
    exported = CliRunner().invoke(model_cli, ["export", str(folder), "-o", str(tmp_path / "full"), "--merged"])
    assert exported.exit_code == 0, exported.output
    full = tmp_path / "full"
    assert (full / "model.safetensors").is_file() and not (full / "adapter_config.json").exists()
    assert generate(load_policy(full), [item.image], conversation,
                    SamplingParams(max_new_tokens=6)) == expected

    restarted = GRPOEngine(base_model, configured, tmp_path / "r")
    restarted.load_checkpoint(folder, engine.global_step)
    resumed = {name: p for name, p in restarted.accelerator.unwrap_model(restarted.model).named_parameters()}
    assert all(torch.equal(after[name], resumed[name]) for name in changed)


def adam_state(engine: GRPOEngine) -> dict[str, torch.Tensor | int]:
    """Adam's first parameter group state (DeepSpeed ZeRO keeps it on its flat fp32 partition)."""
    optimizer = engine.model.optimizer.optimizer if engine.deepspeed else engine.optimizer.optimizer
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    return {"step": int(state["step"]), "exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()}


# --- kill -9 of a real trainer process ---------------------------------------------------------------


class TrainerProcess:
    """`python -m trainer.cli` with the test's settings, its log in a file (one process of the world
    `launcher` describes, or a single process)."""

    def __init__(self, config: Path, log: Path, *args: str, launcher: dict[str, str] | None = None):
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0
        env = {name: value for name, value in CLEAN_ENV.items() if not name.startswith("DPE_")}
        env |= {"DPE_CONFIG": str(config), "PYTHONUNBUFFERED": "1"} | (launcher or {})
        with log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT,
                                         env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def lines(self) -> list[str]:
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            return handle.read().decode(errors="replace").splitlines()

    def wait_for(self, text: str, count: int = 1, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(text in line for line in self.lines()) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited with {self.proc.returncode}:\n" + "\n".join(self.lines()[-30:]))
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}x {text!r} in {timeout_s}s:\n" + "\n".join(self.lines()[-30:]))
            time.sleep(0.002)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self, timeout_s: float = 180.0) -> None:
        """Wait for a run with --max-rounds to end by itself, successfully."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError("trainer did not finish:\n" + "\n".join(self.lines()[-30:])) from None
        assert code == 0, "\n".join(self.lines()[-30:])


def ledger(folder: Path) -> list[str]:
    """The trained sample ids along the lineage of the newest checkpoint on disk, in training order."""
    manifests = {verify(path).policy_version: verify(path) for path in CheckpointStore(folder, 1000).complete()}
    lineage, version = [], max(manifests, default=0)
    while version:
        lineage.append(manifests[version])
        version = manifests[version].event.parent_version
    return [sample_id for manifest in reversed(lineage) for sample_id in manifest.event.sample_ids]


@pytest.mark.slow
async def test_kill_9_during_rounds_and_checkpoint_writes_loses_nothing_and_trains_nothing_twice(
    settings, base_model, tmp_path
):
    configured_overrides = overrides(settings, base_model, rounds={"max_samples": 4, "max_seconds": 2.0},
                                     staleness={"max_versions": None})
    configured = Settings.load(overrides=configured_overrides)
    config = tmp_path / "trainer.yaml"
    config.write_text(yaml.safe_dump(configured_overrides))
    blobs = BlobStore(configured.blob.url, configured.blob.limits)
    published = [accepted(blobs, i) for i in range(40)]
    await publish(configured, published)
    folder = checkpoint_root(configured)
    log = tmp_path / "trainer.log"
    rng = random.Random(0)
    partial_left = 0
    started: list[TrainerProcess] = []
    try:
        # Each run finishes at least one round (the kill comes at the second trigger), so the runs make progress.
        for trigger in ("round: training", "round: writing checkpoint", "round: training",
                        "round: writing checkpoint", "random"):
            trainer = TrainerProcess(config, log)
            started.append(trainer)
            if trigger == "random":
                trainer.wait_for("round: checkpoint")
                await asyncio.sleep(rng.uniform(0.0, 1.5))
            else:
                trainer.wait_for(trigger, count=2)
            trainer.kill9()
            partial_left += bool(list(folder.glob(".partial-*")))
            trained = ledger(folder)
            assert len(trained) == len(set(trained)), f"trained twice after a kill at {trigger!r}"

        trainer = TrainerProcess(config, log)
        started.append(trainer)
        deadline = time.monotonic() + 90
        while len(ledger(folder)) < len(published):
            tail = "\n".join(trainer.lines()[-30:])
            assert time.monotonic() < deadline, f"the restarted trainer did not finish:\n{tail}"
            assert trainer.proc.poll() is None, "\n".join(trainer.lines()[-30:])
            await asyncio.sleep(0.2)
        trainer.wait_for("reading AcceptedSample events")
        trainer.proc.send_signal(signal.SIGTERM)
        assert trainer.proc.wait(timeout=60) == 0
    finally:
        for process in started:
            if process.proc.poll() is None:
                process.kill9()

    trained = ledger(folder)
    assert sorted(trained) == sorted(s.sample_id for s in published), "no sample lost, none trained twice"
    assert partial_left >= 1, "at least one kill landed while a checkpoint was being written"
    versions = [verify(path).policy_version for path in CheckpointStore(folder, 1000).complete()]
    assert versions == list(range(1, len(versions) + 1))
    events = await read_all(configured, Checkpoint)
    assert [event.policy_version for event in events].count(0) == 1, "the base model is announced once"
    by_version: dict[int, Checkpoint] = {}
    for event in (event for event in events if event.policy_version):
        assert by_version.setdefault(event.policy_version, event) == event, "re-announcements are identical"
    assert sorted(by_version) == versions, "every checkpoint was announced"
    ranges: dict[int, list[tuple[int, int]]] = {}
    for version in versions:
        for offset_range in by_version[version].trained_on:
            ranges.setdefault(offset_range.partition, []).append((offset_range.start, offset_range.end))
    for partition, spans in ranges.items():
        contiguous = all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert spans[0][0] == 0 and contiguous, f"gap or overlap in partition {partition}"
    assert sum(end - start for spans in ranges.values() for start, end in spans) == len(published)


@pytest.mark.slow
async def test_without_deepspeed_the_torch_optimizer_state_survives_a_restart(settings, base_model, tmp_path):
    configured_overrides = overrides(settings, base_model, rounds={"max_samples": 4}, deepspeed={"enabled": False})
    configured = Settings.load(overrides=configured_overrides)
    config = tmp_path / "trainer.yaml"
    config.write_text(yaml.safe_dump(configured_overrides))
    blobs = BlobStore(configured.blob.url, configured.blob.limits)
    await publish(configured, [accepted(blobs, i) for i in range(8)])
    log = tmp_path / "trainer.log"
    TrainerProcess(config, log, "--max-rounds", "1").finish()
    second = TrainerProcess(config, log, "--max-rounds", "1")
    second.finish()

    folder = checkpoint_root(configured)
    first, latest = verify(folder / "v00000001"), verify(folder / "v00000002")
    assert latest.event.parent_version == 1 and not set(first.event.sample_ids) & set(latest.event.sample_ids)
    steps = [torch.load(folder / v / "optimizer.pt", weights_only=True)["optimizer"]["state"][0]["step"].item()
             for v in ("v00000001", "v00000002")]
    assert steps == [1.0, 2.0], "Adam continues from the saved state after a restart"
    assert not (folder / "v00000002" / "deepspeed").exists()
    assert any("continuing from checkpoint" in line for line in second.lines())
    assert not any("starts fresh" in line for line in second.lines())


@pytest.mark.slow
async def test_two_processes_share_each_round_and_save_both_zero_partitions(settings, base_model, tmp_path):
    configured_overrides = overrides(settings, base_model, rounds={"max_samples": 4})
    configured = Settings.load(overrides=configured_overrides)
    config = tmp_path / "trainer.yaml"
    config.write_text(yaml.safe_dump(configured_overrides))
    blobs = BlobStore(configured.blob.url, configured.blob.limits)
    folder = checkpoint_root(configured)

    async def world(first_index: int, rounds: int) -> list[TrainerProcess]:
        await publish(configured, [accepted(blobs, i) for i in range(first_index, first_index + 4 * rounds)])
        port = str(free_port())
        ranks = [TrainerProcess(config, tmp_path / f"rank{rank}.log", "--max-rounds", str(rounds), launcher={
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port}) for rank in (0, 1)]
        for process in ranks:
            process.finish()
        return ranks

    await world(0, rounds=2)
    await world(100, rounds=1)

    manifests = [verify(folder / f"v{version:08d}") for version in (1, 2, 3)]
    assert [m.event.parent_version for m in manifests] == [0, 1, 2]
    assert [m.global_step for m in manifests] == [1, 2, 3]
    assert sorted(manifests[2].event.sample_ids) == [f"sample-{i}" for i in range(100, 104)]
    for manifest in manifests:
        assert {"deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(manifest.files)
    assert [e.policy_version for e in await read_all(configured, Checkpoint)] == [0, 1, 2, 3], "rank 0 alone announces"


async def test_num_processes_starts_the_ranks_under_accelerates_launcher_and_they_share_each_round(
        settings, base_model, tmp_path):
    """`dpe serve trainer --num-processes 2`: one command becomes accelerate's DeepSpeed launcher of two ranks
    (gloo on the CPU, one per GPU on a GPU machine); rank 0 reads the round, both train on it and save their ZeRO
    partition, rank 0 alone announces."""
    configured_overrides = overrides(settings, base_model, rounds={"max_samples": 4})
    configured = Settings.load(overrides=configured_overrides)
    config = tmp_path / "trainer.yaml"
    config.write_text(yaml.safe_dump(configured_overrides))
    await publish(configured, [accepted(BlobStore(configured.blob.url, configured.blob.limits), i) for i in range(4)])
    TrainerProcess(config, tmp_path / "launch.log", "--num-processes", "2", "--max-rounds", "1").finish(240)
    manifest = verify(checkpoint_root(configured) / "v00000001")
    assert {f"deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)} <= set(manifest.files)
    assert sorted(manifest.event.sample_ids) == [f"sample-{i}" for i in range(4)]
    assert [e.policy_version for e in await read_all(configured, Checkpoint)] == [0, 1], "rank 0 alone announces"
    assert (configured.home / "trainer" / "launch.yaml").is_file(), "the ranks read the launcher's settings"
