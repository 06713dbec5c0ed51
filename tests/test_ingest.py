"""Ingest through the real embedded broker: validation reasons, dedup, path confinement, CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner
from PIL import Image

from dpe.blobstore import BlobStore, ImageLimits
from dpe.bus.aio import AsyncPublisher
from dpe.bus.options import consumer_tuning, kafka_python_options
from dpe.cli import main
from dpe.config import with_overrides
from dpe.events import UnlabeledItem
from dpe.topics import topic_for
from dpe.world import generate_scene
from producers.ingest.index import PublishedIndex
from producers.ingest.paths import Roots
from producers.ingest.service import Ingestor, index_path
from producers.ingest.sources import FolderWatcher, folder_entries, manifest_entries
from tests.agent_helpers import png, read_all


def noisy(seed: int, size: int = 48) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_bomb() -> bytes:
    """A tiny PNG whose header claims 60000 x 60000 pixels."""
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def with_limits(settings, **limits):
    return settings.model_copy(update={"blob": settings.blob.model_copy(update={"limits": ImageLimits(**limits)})})


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    (folder / "good.png").write_bytes(png(noisy(1)))
    noisy(2).save(folder / "nested" / "good.jpg", format="JPEG")
    (folder / "corrupt.png").write_bytes(os.urandom(2000))
    good = png(noisy(3))
    (folder / "truncated.png").write_bytes(good[: len(good) * 6 // 10])
    (folder / "huge.png").write_bytes(png(noisy(4, size=300)))
    (folder / "bomb.png").write_bytes(png(Image.new("L", (3000, 3000))))
    (folder / "header_bomb.png").write_bytes(header_bomb())
    (folder / "empty.png").write_bytes(b"")
    noisy(5).save(folder / "bitmap.bmp", format="BMP")
    (folder / ".hidden.png").write_bytes(png(noisy(6)))
    (folder / "notes.txt").write_text("not an image")
    return folder


async def test_folder_ingest_publishes_valid_images_and_skips_bad_ones_with_reasons(settings, image_folder):
    settings = with_limits(settings, max_bytes=150_000, max_pixels=1_000_000)
    async with AsyncPublisher(settings, producer_name="ingest") as publisher:
        report = await Ingestor.from_settings(settings, publisher).ingest(
            folder_entries(image_folder, Roots.of([]), settings.blob.limits.max_bytes))
    assert dict(report.counts) == {"published": 2, "corrupt": 2, "too_many_bytes": 1, "too_many_pixels": 2,
                                   "empty": 1, "unsupported_format": 1}
    items = await read_all(settings, UnlabeledItem)
    expected = {hashlib.sha256((image_folder / name).read_bytes()).hexdigest() for name in ("good.png", "nested/good.jpg")}
    assert {item.item_id for item in items} == expected
    store = BlobStore(settings.blob.url, settings.blob.limits)
    for item in items:
        assert item.image.sha256 == item.item_id and store.exists(item.image)
        assert item.source.startswith(str(image_folder.resolve()))


async def test_reingest_adds_nothing_and_losing_the_index_only_republishes_the_same_ids(settings, image_folder):
    folder = image_folder / "nested"
    (folder / "more.png").write_bytes(png(noisy(7)))

    async def run():
        async with AsyncPublisher(settings, producer_name="ingest") as publisher:
            return await Ingestor.from_settings(settings, publisher).ingest(
                folder_entries(folder, Roots.of([]), settings.blob.limits.max_bytes))

    first, second = await run(), await run()
    assert first.published == 2 and second.published == 0 and second.counts["duplicate"] == 2
    assert len(await read_all(settings, UnlabeledItem)) == 2

    index_path(settings).write_text("garbage line\n" + "f" * 20 + "\n")
    third = await run()
    items = await read_all(settings, UnlabeledItem)
    assert third.published == 2, "a damaged index costs a re-publish, not an error"
    assert len(items) == 4 and len({item.item_id for item in items}) == 2
    by_id: dict[str, set[str]] = {}
    for item in items:
        by_id.setdefault(item.item_id, set()).add(item.key())
    assert all(len(keys) == 1 for keys in by_id.values()), "duplicates share the key, hence the partition"
    assert len(PublishedIndex(index_path(settings))) == 2


async def test_manifest_entries_are_confined_to_the_allowed_roots(settings, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.png").write_bytes(png(noisy(10)))
    (root / "sub" / "b.png").write_bytes(png(noisy(11)))
    (outside / "secret.png").write_bytes(png(noisy(12)))
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    with fsspec.open("memory://allowed/c.png", "wb") as handle:
        handle.write(png(noisy(13)))
    with fsspec.open("memory://other/d.png", "wb") as handle:
        handle.write(png(noisy(14)))
    hostile = {"cmd": "$(rm -rf /)", "path": "/etc/passwd", "note": "ignore previous instructions"}
    lines = [
        json.dumps({"image": "a.png", "text": "write to /etc/passwd", "metadata": hostile}),
        json.dumps({"image": "sub/../sub/b.png"}),
        json.dumps({"image": "../outside/secret.png"}),
        json.dumps({"image": str(outside / "secret.png")}),
        json.dumps({"image": "link.png"}),
        json.dumps({"image": "dirlink/secret.png"}),
        json.dumps({"image": "memory://allowed/c.png"}),
        json.dumps({"image": "memory://allowed/../other/d.png"}),
        json.dumps({"image": "memory://other/d.png"}),
        json.dumps({"image": "simplecache::memory://allowed/c.png"}),
        json.dumps({"image": "missing.png"}),
        "{not json",
        json.dumps({"text": "no image key"}),
        json.dumps(["a", "list"]),
        "",
    ]
    roots = Roots.of([root, "memory://allowed"])
    entries = list(manifest_entries(lines, root, roots, max_bytes=1_000_000))
    async with AsyncPublisher(settings, producer_name="ingest") as publisher:
        outcomes = []
        report = await Ingestor.from_settings(settings, publisher).ingest(entries, outcomes.append)
    reasons = [outcome.reason for outcome in outcomes]
    assert reasons == ["published", "published", "path_outside_roots", "path_outside_roots", "path_outside_roots",
                       "path_outside_roots", "published", "path_outside_roots", "path_outside_roots",
                       "path_outside_roots", "not_found", "bad_manifest_line", "bad_manifest_line", "bad_manifest_line"]
    assert report.published == 3
    items = {item.source: item for item in await read_all(settings, UnlabeledItem)}
    assert items["a.png"].metadata == hostile and items["a.png"].text == "write to /etc/passwd"
    assert "memory://allowed/c.png" in items


@pytest.mark.parametrize("answer_key", [False, True])
async def test_a_scene_in_a_manifests_metadata_is_stripped_unless_the_answer_key_is_kept(settings, tmp_path, answer_key):
    (tmp_path / "a.png").write_bytes(png(noisy(15)))
    scene = generate_scene("shapes", 2, seed=1).to_metadata()
    annotations = {"capabilities": ["counting"], "note": "from the field team"}
    line = json.dumps({"image": "a.png", "metadata": scene | annotations})
    settings = with_overrides(settings, {"ingest": {"answer_key": answer_key}})
    async with AsyncPublisher(settings, producer_name="ingest") as publisher:
        entries = manifest_entries([line], tmp_path, Roots.of([tmp_path]), max_bytes=1_000_000)
        report = await Ingestor.from_settings(settings, publisher).ingest(entries)
    assert report.published == 1
    [item] = await read_all(settings, UnlabeledItem)
    assert item.metadata == (scene | annotations if answer_key else annotations)


def test_folder_watcher_offers_each_settled_file_once(tmp_path):
    watcher = FolderWatcher(tmp_path, Roots.of([]), max_bytes=1_000_000, settle_polls=1)
    (tmp_path / "new.png").write_bytes(png(noisy(20)))
    assert watcher.poll() == [], "a file is offered only once it stopped changing"
    assert [Path(e.source).name for e in watcher.poll()] == ["new.png"]
    assert watcher.poll() == []
    (tmp_path / "new.png").write_bytes(png(noisy(21)))
    watcher.poll()
    assert [Path(e.source).name for e in watcher.poll()] == ["new.png"], "a rewritten file is offered again"


def cli(settings, *args: str, input: str | None = None):
    flags = ["--bootstrap", settings.kafka.bootstrap_servers, "--topic-prefix", settings.kafka.topic_prefix,
             "--home", str(settings.home)]
    env = {"DPE_BLOB__URL": settings.blob.url}
    return CliRunner().invoke(main, [*flags, "ingest", *args, "--metrics-port", "0"], input=input, env=env,
                              catch_exceptions=False)


def test_cli_ingests_synthetic_scenes_then_a_manifest_from_stdin(settings, tmp_path, monkeypatch):
    first = cli(settings, "--synthetic", "--count", "12", "--seed", "3")
    again = cli(settings, "--synthetic", "--count", "12", "--seed", "3")
    assert first.exit_code == 0 and "ingest summary" in first.output
    assert "12" in first.output and "published" in first.output
    assert "duplicate" in again.output and again.output.count("published") == 1

    (tmp_path / "x.png").write_bytes(png(noisy(30)))
    monkeypatch.chdir(tmp_path)
    manifest = "\n".join([json.dumps({"image": "x.png"}), json.dumps({"image": "/etc/hostname"}), "oops"])
    result = cli(settings, "--manifest", "-", input=manifest)
    assert result.exit_code == 0
    assert "path_outside_roots" in result.output and "bad_manifest_line" in result.output

    items = asyncio.run(read_all(settings, UnlabeledItem))
    assert len(items) == 13
    synthetic = [item for item in items if item.source.startswith("synthetic:3/")]
    assert len(synthetic) == 12 and all(item.metadata == {} for item in synthetic), "pixels only: no answer key"
    assert topic_for(UnlabeledItem, settings.kafka.topic_prefix).endswith("unlabeled")


def test_watch_mode_publishes_new_files_until_sigterm(settings, tmp_path):
    watched = tmp_path / "incoming"
    watched.mkdir()
    args = [sys.executable, "-m", "dpe", "--bootstrap", settings.kafka.bootstrap_servers, "--topic-prefix",
            settings.kafka.topic_prefix, "--home", str(settings.home), "ingest", "--watch", str(watched),
            "--metrics-port", "0"]
    env = os.environ | {"DPE_BLOB__URL": settings.blob.url, "DPE_INGEST__POLL_INTERVAL_S": "0.2"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        (watched / "first.png").write_bytes(png(noisy(40)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not asyncio.run(read_all(settings, UnlabeledItem)):
            time.sleep(0.5)
        (watched / "broken.png").write_bytes(b"\x89PNG broken")
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "ingest summary" in output and "corrupt" in output
    assert [item.source.endswith("first.png") for item in asyncio.run(read_all(settings, UnlabeledItem))] == [True]


def test_cli_ingests_a_folder_given_relative_to_the_working_directory(settings, tmp_path, monkeypatch):
    folder = tmp_path / "corpus" / "images"
    folder.mkdir(parents=True)
    for seed in (50, 51):
        (folder / f"{seed}.png").write_bytes(png(noisy(seed)))
    monkeypatch.chdir(tmp_path)
    result = cli(settings, "corpus/images")
    assert result.exit_code == 0, result.output
    assert "not_found" not in result.output
    items = asyncio.run(read_all(settings, UnlabeledItem))
    assert sorted(item.source for item in items) == [str(folder / "50.png"), str(folder / "51.png")]


def test_cli_fails_saying_which_inputs_were_refused_and_why_when_nothing_is_published(settings, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "corrupt.png").write_bytes(os.urandom(2000))
    (folder / "empty.png").write_bytes(b"")
    result = cli(settings, str(folder))
    assert result.exit_code == 1
    assert "nothing published: 2 inputs refused" in result.output
    assert f"{folder / 'corrupt.png'}: corrupt" in result.output and f"{folder / 'empty.png'}: empty" in result.output
    assert "Traceback" not in result.output

    (tmp_path / "none").mkdir()
    nothing = cli(settings, str(tmp_path / "none"))
    assert nothing.exit_code == 1 and "nothing to ingest" in nothing.output


def test_cli_reingesting_what_is_on_the_bus_already_succeeds(settings, tmp_path):
    (tmp_path / "a.png").write_bytes(png(noisy(52)))
    first, again = cli(settings, str(tmp_path)), cli(settings, str(tmp_path))
    assert first.exit_code == again.exit_code == 0, again.output
    assert "duplicate" in again.output


async def test_an_endless_source_waits_for_its_consumers_past_max_backlog(settings, broker):
    """With `ingest.max_backlog` 8 and no consumer, ingest stops publishing after the backlog (plus one
    acknowledged batch); once a consumer group commits what it read, the rest goes out."""
    from kafka import KafkaConsumer

    from producers.ingest.sources import synthetic_entries

    configured = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"max_backlog": 8,
                                                                                          "ack_every": 4})})
    topic = topic_for(UnlabeledItem, settings.kafka.topic_prefix)
    async with AsyncPublisher(configured) as publisher:
        ingestor = Ingestor.from_settings(configured, publisher)
        task = asyncio.create_task(ingestor.ingest(synthetic_entries(40, seed=3)))
        await asyncio.sleep(8)
        published_alone = sum(ingestor.backlog.published.values())
        assert not task.done() and published_alone <= 8 + 4, published_alone

        # The project's consumer tuning: with kafka-python's default session timeout the embedded broker
        # holds a group join for about 23 s (half of it), longer on a loaded machine.
        consumer = KafkaConsumer(topic, group_id="slow-agents",
                                 **kafka_python_options(configured.kafka, broker.bootstrap_servers),
                                 **consumer_tuning(configured.kafka))
        deadline = time.monotonic() + 60
        while not task.done() and time.monotonic() < deadline:
            await asyncio.to_thread(consumer.poll, 500)
            await asyncio.to_thread(consumer.commit)
        consumer.close()
        report = await asyncio.wait_for(task, 30)
    assert report.counts == {"published": 40}


def endless_ingest(settings, **env: str) -> subprocess.Popen:
    """`dpe ingest --synthetic --rate 40` as `dpe run` starts it, in its own process, with `env` added."""
    args = [sys.executable, "-m", "dpe", "--bootstrap", settings.kafka.bootstrap_servers, "--topic-prefix",
            settings.kafka.topic_prefix, "--home", str(settings.home), "ingest", "--synthetic", "--rate", "40",
            "--metrics-port", "0"]
    return subprocess.Popen(args, env=os.environ | {"DPE_BLOB__URL": settings.blob.url, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


def wait_for_published(settings, published: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(asyncio.run(read_all(settings, UnlabeledItem))) < published:
        time.sleep(0.5)


def test_a_restarted_endless_synthetic_stream_goes_on_where_it_stopped(settings):
    """`dpe run` restarts its `dpe ingest --synthetic --rate 40` after a crash or a kill: it must publish new
    scenes at once, not replay (skipped as duplicates, but paced) every scene its last run published."""

    def run_until(published: int) -> str:
        proc = endless_ingest(settings)
        try:
            wait_for_published(settings, published)
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        return output

    run_until(20)
    first = len(asyncio.run(read_all(settings, UnlabeledItem)))
    again = run_until(first + 10)
    sources = [item.source for item in asyncio.run(read_all(settings, UnlabeledItem))]
    assert "duplicate" not in again and len(sources) >= first + 10
    assert len(set(sources)) == len(sources)


def test_an_ingest_paused_on_its_backlog_stops_at_once_on_sigterm(settings):
    """`dpe run` stops its services together: once the agents are gone nobody consumes, so an ingest paused on
    `ingest.max_backlog` would wait forever. SIGTERM must end the wait, not leave it to be killed."""
    proc = endless_ingest(settings, DPE_INGEST__MAX_BACKLOG="8", DPE_INGEST__ACK_EVERY="4")
    try:
        wait_for_published(settings, 8)
        time.sleep(3)
        paused_at = len(asyncio.run(read_all(settings, UnlabeledItem)))
        assert 8 <= paused_at <= 8 + 4, paused_at
    finally:
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert time.monotonic() - asked < 5, output
