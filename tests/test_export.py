"""`dpe samples export` from the real accepted topic: TRL and EasyR1 layouts, images out of the blob store."""

from __future__ import annotations

import asyncio
import json
import re

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from datasets import load_dataset
from PIL import Image

from consumers.samples.export import FORMATS, export_samples, trl_rows
from dpe.blobstore import BlobStore
from dpe.cli import main
from dpe.events import AcceptedSample, AgentStep, BlobRef, QCVerdict, SampleBody
from dpe.world import generate_scene, render_scene
from tests.agent_helpers import png, publish_all


def accepted(store: BlobStore, seed: int, capability: str, **body) -> AcceptedSample:
    ref = store.put_image(png(render_scene(generate_scene("shapes", 2, seed=seed))))
    return AcceptedSample(
        sample_id=f"{seed:064x}", capability=capability, source_item_id=ref.sha256, plan_id="plan-7", policy_version=2,
        agents=[AgentStep(role="writer", backend="programmatic")], qc=[QCVerdict(check="schema", passed=True, reason_code="ok")],
        body=SampleBody(image=ref, **body),
    )


def cli(settings, *args: str):
    flags = ["--bootstrap", settings.kafka.bootstrap_servers, "--topic-prefix", settings.kafka.topic_prefix,
             "--home", str(settings.home)]
    return CliRunner().invoke(main, [*flags, "samples", "export", *args], env={"DPE_BLOB__URL": settings.blob.url},
                              catch_exceptions=False)


def test_export_writes_trl_and_easyr1_layouts_with_images(settings, tmp_path):
    store = BlobStore(settings.blob.url, settings.blob.limits)
    colour = accepted(store, 1, "color", question="What colour is the circle?", answer="B", answer_type="choice",
                      options=["red", "blue", "green"])
    count = accepted(store, 2, "counting", question="How many shapes are in the image?", answer="3", answer_type="number")
    asyncio.run(publish_all(settings, [colour, count, colour]))

    trl = cli(settings, "--format", "trl", "--out", str(tmp_path / "trl"))
    easyr1 = cli(settings, "--format", "easyr1", "--out", str(tmp_path / "easyr1"))
    only_counting = cli(settings, "--format", "trl", "--out", str(tmp_path / "counting"), "--capability", "counting")
    assert trl.exit_code == easyr1.exit_code == only_counting.exit_code == 0
    assert "exported 2 samples" in trl.output and "exported 1 samples" in only_counting.output

    rows = [json.loads(line) for line in (tmp_path / "trl" / "train.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == sorted([colour.sample_id, count.sample_id])
    by_id = {row["id"]: row for row in rows}
    first = by_id[colour.sample_id]
    assert first["prompt"][0]["content"][0] == {"type": "image"}
    assert "A. red" in first["prompt"][0]["content"][1]["text"] and first["solution"] == "B"
    assert first["completion"][0]["content"][0]["text"] == "\\boxed{B}" and first["options"] == ["red", "blue", "green"]
    dataset = load_dataset("json", data_files=str(tmp_path / "trl" / "train.jsonl"), split="train")
    assert dataset.num_rows == 2 and set(dataset.column_names) >= {"images", "prompt", "completion", "solution"}

    table = pq.read_table(tmp_path / "easyr1" / "train.parquet").to_pylist()
    assert {row["answer"] for row in table} == {"B", "3"}
    assert all(row["problem"].startswith("<image>") and "\\boxed{}" in row["problem"] for row in table)

    for folder in ("trl", "easyr1"):
        for row in table if folder == "easyr1" else rows:
            (path,) = row["images"]
            assert re.fullmatch(r"images/[0-9a-f]{64}\.png", path), "image names come from content hashes only"
            image = Image.open(tmp_path / folder / path)
            assert image.size == (64, 64)


def unstored(sample: AcceptedSample) -> AcceptedSample:
    """`sample` pointing at an image the blob store never held."""
    ref = BlobRef(sha256="d" * 64, media_type="image/png", size_bytes=9, width=8, height=8)
    body = sample.body.model_copy(update={"image": ref})
    return sample.model_copy(update={"sample_id": "e" * 64, "body": body})


def test_a_sample_whose_image_is_missing_is_skipped_with_the_reason(settings, tmp_path):
    store = BlobStore(settings.blob.url, settings.blob.limits)
    good = accepted(store, 3, "counting", question="How many shapes?", answer="2", answer_type="number")
    lost = unstored(good)
    asyncio.run(publish_all(settings, [lost, good]))
    out = tmp_path / "exports" / "trl"
    result = cli(settings, "--format", "trl", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"skipped sample {lost.sample_id}: blob {'d' * 64} is not in the store" in result.output
    assert "exported 1 samples" in result.output and "skipped 1" in result.output
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [good.sample_id]
    assert [path.name for path in out.parent.iterdir()] == ["trl"], "no staging folder is left behind"


def test_a_failed_export_leaves_no_folder_and_a_used_folder_is_refused(settings, tmp_path, monkeypatch):
    store = BlobStore(settings.blob.url, settings.blob.limits)
    sample = accepted(store, 4, "counting", question="How many shapes?", answer="2", answer_type="number")
    exports = tmp_path / "exports"

    def broken_writer(rows, out):
        raise OSError("disk full")

    monkeypatch.setitem(FORMATS, "trl", (trl_rows, broken_writer))
    with pytest.raises(OSError, match="disk full"):
        export_samples([sample], store, exports / "trl", "trl")
    assert list(exports.iterdir()) == [], "neither the images nor a staging folder remain"

    monkeypatch.undo()
    (exports / "used").mkdir()
    (exports / "used" / "notes.txt").write_text("mine")
    refused = cli(settings, "--format", "trl", "--out", str(exports / "used"))
    assert refused.exit_code == 2 and "not an empty folder" in refused.output
    assert [path.name for path in (exports / "used").iterdir()] == ["notes.txt"]
