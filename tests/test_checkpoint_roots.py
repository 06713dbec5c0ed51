"""Checkpoints load only from inside the checkpoint roots: the check itself, the difficulty band, and the
evaluator against the real broker (a checkpoint outside is dead-lettered, unloaded, and the next one evaluated)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest

from consumers.qc.difficulty import PolicyHolder
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.config import CoreSettings
from dpe.events import Checkpoint, DeadLetter, EvalOutcome
from dpe.policy.checkpoints import CheckpointOutsideRoots, allowed_roots, checkpoint_folder, load_checkpoint
from dpe.policy.config import TinyVLMConfig
from dpe.policy.model import build_tiny_policy
from dpe.policy.warmup import default_cache_dir
from producers.evaluator.service import serve_evaluator
from tests.test_bus import drain
from tests.test_evaluator import small_settings


@pytest.fixture
def roots(tmp_path) -> list[Path]:
    """One checkpoint root holding a folder v1, and a folder outside it."""
    (tmp_path / "root" / "v1").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return [tmp_path / "root"]


def test_folders_inside_a_root_are_returned_resolved(roots):
    root = roots[0]
    assert checkpoint_folder(str(root / "v1"), roots) == (root / "v1").resolve()
    assert checkpoint_folder(f"file://{root}/v1", roots) == (root / "v1").resolve()
    assert checkpoint_folder(str(root / "v2" / ".." / "v1"), roots) == (root / "v1").resolve()
    (root.parent / "linked-root").symlink_to(root)
    assert checkpoint_folder(str(root / "v1"), [root.parent / "linked-root"]) == (root / "v1").resolve()


@pytest.mark.parametrize("escape", [
    lambda root: str(root.parent / "outside"),
    lambda root: f"file://{root.parent / 'outside'}",
    lambda root: str(root / ".." / "outside"),
    lambda root: str(root) + "-evil/v1",
    lambda root: "/etc",
], ids=["sibling", "file-url", "dot-dot", "name-prefix", "absolute"])
def test_folders_outside_every_root_are_refused_naming_the_uri_and_the_roots(roots, escape):
    uri = escape(roots[0])
    with pytest.raises(CheckpointOutsideRoots) as refused:
        checkpoint_folder(uri, roots)
    assert isinstance(refused.value, ValueError)
    assert repr(uri) in str(refused.value) and str(roots[0]) in str(refused.value)


def test_a_symlink_inside_a_root_is_judged_by_where_it_points(roots):
    link = roots[0] / "v2"
    link.symlink_to(roots[0].parent / "outside")
    with pytest.raises(CheckpointOutsideRoots, match="outside the checkpoint roots"):
        checkpoint_folder(str(link), roots)


def test_load_checkpoint_refuses_before_reading_anything(roots):
    with pytest.raises(CheckpointOutsideRoots):
        load_checkpoint(str(roots[0].parent / "no-such-folder"), roots=roots)


def test_the_roots_are_home_checkpoints_the_model_cache_and_the_configured_ones(monkeypatch):
    monkeypatch.setenv("DPE_CHECKPOINT_ROOTS", '["/models", "/mnt/checkpoints"]')
    settings = CoreSettings.load(overrides={"home": "/data/home"})
    assert allowed_roots(settings) == (Path("/data/home/checkpoints"), default_cache_dir(), Path("/models"),
                                       Path("/mnt/checkpoints"))
    monkeypatch.delenv("DPE_CHECKPOINT_ROOTS")
    assert allowed_roots(CoreSettings.load(overrides={"home": "/data/home"}))[2:] == ()


async def test_the_difficulty_band_refuses_a_checkpoint_outside_the_roots(roots, caplog):
    holder = PolicyHolder(None, roots)
    with caplog.at_level(logging.ERROR):
        await holder.use(Checkpoint(policy_version=1, uri=str(roots[0].parent / "outside")))
    assert holder.current is None
    assert "outside the checkpoint roots" in caplog.text


async def test_the_evaluator_dead_letters_a_checkpoint_outside_the_roots_and_evaluates_the_next(settings, tmp_path):
    settings = small_settings(settings)
    inside = build_tiny_policy(TinyVLMConfig(corpus_items=5)).save(settings.home / "checkpoints" / "v3")
    outside = shutil.copytree(inside, tmp_path / "elsewhere" / "v1")
    link = settings.home / "checkpoints" / "v2"
    link.symlink_to(outside)
    stop = asyncio.Event()
    service = asyncio.create_task(serve_evaluator(settings, stop))
    try:
        async with AsyncPublisher(settings, producer_name="trainer") as pub:
            await pub.publish_and_wait(Checkpoint(policy_version=1, uri=str(outside)))
            await pub.publish_and_wait(Checkpoint(policy_version=2, parent_version=1, uri=f"file://{link}"))
            await pub.publish_and_wait(Checkpoint(policy_version=3, parent_version=2, uri=str(inside)))
            async with AsyncSubscriber(settings, [EvalOutcome], group_id="t", service="t", publisher=pub) as sub:
                outcomes = [d.event for d in await drain(sub, 14, timeout_s=120)]
            async with AsyncSubscriber(settings, [DeadLetter], group_id="d", service="t", publisher=pub) as dead:
                letters = [d.event for d in await drain(dead, 2)]
    finally:
        stop.set()
        await service

    assert len(outcomes) == 14 and {o.policy_version for o in outcomes} == {3}, "only the checkpoint inside"
    assert len(letters) == 2
    assert {(d.stage, d.error_class) for d in letters} == {("evaluator.handle", "CheckpointOutsideRoots")}
    messages = sorted(letter.error_message for letter in letters)
    assert [repr(str(outside)) in messages[0], repr(f"file://{link}") in messages[1]] == [True, True], messages
    assert all(str(settings.home / "checkpoints") in message for message in messages), "the roots are named"
