"""Accepted samples as training files, with the images written out of the blob store.

Formats:

- ``trl``: ``train.jsonl`` in TRL's conversational prompt-completion layout with an ``images``
  column of relative paths (loadable with ``datasets.load_dataset("json", ...)``); ``solution``,
  ``answer_type``, ``options`` and ``tolerance`` ride along for verifiable rewards.
- ``easyr1``: ``train.parquet`` with EasyR1/verl's ``images``, ``problem`` (``<image>`` then the
  question) and ``answer`` columns, plus the same extras.

Images are named by their content hash (``images/<sha256>.<ext>``), never by anything in the
samples. The accepted topic is read in full and deduplicated by `sample_id` (first one wins).

Example:
    >>> rows = trl_rows([sample], {sample.body.image.sha256: "images/ab.png"})     # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpe.blobstore import BlobStore
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


def write_images(samples: Sequence[AcceptedSample], store: BlobStore, out: Path) -> dict[str, str]:
    """Copy each distinct image to ``out/images/<sha256>.<ext>``; sha256 -> path relative to `out`."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for sample in samples:
        ref = sample.body.image
        if ref.sha256 in paths:
            continue
        relative = f"images/{ref.sha256}.{_EXTENSIONS.get(ref.media_type, 'img')}"
        target = out / relative
        if not target.exists():
            target.write_bytes(store.get_bytes(ref))
        paths[ref.sha256] = relative
    return paths


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


def export_samples(samples: Sequence[AcceptedSample], store: BlobStore, out: Path, fmt: str) -> Path:
    """Write `samples` in format `fmt` under `out`; the path of the data file."""
    out.mkdir(parents=True, exist_ok=True)
    build, write = FORMATS[fmt]
    return write(build(samples, write_images(samples, store, out)), out)
