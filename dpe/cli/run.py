"""`dpe run`: the whole spiral on one machine (embedded broker unless Kafka is configured);
`dpe experiment`: the spiral under several quota strategies and seeds, compared."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console

from dpe.command import CliState, pass_state
from dpe.lifecycle import sigterm_interrupts
from dpe.settings import Settings
from dpe.spiral.experiment.runner import NO_RECTIFICATION, ExperimentOptions, run_experiment
from dpe.spiral.experiment.statistics import RunRow
from dpe.spiral.experiment.tables import accuracy_markdown, accuracy_table, comparison_table, markdown_table
from dpe.spiral.run import SpiralOptions, run_spiral
from dpe.spiral.view import rounds_table
from streams.strategies import STRATEGIES

console = Console()

BASE_MODEL = click.option(
    "--base-model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="Local model folder to start from, e.g. a real checkpoint on a GPU (default: the warmed tiny model, built "
    "on first use).")


LORA = click.option(
    "--lora", type=click.IntRange(min=0), default=None, metavar="RANK",
    help="Train a LoRA adapter of this rank on the language model instead of every weight; checkpoints hold the "
    "adapter only (0: full fine-tuning; default: trainer.lora.rank of the settings).")


@click.command()
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Training rounds to run.")
@click.option("--forever", is_flag=True, help="Always on: keep training until Ctrl-C.")
@click.option("--strategy", type=click.Choice(sorted(STRATEGIES)), default=None,
              help="Quota strategy (default: stream.quotas.strategy).")
@click.option("--round-samples", type=click.IntRange(min=1), default=SpiralOptions.round_samples, show_default=True,
              help="Samples per round: the quota budget and the trainer's round size.")
@click.option("--round-timeout", "round_timeout_s", type=click.FloatRange(min=1), default=SpiralOptions.round_timeout_s,
              show_default=True, help="Close a round this many seconds after its first sample even when the plan is "
              "not filled (a folder of images may not serve every capability).")
@BASE_MODEL
@LORA
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--run-id", default=None, help="Folder name under --runs-dir (default: time + random).")
@click.option("--live/--no-live", default=True, show_default=True, help="Live table of the spiral.")
@click.option("--timeout", "timeout_s", type=float, default=1800.0, show_default=True, help="Give up after seconds.")
@click.option("--bus-memory-mb", type=click.FloatRange(min=1), default=SpiralOptions.bus_memory_mb, show_default=True,
              help="Roll the embedded broker (carry its state to a fresh one) past this resident memory.")
@click.option("--resume", "resume_id", default=None, metavar="RUN_ID",
              help="Go on with the stopped run RUN_ID under --runs-dir, with the options it started with.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Ingest this folder of images once, instead of the synthetic stream.")
@click.option("--watch", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Keep ingesting new images from this folder, instead of the synthetic stream.")
@click.option("--synthetic/--no-synthetic", default=None,
              help="The synthetic world's stream too (default: only when no folder is given).")
@click.option("--difficulty/--no-difficulty", default=SpiralOptions.difficulty, show_default=True,
              help="Keep only samples the current policy solves 3-7 times of 9 (the difficulty band).")
@click.option("--inference", type=click.Choice(["local", "server"]), default=None,
              help="server: start `dpe serve policy` and have the evaluator, the difficulty band and the auditor ask "
              "it for each version's answers; local: each loads its own copy (default: inference.mode).")
@click.option("--auditor-trainer/--no-auditor-trainer", default=SpiralOptions.auditor_trainer, show_default=True,
              help="Train the auditor model too (`dpe serve auditor-trainer`), whose best-ranked probes the auditor "
              "then asks beside its fixed ones; a second GRPO trainer, so off on a small machine by default.")
@pass_state
def run(state: CliState, rounds: int, forever: bool, strategy: str | None, round_samples: int,
        round_timeout_s: float, base_model: Path | None, lora: int | None, runs_dir: Path, run_id: str | None,
        live: bool, timeout_s: float, bus_memory_mb: float, resume_id: str | None, images: Path | None,
        watch: Path | None, synthetic: bool | None, difficulty: bool, inference: str | None,
        auditor_trainer: bool) -> None:
    """Run the spiral: diagnose, plan, make samples, train, re-diagnose, for --rounds rounds.

    Ctrl-C and SIGTERM (``docker stop``, systemd) both stop every service, save the run for --resume
    and still write the report.
    """
    sigterm_interrupts()
    session = {"live": live, "timeout_s": None if forever else timeout_s}
    if resume_id is not None:
        options = SpiralOptions.resumed(runs_dir, resume_id, **session)
        options = replace(options, timeout_s=None) if options.rounds is None else options
    else:
        options = SpiralOptions(rounds=None if forever else rounds, round_samples=round_samples, strategy=strategy,
                                round_timeout_s=round_timeout_s, base_model=base_model, lora=lora, runs_dir=runs_dir,
                                bus_memory_mb=bus_memory_mb, **session,
                                images=images and images.resolve(), watch=watch and watch.resolve(), synthetic=synthetic,
                                difficulty=difficulty, inference=inference, auditor_trainer=auditor_trainer,
                                **({"run_id": run_id} if run_id else {}))
    result = run_spiral(state.settings_as(Settings), options, console)
    console.print(rounds_table(result.rounds, title=f"run {options.run_id}"))
    console.print(f"{'completed' if result.completed else 'stopped'} in {result.seconds:.0f}s; "
                  f"summary: {result.run_dir / 'summary.json'}; report: {result.run_dir / 'report.html'}")
    if not result.completed and not forever and options.rounds is not None:
        sys.exit(1)


@click.command()
@click.option("--arm", "arms", multiple=True,
              type=click.Choice(sorted(STRATEGIES) + [name + NO_RECTIFICATION for name in sorted(STRATEGIES)]),
              default=ExperimentOptions.arms, show_default=True,
              help=f"Quota strategies to compare (repeat); a strategy with {NO_RECTIFICATION} has the auditor's leads "
                   "off.")
@click.option("--seed", "seeds", multiple=True, type=int, default=ExperimentOptions.seeds, show_default=True,
              help="Seeds of the unlabeled stream and the trainer (repeat).")
@click.option("--rounds", type=click.IntRange(min=1), default=ExperimentOptions.rounds, show_default=True)
@click.option("--round-samples", type=click.IntRange(min=1), default=ExperimentOptions.round_samples,
              show_default=True, help="Samples per round, the same for every arm.")
@click.option("--heldout-per-capability", type=click.IntRange(min=1), default=ExperimentOptions.heldout_per_capability,
              show_default=True, help="Held-out items per capability, the same suite for every run.")
@BASE_MODEL
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--live/--no-live", default=False, show_default=True, help="Live table of each run.")
@click.option("--from", "from_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run nothing: print the tables (and the README's Markdown) of this experiment.json.")
@pass_state
def experiment(state: CliState, arms: tuple[str, ...], seeds: tuple[int, ...], rounds: int, round_samples: int,
               heldout_per_capability: int, base_model: Path | None, runs_dir: Path, live: bool,
               from_file: Path | None) -> None:
    """Compare quota strategies at equal samples: gains over the base against uniform, over seeds."""
    if from_file is not None:
        data = json.loads(from_file.read_text())
        print_tables([RunRow.from_dict(row) for row in data["runs"]], tuple(data["arms"]), markdown=True)
        return
    options = ExperimentOptions(arms=arms, seeds=seeds, rounds=rounds, round_samples=round_samples,
                                heldout_per_capability=heldout_per_capability, base_model=base_model,
                                runs_dir=runs_dir, live=live)
    result = run_experiment(state.settings_as(Settings), options, console)
    print_tables(result.rows, arms)
    console.print(f"results: {result.folder / 'experiment.json'}; plot: {result.folder / 'experiment.png'}")
    if not all(outcome.completed for outcome in result.outcomes):
        sys.exit(1)


def print_tables(rows: list[RunRow], arms: tuple[str, ...], *, markdown: bool = False) -> None:
    """The per-capability accuracy table and the comparison with uniform (and its Markdown)."""
    console.print(accuracy_table(rows, arms))
    console.print(comparison_table(rows, arms))
    if markdown:
        for text in (accuracy_markdown(rows, arms), markdown_table(rows, arms)):
            console.print(text, markup=False, highlight=False, soft_wrap=True)
