"""The soak's final tables: invariants and measures, the faults with their recovery, memory per process."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from benchmarks.soak.runner import SoakResult


def invariants_table(result: SoakResult) -> Table:
    """One row per invariant or measure: its value, what it should be, and whether it is."""
    summary = result.summary()
    table = Table(title=f"soak: {result.options.minutes:g} min, chaos {'on' if result.options.chaos else 'off'}, "
                        f"seed {result.options.seed} ({result.options.run_dir})")
    for column in ("invariant / measure", "value", "expected", "status"):
        table.add_column(column, justify="right" if column == "value" else "left")
    rows = [
        ("policy versions advanced", summary["versions_advanced"], "> 0", summary["versions_advanced"] > 0),
        ("kills (SIGKILL)", summary["kills"], "", None),
        ("faults not as expected", summary["faults_failed"], "0", summary["faults_failed"] == 0),
        ("samples trained twice", summary["trained_twice"], "0", summary["trained_twice"] == 0),
        ("accepted samples lost", summary["lost_samples"], "0", summary["lost_samples"] == 0),
        ("accepted / trained / skipped / pending",
         (f"{summary['accepted_samples']} / {summary['trained_samples']} / {summary['skipped_samples']} / "
          f"{summary['pending_samples']}"), "", None),
        ("weakness figures ≠ recomputation", summary["weakness_mismatch"], "0", summary["weakness_mismatch"] == 0),
        ("plans not filled exactly", f"{summary['plans_unfilled']} of {summary['plans']}",
         f"0 ({summary['plans_timed_out']} closed by timeout, {summary['plans_spilled']} spilled)",
         summary["plans_unfilled"] == 0),
        ("version gaps", summary["version_gaps"], "0", summary["version_gaps"] == 0),
        (f"stalls (> {result.options.stall_after_s:.0f}s without a version)", summary["stalls"], "0",
         summary["stalls"] == 0),
        ("run exit code on SIGTERM", summary["run_exit_code"], "0", summary["run_exit_code"] == 0),
        ("max RSS growth (MiB)", summary["max_rss_growth_mb"], "", None),
        ("broker RSS at the end (MiB)", summary["broker_rss_mb"], "", None),
        ("trainer busy share", summary["trainer_busy_share"], "", None),
        ("bus epochs", summary["bus_epochs"], "", None),
    ]
    for name, value, expected, ok in rows:
        table.add_row(name, str(value), expected, "" if ok is None else "ok" if ok else "FAIL")
    for fault, why in result.faults_skipped.items():
        table.add_row(f"fault skipped: {fault}", "–", why, "")
    return table


def faults_table(result: SoakResult) -> Table:
    """One row per fault: when, what, what happened, and how long until the next policy version."""
    table = Table(title="faults")
    for column in ("at (s)", "fault", "outcome", "next version after (s)"):
        table.add_column(column, justify="right" if column != "fault" and column != "outcome" else "left")
    for fault in result.faults:
        recovery = result.recovery_s(fault)
        table.add_row(f"{fault.started_s:.0f}", str(fault.fault), ("" if fault.ok else "FAILED: ") + fault.outcome,
                      "–" if recovery is None else f"{recovery:.0f}")
    return table


def rss_table(result: SoakResult) -> Table:
    """One row per process role: RSS growth after the warm-up and the last RSS."""
    table = Table(title=f"resident memory (MiB; growth = late-window median - early-window median after "
                        f"{result.rss_after_s:.0f}s)")
    for column in ("process", "growth", "last"):
        table.add_column(column, justify="left" if column == "process" else "right")
    last = result.rss.last_mb()
    for role, growth in result.rss.growth(result.rss_after_s).items():
        table.add_row(role, "–" if growth is None else f"{growth:+.1f}", f"{last.get(role, 0.0):.0f}")
    return table


def print_report(result: SoakResult, console: Console) -> None:
    """The three tables, then each failed invariant in words."""
    console.print(faults_table(result))
    console.print(rss_table(result))
    console.print(invariants_table(result))
    for fill in (fill for fill in result.fills if fill.failed):
        console.print(f"plan {fill.plan_id} (v{fill.policy_version}) {fill.status}: quotas {dict(fill.quotas)}, "
                      f"accepted {dict(fill.accepted)}", markup=False)
    for sample_id, versions in list(result.twice.items())[:10]:
        console.print(f"sample {sample_id} trained by versions {versions}", markup=False)
    for sample_id, why in list(result.fates.lost.items())[:10]:
        console.print(f"sample {sample_id} lost: {why}", markup=False)
    for diff in result.diffs[:10]:
        console.print(f"weakness {diff.capability}.{diff.field}: stream {diff.stream}, recomputed {diff.recomputed}",
                      markup=False)
    for message in result.failures():
        console.print(f"FAILED: {message}", markup=False)
