"""``dpe samples export``: accepted samples as TRL or EasyR1 training files (see `consumers.samples.export`).

Example:
    >>> sorted(samples.commands)
    ['export']
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.console import Console

from consumers.samples.export import FORMATS, export_samples, read_accepted
from dpe.blobstore import BlobStore
from dpe.command import CliState, pass_state
from dpe.config import CoreSettings

console = Console()


@click.group()
def samples() -> None:
    """Work with accepted samples."""


@samples.command("export")
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), required=True, help="Output layout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: new or empty; it appears only once the export is complete.")
@click.option("--plan-id", default=None, help="Only samples made for this plan.")
@click.option("--capability", default=None, help="Only samples of this capability.")
@pass_state
def export(state: CliState, fmt: str, out: Path, plan_id: str | None, capability: str | None) -> None:
    """Export accepted samples for TRL or EasyR1, with their images; samples whose image is unreadable are skipped."""
    settings = state.settings_as(CoreSettings)
    accepted = asyncio.run(read_accepted(settings))
    chosen = [s for s in accepted if (plan_id is None or s.plan_id == plan_id)
              and (capability is None or s.capability == capability)]
    try:
        exported = export_samples(chosen, BlobStore(settings.blob.url, settings.blob.limits), out, fmt)
    except FileExistsError as exc:
        raise click.BadParameter(f"{out} {exc.strerror}; export into a new folder", param_hint="--out") from None
    lines = [f"skipped sample {skipped.sample_id}: {skipped.reason}" for skipped in exported.skipped]
    lines.append(f"exported {exported.samples} samples to {exported.path}"
                 + (f"; skipped {len(exported.skipped)} (above)" if exported.skipped else ""))
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False)
