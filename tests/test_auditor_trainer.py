"""The auditor model's trainer (``dpe serve auditor-trainer``) through the real broker: the trainer's own round loop
with the auditor's task. It teaches its version 0 the menu's format on the bus's first unlabeled images, trains in
micro-rounds in its own consumer group and checkpoint folder, announces `AuditorCheckpoint`s naming the policy
version that rewarded each round, follows a new policy version, and resumes without reading an image twice. The
audit service then asks the newest auditor model's best-ranked probes beside its fixed ones.

The policy under audit is a real tiny model (the warmed colour recipe of `test_trainer`); the references are the two
default pixel toolchains. DeepSpeed is off here (`test_trainer` runs it on CPU for the same loop)."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dpe.blobstore import BlobStore
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.cli import main as dpe_main
from dpe.events import AuditorCheckpoint, BlobRef, Checkpoint, DeadLetter, Divergence, UnlabeledItem
from dpe.policy.config import WarmupConfig
from dpe.policy.model import load_policy
from dpe.policy.warmup import warm_up
from dpe.settings import Settings
from dpe.world import render_scene, unlabeled_scene
from producers.auditor.service import serve_auditor
from producers.auditor.trainer.service import TAUGHT, train_auditor
from trainer.checkpoints import verify
from tests.test_trainer import publish, read_all
from trainer.settings import checkpoint_root

RECIPE = WarmupConfig(mix={"color": 1.0}, levels=(1,), steps=40, batch_size=16)


@pytest.fixture(scope="module")
def policy_base() -> Path:
    return warm_up(RECIPE, show_progress=False).folder


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def configured(settings: Settings, policy_base: Path) -> Settings:
    return Settings.load(overrides={
        "home": str(settings.home),
        "kafka": {"bootstrap_servers": settings.kafka.bootstrap_servers, "topic_prefix": settings.kafka.topic_prefix},
        "blob": {"url": settings.blob.url},
        "trainer": {"base_model": str(policy_base)},
        "auditor_training": {"format_steps": 40, "format_images": 6},
        "auditor_trainer": {"torch_threads": 1, "deepspeed": {"enabled": False}, "metrics_port": 0,
                            "grpo": {"group_size": 4, "prompts_per_step": 4},
                            "rounds": {"max_samples": 8, "max_seconds": 3.0}},
    })


def unlabeled(blobs: BlobStore, index: int) -> UnlabeledItem:
    buffer = io.BytesIO()
    render_scene(unlabeled_scene(index, seed=77)).save(buffer, format="PNG")
    ref = blobs.put_image(buffer.getvalue())
    return UnlabeledItem(producer="test", item_id=ref.sha256, image=ref, source=f"test:{index}")


async def audit(settings: Settings, expected: int) -> list[Divergence]:
    """Run the audit service until it has audited `expected` items (its verdicts on each are published together)."""
    settings = settings.model_copy(update={"auditor": settings.auditor.model_copy(update={"sample_fraction": 1.0})})
    stop = asyncio.Event()
    service = asyncio.create_task(serve_auditor(settings, stop))
    try:
        async with AsyncPublisher(settings, producer_name="test") as publisher, AsyncSubscriber(
            settings, [Divergence], group_id="test", service="test", publisher=publisher
        ) as subscriber:
            verdicts: list[Divergence] = []
            deadline = time.monotonic() + 240
            while len({v.counterfactual_of or v.item_id for v in verdicts}) < expected and time.monotonic() < deadline:
                verdicts += [delivery.event for delivery in await subscriber.fetch(timeout_ms=500)]
            verdicts += [delivery.event for delivery in await subscriber.fetch(timeout_ms=2000)]
    finally:
        stop.set()
        await service
    return verdicts


async def rounds(settings: Settings, count: int) -> list[int]:
    return [report.version for report in await train_auditor(settings, asyncio.Event(), count)]


@pytest.mark.slow
async def test_the_auditor_trains_in_its_own_rounds_against_the_newest_policy_and_resumes(settings, policy_base):
    settings = configured(settings, policy_base)
    blobs = BlobStore(settings.blob.url, settings.blob.limits)
    first = [unlabeled(blobs, index) for index in range(6)]
    nowhere = BlobRef(sha256="cd" * 32, media_type="image/png", size_bytes=10, width=8, height=8)
    missing = UnlabeledItem(producer="test", item_id="missing-image", image=nowhere, source="test:missing")
    await publish(settings, [Checkpoint(producer="trainer", policy_version=0, uri=str(policy_base)), *first,
                             missing])

    assert await rounds(settings, 1) == [1]

    base, one = await read_all(settings, AuditorCheckpoint)
    taught = settings.home / "auditor-trainer" / "base"
    assert (base.policy_version, base.uri) == (0, str(taught)) and (taught / TAUGHT).is_file()
    assert (one.policy_version, one.parent_version, one.target_version) == (1, 0, 0)
    assert sorted(one.sample_ids) == sorted(item.item_id for item in first), "every probeable image, once"
    assert one.metrics["skipped_dead_lettered"] == 1 and "reward_mean" in one.metrics
    [letter] = await read_all(settings, DeadLetter)
    assert (letter.error_class, letter.stage) == ("BlobMissing", "auditor-trainer.admit")
    assert [event.policy_version for event in await read_all(settings, Checkpoint)] == [0], "the policy's untouched"
    folder = checkpoint_root(settings, "auditor-checkpoints") / "v00000001"
    assert Path(one.uri) == folder.resolve()
    assert verify(folder, AuditorCheckpoint).event == one, "the manifest keeps the auditor's own announcement"
    before, after = load_policy(taught).model, load_policy(folder).model
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))

    newer = load_policy(policy_base).save(settings.home / "checkpoints" / "v00000001")
    second = [unlabeled(blobs, index) for index in range(6, 12)]
    await publish(settings, [Checkpoint(producer="trainer", policy_version=1, parent_version=0, uri=str(newer)),
                             *second])
    taught_at = (taught / TAUGHT).stat().st_mtime_ns

    assert await rounds(settings, 1) == [2]

    two = (await read_all(settings, AuditorCheckpoint))[-1]
    assert (two.policy_version, two.parent_version, two.target_version) == (2, 1, 1), "rewarded by the newest policy"
    assert sorted(two.sample_ids) == sorted(item.item_id for item in second), "resumed where version 1 ended"
    ended = {read.partition: read.end for read in one.trained_on}
    assert all(read.start == ended.get(read.partition, 0) for read in two.trained_on), "nothing read twice"
    assert (taught / TAUGHT).stat().st_mtime_ns == taught_at, "version 0 is taught once"

    audited = await audit(settings, expected=len(first) + len(second))
    chosen = [verdict for verdict in audited if verdict.prober is not None]
    assert chosen and {verdict.prober for verdict in chosen} == {"auditor-v2"}, "the newest auditor model's probes"
    fixed_ids = {verdict.probe_id for verdict in audited if verdict.prober is None}
    assert not fixed_ids & {verdict.probe_id for verdict in chosen}, "beside the fixed probes, not instead"
    per_item = Counter(verdict.counterfactual_of or verdict.item_id for verdict in chosen)
    assert max(per_item.values()) <= settings.auditor.model_probes


def test_the_command_is_a_service_of_dpe_serve():
    result = CliRunner().invoke(dpe_main, ["serve", "auditor-trainer", "--help"])
    assert result.exit_code == 0 and "newest policy" in result.output
