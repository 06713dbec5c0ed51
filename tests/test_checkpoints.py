"""Checkpoint store: atomic commit, verification, fallback from half-written and corrupt checkpoints, pruning."""

from __future__ import annotations

import logging
import os

import pytest

from dpe.events import Checkpoint, OffsetRange
from trainer.checkpoints import ANNOUNCED, MANIFEST, CheckpointStore, CorruptCheckpoint, Manifest, folder_name, verify

TOPIC = "dpe.samples.accepted"


def write(store: CheckpointStore, version: int, parent: int | None = None, payload: bytes = b"weights") -> Manifest:
    staging = store.begin(version)
    (staging / "model.safetensors").write_bytes(payload * 100)
    (staging / "deepspeed" / "state").mkdir(parents=True)
    (staging / "deepspeed" / "state" / "optim.pt").write_bytes(b"adam" * 50)
    event = Checkpoint(policy_version=version, parent_version=parent, uri=str(store.folder / folder_name(version)),
                       trained_on=[OffsetRange(topic=TOPIC, partition=0, start=version * 10 - 10, end=version * 10)],
                       sample_ids=[f"s{version}a", f"s{version}b"])
    manifest = Manifest(event=event, positions={TOPIC: {0: version * 10}}, global_step=version * 2,
                        skipped={"duplicate": ["x"]}, recent_ids=[f"s{version}a", f"s{version}b"])
    return store.commit(staging, manifest).manifest


def test_commit_is_complete_verified_and_round_trips(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    written = write(store, 1, parent=0)
    latest = store.latest()
    assert latest is not None and latest.version == 1 and latest.path.name == "v00000001"
    assert latest.manifest == written
    assert latest.manifest.positions == {TOPIC: {0: 10}}
    assert set(latest.manifest.files) == {"model.safetensors", "deepspeed/state/optim.pt"}
    assert not list(tmp_path.glob(".partial-*")), "nothing staged is left behind"
    assert not latest.announced
    store.mark_announced(latest)
    assert store.latest().announced
    assert store.next_version() == 2


def test_half_written_checkpoint_is_removed_and_the_previous_one_used(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=3)
    write(store, 1, parent=0)
    staging = store.begin(2)
    (staging / "model.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoints"):
        latest = store.latest()
    assert latest.version == 1
    assert not staging.exists()
    assert "half-written checkpoint" in caplog.text
    assert store.next_version() == 2, "a version that was never complete can be written again"


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file", "delete_manifest", "garbage_manifest"])
def test_corrupt_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path, keep_last=3)
    write(store, 1, parent=0)
    write(store, 2, parent=1)
    target = tmp_path / "v00000002"
    weights = target / "model.safetensors"
    if damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[17] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-5])
    elif damage == "delete_file":
        (target / "deepspeed" / "state" / "optim.pt").unlink()
    elif damage == "delete_manifest":
        (target / MANIFEST).unlink()
    else:
        (target / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCheckpoint):
        verify(target)
    with caplog.at_level(logging.ERROR, logger="trainer.checkpoints"):
        latest = store.latest()
    assert latest.version == 1
    assert "v00000002 is corrupt" in caplog.text and "falling back" in caplog.text
    assert not target.exists() and len(list(tmp_path.glob(".corrupt-v00000002-*"))) == 1
    assert store.next_version() == 3, "the corrupt version may have been announced: never reuse it"


def test_every_checkpoint_corrupt_means_start_from_the_base_model(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    write(store, 1, parent=0)
    (tmp_path / "v00000001" / MANIFEST).unlink()
    assert store.latest() is None
    assert store.next_version() == 2


def test_prune_keeps_the_last_k(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for version in range(1, 6):
        write(store, version, parent=version - 1)
    assert [p.name for p in store.complete()] == ["v00000004", "v00000005"]
    assert store.latest().version == 5
    assert store.next_version() == 6


def test_announced_marker_is_not_part_of_the_digest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    write(store, 1, parent=0)
    (tmp_path / "v00000001" / ANNOUNCED).write_text("anything")
    assert verify(tmp_path / "v00000001").policy_version == 1


def test_folder_holding_another_version_is_corrupt(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    write(store, 1, parent=0)
    os.rename(tmp_path / "v00000001", tmp_path / "v00000003")
    with pytest.raises(CorruptCheckpoint, match="holds policy version 1"):
        verify(tmp_path / "v00000003")
