"""`dpe samples export`: accepted samples as training files, with the images written out of the blob store.

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

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from consumers.follower import read_topic
from dpe.blobstore import BlobStore
from dpe.broker import BrokerError
from dpe.cli import CliState, pass_state
from dpe.config import Settings
from dpe.events import AcceptedSample
from dpe.policy.prompts import boxed, format_question

console = Console(stderr=True)

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}


async def read_accepted(settings: Settings) -> list[AcceptedSample]:
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


@click.group()
def samples() -> None:
    """Work with accepted samples."""


@samples.command("export")
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), required=True, help="Output layout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--plan-id", default=None, help="Only samples made for this plan.")
@click.option("--capability", default=None, help="Only samples of this capability.")
@pass_state
def export(state: CliState, fmt: str, out: Path, plan_id: str | None, capability: str | None) -> None:
    """Export accepted samples for TRL or EasyR1, with their images."""
    settings = state.settings
    try:
        accepted = asyncio.run(read_accepted(settings))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    chosen = [s for s in accepted if (plan_id is None or s.plan_id == plan_id)
              and (capability is None or s.capability == capability)]
    path = export_samples(chosen, BlobStore(settings.blob.url, settings.blob.limits), out, fmt)
    console.print(f"exported {len(chosen)} samples to {path}")
