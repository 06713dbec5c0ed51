"""`dpe ingest`: folders, JSONL manifests (files or standard input), the synthetic world, a watched folder.

Shows a progress bar while it runs and ends with a table of published and skipped inputs by
reason. ``--watch DIR`` keeps polling a folder for new files until SIGTERM or Ctrl-C. A one-shot
ingest whose inputs all were refused (none published, none already published) fails, listing them.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from dpe.bus.aio import AsyncPublisher
from dpe.command import CliState, pass_state
from dpe.config import with_overrides
from dpe.lifecycle import run_until_stopped, start_service
from producers.ingest.paths import Roots
from producers.ingest.service import PUBLISHED, Ingestor, IngestReport, Outcome, index_path, paced
from producers.ingest.settings import IngestConfig
from producers.ingest.sources import FolderWatcher, Input, folder_entries, manifest_entries, synthetic_entries

console = Console()


@click.command()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--manifest", "manifests", multiple=True,
              help="JSONL manifest file, or '-' for standard input; its entries must lie under the allowed roots "
                   "(default: the manifest's folder).")
@click.option("--synthetic", is_flag=True, help="Ingest scenes of the synthetic world.")
@click.option("--count", type=click.IntRange(min=0), default=None,
              help="Synthetic scenes to ingest (default: endless).")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, help="Inputs per second at most (0: no limit).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Synthetic stream seed (default ingest.synthetic_seed).")
@click.option("--start", type=click.IntRange(min=0), default=None,
              help="First synthetic scene index (default 0; an endless stream goes on where its last run stopped).")
@click.option("--watch", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep polling this folder for new images.")
@click.option("--allowed-root", "allowed_roots", multiple=True,
              help="Folder or URL prefix manifest entries may point into (repeatable; adds to ingest.allowed_roots).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help="Prometheus port (0: off).")
@pass_state
def ingest(state: CliState, folders: tuple[Path, ...], manifests: tuple[str, ...], synthetic: bool, count: int | None,
           rate: float, seed: int | None, start: int | None, watch: Path | None, allowed_roots: tuple[str, ...],
           metrics_port: int | None) -> None:
    """Validate, store, deduplicate and publish unlabeled images."""
    configured = state.settings_as(IngestConfig)
    settings = with_overrides(configured, {"ingest": {
        "allowed_roots": [*configured.ingest.allowed_roots, *allowed_roots], "metrics_port": metrics_port}})
    if not (folders or manifests or synthetic or watch):
        raise click.UsageError("nothing to ingest: give folders, --manifest, --synthetic or --watch")
    if synthetic and count is None and watch is None and (folders or manifests):
        raise click.UsageError("an endless --synthetic stream must come alone or with --count")
    inputs, total = _inputs(settings, folders, manifests, synthetic, count, seed, start)
    start_service(settings, settings.ingest.metrics_port)
    report = run_until_stopped(lambda stop: _run(settings, inputs, total, rate, watch, stop))
    console.print(summary_table(report))
    if watch is None and not report.on_bus:
        raise click.ClickException(nothing_published(report))


def _inputs(settings: IngestConfig, folders: tuple[Path, ...], manifests: tuple[str, ...], synthetic: bool,
            count: int | None, seed: int | None, start: int | None) -> tuple[Iterable[Input], int | None]:
    max_bytes = settings.blob.limits.max_bytes
    configured = Roots.of(settings.ingest.allowed_roots)
    parts: list[Iterable[Input]] = []
    total: int | None = 0
    for folder in folders:
        entries = list(folder_entries(folder, configured, max_bytes))
        parts.append(entries)
        total = None if total is None else total + len(entries)
    for manifest in manifests:
        parts.append(_manifest(manifest, settings, configured))
        total = None
    if synthetic:
        seed = settings.ingest.synthetic_seed if seed is None else seed
        position = index_path(settings).parent / f"synthetic-{seed}.next"
        resumed = start is None and count is None
        first = _next_scene(position) if resumed else start or 0
        scenes = synthetic_entries(count, seed, first, settings.ingest.image_size, settings.ingest.answer_key)
        parts.append(_noting_next(scenes, position, first) if resumed else scenes)
        total = None if total is None or count is None else total + count
    return itertools.chain.from_iterable(parts), total


def _next_scene(position: Path) -> int:
    """The synthetic scene index an endless stream stopped at, from its `position` file (0 without one)."""
    try:
        return int(position.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _noting_next(scenes: Iterator[Input], position: Path, first: int) -> Iterator[Input]:
    """`scenes` (numbered from `first`), writing to `position` the index after each one the ingestor has taken.

    A restarted endless stream goes on from there: replaying from 0 would offer every scene published
    before, each skipped as a duplicate but paced at `--rate`, so the agents would get no new item
    for as long as the last run lasted. Scenes taken but not yet acknowledged when the stream was
    killed (at most ``ingest.ack_every``) are not offered again: the synthetic world has no end, they
    are only scenes fewer.

    >>> import tempfile
    >>> position = Path(tempfile.mkdtemp()) / "synthetic-0.next"
    >>> scenes = _noting_next(iter("abc"), position, first=5)
    >>> next(scenes), next(scenes), position.read_text()   # 'b' is out but not yet taken: the ingestor asks for 'c'
    ('a', 'b', '6')
    """
    position.parent.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes, first + 1):
        yield scene
        written = position.with_suffix(".tmp")
        written.write_text(str(index))
        written.replace(position)


def _manifest(manifest: str, settings: IngestConfig, configured: Roots) -> Iterator[Input]:
    """A manifest's inputs; with no configured roots, entries are confined to the manifest's folder."""
    base = Path.cwd() if manifest == "-" else Path(manifest).resolve().parent
    roots = configured if settings.ingest.allowed_roots else Roots.of([base])
    limit = settings.ingest.max_manifest_line_bytes
    if manifest == "-":
        yield from manifest_entries(sys.stdin, base, roots, settings.blob.limits.max_bytes, limit)
        return
    try:
        with open(manifest, encoding="utf-8", errors="replace") as lines:
            yield from manifest_entries(lines, base, roots, settings.blob.limits.max_bytes, limit)
    except OSError as exc:
        raise click.ClickException(f"cannot read manifest {manifest}: {exc}") from None


async def _run(settings: IngestConfig, inputs: Iterable[Input], total: int | None, rate: float,
               watch: Path | None, stop: asyncio.Event) -> IngestReport:
    report = IngestReport()
    async with AsyncPublisher(settings, producer_name="ingest") as publisher:
        ingestor = Ingestor.from_settings(settings, publisher, stop)
        with _progress() as progress:
            task = progress.add_task("ingest", total=total, published=0, skipped=0)

            def advance(outcome: Outcome) -> None:
                report.record(outcome)
                progress.update(task, advance=1, published=report.published, skipped=report.skipped)

            await ingestor.ingest(_until(paced(inputs, rate), stop), advance)
            if watch is not None:
                watcher = FolderWatcher(watch, Roots.of(settings.ingest.allowed_roots), settings.blob.limits.max_bytes,
                                        settings.ingest.settle_polls)
                progress.update(task, description=f"watching {watch}")
                while not stop.is_set():
                    await ingestor.ingest(watcher.poll(), advance)
                    try:
                        await asyncio.wait_for(stop.wait(), settings.ingest.poll_interval_s)
                    except TimeoutError:
                        pass
    return report


async def _until(inputs: AsyncIterator[Input], stop: asyncio.Event) -> AsyncIterator[Input]:
    async for entry in inputs:
        if stop.is_set():
            return
        yield entry


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("[green]{task.fields[published]} published[/] [yellow]{task.fields[skipped]} skipped[/]"),
        TimeElapsedColumn(), console=console, transient=False,
    )


def summary_table(report: IngestReport) -> Table:
    """Published and skipped inputs by reason, with shares."""
    table = Table("outcome", "reason", "inputs", "share", title="ingest summary")
    total = sum(report.counts.values()) or 1
    rows = sorted(report.counts.items(), key=lambda kv: (kv[0] != PUBLISHED, -kv[1], kv[0]))
    for reason, n in rows:
        outcome = "[green]published[/]" if reason == PUBLISHED else "[yellow]skipped[/]"
        table.add_row(outcome, reason, str(n), f"{n / total:.1%}")
    table.add_row("[bold]total[/]", "", str(sum(report.counts.values())), "")
    return table


def nothing_published(report: IngestReport) -> str:
    """Why an ingest published nothing: each refused input (the first `report.keep`) with its reason.

    Example:
        >>> report = IngestReport()
        >>> report.record(Outcome("/in/a.png", "not_found", detail="no such file"))
        >>> print(nothing_published(report))
        nothing published: 1 input refused
          /in/a.png: not_found (no such file)
    """
    if not report.refused:
        return "nothing to ingest: no image found in what was given"
    lines = [f"nothing published: {report.refused} input{'s' if report.refused > 1 else ''} refused"]
    lines += [f"  {outcome.source}: {outcome.reason}" + (f" ({outcome.detail})" if outcome.detail else "")
              for outcome in report.refusals]
    if report.refused > len(report.refusals):
        lines.append(f"  ... and {report.refused - len(report.refusals)} more")
    return "\n".join(lines)
