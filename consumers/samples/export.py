"""Accepted samples as training files, with the images written out of the blob store.

Formats:

- ``trl``: ``train.jsonl`` in TRL's conversational prompt-completion layout with an ``images``
  column of relative paths (loadable with ``datasets.load_dataset("json", ...)``); ``solution``,
  ``answer_type``, ``options`` and ``tolerance`` ride along for verifiable rewards.
- ``easyr1``: ``train.parquet`` with EasyR1/verl's ``images``, ``problem`` (``<image>`` then the
  question) and ``answer`` columns, plus the same extras.

Images are named by their content hash (``images/<sha256>.<ext>``), never by anything in the
samples. The accepted topic is read in full and deduplicated by `sample_id` (first one wins). A
sample whose image the blob store cannot serve (missing or corrupt) is skipped, with the reason.

The export is atomic: it is written into a new folder beside ``out`` and renamed to ``out`` only
once complete, so a failed export leaves nothing behind. ``out`` must not exist or be empty.

Example:
    >>> rows = trl_rows([sample], {sample.body.image.sha256: "images/ab.png"})     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpe.blobstore import BlobError, BlobStore
from dpe.bus.follower import read_topic
from dpe.config import CoreSettings
from dpe.events import AcceptedSample
from dpe.policy.prompts import boxed, format_question

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}


async def read_accepted(settings: CoreSettings) -> list[AcceptedSample]:
    """Every accepted sample on the topic now, in log order per partition, one per sample id."""
    samples: dict[str, AcceptedSample] = {}
    for sample in await read_topic(settings, AcceptedSample):
        samples.setdefault(sample.sample_id, sample)
    return list(samples.values())


@dataclass(frozen=True)
class Skipped:
    """A sample left out of the export, and why."""

    sample_id: str
    reason: str


@dataclass(frozen=True)
class Exported:
    """What `export_samples` wrote: the data file, how many samples it holds, and the samples skipped."""

    path: Path
    samples: int
    skipped: list[Skipped]


def write_images(
    samples: Sequence[AcceptedSample], store: BlobStore, out: Path
) -> tuple[dict[str, str], dict[str, str]]:
    """Copy each distinct image to ``out/images/<sha256>.<ext>``.

    Returns sha256 -> path relative to `out` for the images written, and sha256 -> why for those the
    store cannot serve (`BlobError`: missing or corrupt).
    """
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for sample in samples:
        ref = sample.body.image
        if ref.sha256 in paths or ref.sha256 in unreadable:
            continue
        relative = f"images/{ref.sha256}.{_EXTENSIONS.get(ref.media_type, 'img')}"
        try:
            (out / relative).write_bytes(store.get_bytes(ref))
        except BlobError as exc:
            unreadable[ref.sha256] = str(exc)
            continue
        paths[ref.sha256] = relative
    return paths, unreadable


def _extras(sample: AcceptedSample) -> dict[str, Any]:
    body = sample.body
    return {"id": sample.sample_id, "capability": sample.capability, "answer_type": body.answer_type,
            "options": body.options, "tolerance": body.tolerance, "plan_id": sample.plan_id,
            "policy_version": sample.policy_version}


def trl_rows(samples: Sequence[AcceptedSample], paths: dict[str, str]) -> list[dict[str, Any]]:
    """TRL conversational prompt-completion rows with image paths.

    Example:
        >>> from dpe.events import BlobRef, SampleBody
        >>> ref = BlobRef(sha256="a" * 64, media_type="image/png", size_bytes=1, width=1, height=1)
        >>> sample = AcceptedSample(sample_id="s", capability="counting", source_item_id="i", plan_id="p",
        ...     agents=[], qc=[], policy_version=0,
        ...     body=SampleBody(image=ref, question="How many?", answer="3", answer_type="number"))
        >>> row = trl_rows([sample], {ref.sha256: "images/a.png"})[0]
        >>> row["images"], row["completion"][0]["content"][0]["text"], row["solution"]
        (['images/a.png'], '\\\\boxed{3}', '3')
    """
    rows = []
    for sample in samples:
        body = sample.body
        question = format_question(body.question, body.answer_type, body.options)
        rows.append({
            "images": [paths[body.image.sha256]],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": boxed(body.answer)}]}],
            "solution": body.answer,
            **_extras(sample),
        })
    return rows


def easyr1_rows(samples: Sequence[AcceptedSample], paths: dict[str, str]) -> list[dict[str, Any]]:
    """EasyR1/verl rows: ``images``, ``problem`` (with the ``<image>`` placeholder) and ``answer``."""
    return [{
        "images": [paths[sample.body.image.sha256]],
        "problem": "<image>" + format_question(sample.body.question, sample.body.answer_type, sample.body.options),
        "answer": sample.body.answer,
        **_extras(sample),
    } for sample in samples]


def _write_trl(rows: list[dict[str, Any]], out: Path) -> Path:
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def _write_easyr1(rows: list[dict[str, Any]], out: Path) -> Path:
    path = out / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


FORMATS: dict[str, tuple[Callable[..., list[dict[str, Any]]], Callable[[list[dict[str, Any]], Path], Path]]] = {
    "trl": (trl_rows, _write_trl),
    "easyr1": (easyr1_rows, _write_easyr1),
}
"""Format name -> (row builder, writer)."""


def export_samples(samples: Sequence[AcceptedSample], store: BlobStore, out: Path, fmt: str) -> Exported:
    """Write `samples` in format `fmt` as the new folder `out` (atomically), skipping those whose image is unreadable.

    Raises `FileExistsError` when `out` exists and is not an empty folder.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists and is not an empty folder", str(out))
    build, write = FORMATS[fmt]
    with _staged(out) as folder:
        paths, unreadable = write_images(samples, store, folder)
        kept = [sample for sample in samples if sample.body.image.sha256 in paths]
        path = write(build(kept, paths), folder)
    skipped = [Skipped(sample.sample_id, unreadable[sample.body.image.sha256])
               for sample in samples if sample.body.image.sha256 in unreadable]
    return Exported(out / path.name, len(kept), skipped)


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A new folder beside `out` to write into: renamed to `out` when the block completes, removed if it fails.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "export"
        >>> with _staged(out) as folder:
        ...     _ = (folder / "train.jsonl").write_text("{}")
        ...     out.exists()
        False
        >>> sorted(p.name for p in out.parent.iterdir()), (out / "train.jsonl").read_text()
        (['export'], '{}')
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
