"""`python -m benchmarks.soak --minutes M [--chaos] [--seed S]`: the spiral soaked, with faults, then checked.

Runs `dpe run --forever --no-live` with small rounds, optionally puts it through a seeded pass of
faults (`benchmarks.soak.chaos`), stops it with SIGTERM and checks the invariants from the topics
and the checkpoints (`benchmarks.soak.invariants`). Progress and the tables go to stderr; the last
line of stdout is one JSON object (`SoakResult.summary`). Exits 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from benchmarks.soak.report import print_report
from benchmarks.soak.runner import SoakOptions, run_soak


def parse_options(argv: list[str] | None = None) -> SoakOptions:
    """The options from the command line.

    >>> options = parse_options(["--minutes", "3", "--chaos", "--seed", "7", "--runs-dir", "/tmp/r", "--run-id", "x"])
    >>> options.minutes, options.chaos, options.seed, options.run_dir
    (3.0, True, 7, PosixPath('/tmp/r/x'))
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=SoakOptions.minutes, help="soak length, warm-up included")
    parser.add_argument("--chaos", action="store_true", help="apply one seeded pass of faults")
    parser.add_argument("--seed", type=int, default=SoakOptions.seed, help="seed of the fault schedule")
    parser.add_argument("--round-samples", type=int, default=SoakOptions.round_samples)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--run-id", default=None, help="run folder under --runs-dir (default: soak-<time>-<seed>)")
    parser.add_argument("--stall-after", type=float, default=SoakOptions.stall_after_s,
                        help="seconds without a new policy version that count as a stall")
    parser.add_argument("--bus-memory-mb", type=float, default=None,
                        help="roll the embedded broker past this resident memory (default: dpe run's)")
    parser.add_argument("--tmpfs-mb", type=int, default=SoakOptions.tmpfs_mb, help="size of the checkpoint disk")
    parser.add_argument("--base-model", type=Path, default=None,
                        help="a local model folder to start from (default: dpe run's warmed tiny model)")
    args = parser.parse_args(argv)
    run_id = args.run_id or time.strftime(f"soak-%Y%m%d-%H%M%S-{args.seed}")
    return SoakOptions(minutes=args.minutes, chaos=args.chaos, seed=args.seed, round_samples=args.round_samples,
                       run_dir=args.runs_dir / run_id, stall_after_s=args.stall_after, tmpfs_mb=args.tmpfs_mb,
                       bus_memory_mb=args.bus_memory_mb, base_model=args.base_model)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    console = Console(stderr=True)
    result = run_soak(options, console)
    print_report(result, console)
    print(json.dumps(result.summary()), flush=True)
    return 0 if not result.failures() else 1


if __name__ == "__main__":
    sys.exit(main())
