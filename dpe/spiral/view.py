"""What a person watches: the live view of a running spiral (`render_view`), its final table (`rounds_table`),
run without a terminal one log line per round (`RoundLog`), and stalls in words (`StallLog`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dpe.spiral.state import RoundRecord, SpiralState


def _bar(value: float, width: int = 12) -> str:
    filled = round(max(0.0, min(1.0, value)) * width)
    return "█" * filled + "·" * (width - filled)


def render_view(state: SpiralState, target_rounds: int | None, services: dict[str, str], elapsed_s: float,
                stall: str | None = None) -> Group:
    """Header (version, round, rates, services), a per-capability table, and the stall in words if there is one."""
    snapshot = state.latest_weakness()
    plan = state.latest_plan()
    heldout = state.heldout_accuracy(state.policy_version)
    base = state.heldout_accuracy(0)
    latest = state.checkpoints.get(state.policy_version)
    reward = latest.metrics.get("reward_mean") if latest else None
    rounds = f"{state.policy_version}/{target_rounds}" if target_rounds else f"{state.policy_version} (forever)"
    header = Text.assemble(
        ("policy v", "bold"), f"{state.policy_version}   ",
        ("round ", "bold"), f"{rounds}   ",
        ("accepted ", "bold"), f"{state.accepted} ({state.accepted_per_s():.1f}/s)   ",
        ("trainer reward ", "bold"), f"{reward:.3f}   " if reward is not None else "–   ",
        ("elapsed ", "bold"), f"{elapsed_s:.0f}s",
    )
    table = Table(expand=True)
    for column in ("capability", "weakness", "±", "n eff", "quota", "accepted", "held-out", "vs base"):
        table.add_column(column, justify="left" if column == "capability" else "right")
    capabilities = sorted(set(snapshot.capabilities if snapshot else {}) | set(heldout) | set(plan.quotas if plan else {}))
    for cap in capabilities:
        weak = snapshot.capabilities.get(cap) if snapshot else None
        accuracy = heldout.get(cap)
        delta = accuracy - base[cap] if accuracy is not None and cap in base else None
        table.add_row(
            cap,
            f"{_bar(weak.error_rate)} {weak.error_rate:.2f}" if weak else "–",
            f"{(weak.ci_high - weak.ci_low) / 2:.2f}" if weak else "–",
            f"{weak.effective_n:.0f}" if weak else "–",
            str(plan.quotas.get(cap, 0)) if plan else "–",
            str(state.accepted_by_capability.get(cap, 0)),
            f"{accuracy:.2f}" if accuracy is not None else "–",
            Text(f"{delta:+.2f}", style="green" if delta > 0 else "red" if delta < 0 else "") if delta is not None else "–",
        )
    service_line = Text("  ".join(f"{name}: {status}" for name, status in services.items()), style="dim")
    rejected = ", ".join(f"{reason} {count}" for reason, count in sorted(state.rejected_by_reason.items()))
    parts = [header, table, service_line]
    if rejected:
        parts.insert(2, Text(f"rejected by reason: {rejected}", style="dim"))
    if stall:
        parts.insert(1, Text(stall, style="bold red"))
    strategy = plan.strategy if plan else "–"
    return Group(Panel(Group(*parts), title=f"dpe-stream spiral · strategy {strategy}"))


def rounds_table(rounds: list[RoundRecord], title: str) -> Table:
    """Held-out accuracy per capability (rows) per policy version (columns), with the change since v0."""
    table = Table(title=title)
    table.add_column("capability")
    for record in rounds:
        table.add_column(f"v{record.policy_version}", justify="right")
    table.add_column("change", justify="right")
    capabilities = sorted({cap for record in rounds for cap in record.heldout_accuracy})
    for cap in capabilities:
        values = [record.heldout_accuracy.get(cap) for record in rounds]
        measured = [value for value in values if value is not None]
        change = measured[-1] - measured[0] if len(measured) > 1 else None
        table.add_row(cap, *(f"{value:.2f}" if value is not None else "–" for value in values),
                      Text(f"{change:+.2f}", style="green" if change > 0 else "red" if change < 0 else "")
                      if change is not None else "–")
    table.add_row("samples trained", *(str(record.samples_trained) for record in rounds), "", style="dim")
    return table


def round_line(state: SpiralState, version: int) -> str:
    """One line for policy version `version`: samples trained, held-out mean accuracy over capabilities (with the
    change since v0) and the plan its samples were made for.

    Example:
        >>> from dpe.events import Checkpoint
        >>> state = SpiralState()
        >>> state.apply(Checkpoint(policy_version=1, parent_version=0, uri="/c/1", sample_ids=["a", "b"]))
        >>> round_line(state, 1)
        'policy v1: 2 samples trained, held-out mean accuracy – on 0 items, plan –'
    """
    accuracy, base = _mean(state.heldout_accuracy(version)), _mean(state.heldout_accuracy(0))
    mean = f"{accuracy:.3f}" if accuracy is not None else "–"
    change = f" ({accuracy - base:+.3f} since v0)" if version > 0 and accuracy is not None and base is not None else ""
    plan = state.latest_plan(version - 1) if version > 0 else None
    quotas = ", ".join(f"{cap} {n}" for cap, n in sorted(plan.quotas.items())) if plan else ""
    return (f"policy v{version}: {state.trained.get(version, 0)} samples trained, "
            f"held-out mean accuracy {mean}{change} on {state.heldout_items(version)} items, "
            f"plan {f'{plan.strategy} ({quotas})' if plan else '–'}")


def _mean(accuracy: dict[str, float]) -> float | None:
    return statistics.fmean(accuracy.values()) if accuracy else None


@dataclass
class RoundLog:
    """The unattended view: one `round_line` per policy version, in order, once its held-out suite is graded
    (`heldout_items` outcomes), each version once.

    Example:
        >>> log = RoundLog(heldout_items=0)
        >>> log.new_lines(SpiralState())
        ['policy v0: 0 samples trained, held-out mean accuracy – on 0 items, plan –']
        >>> log.new_lines(SpiralState())
        []
    """

    heldout_items: int
    next_version: int = 0

    def new_lines(self, state: SpiralState) -> list[str]:
        """Lines for the versions finished since the last call."""
        lines = []
        while self.next_version <= state.policy_version and self._graded(state, self.next_version):
            lines.append(round_line(state, self.next_version))
            self.next_version += 1
        return lines

    def _graded(self, state: SpiralState, version: int) -> bool:
        return state.heldout_items(version) >= self.heldout_items


@dataclass
class StallLog:
    """Stalls of the spiral (`SpiralState.stall`), each reported once, when it begins; `seen` goes to the report.

    Example:
        >>> import time
        >>> stalls = StallLog(after_s=600)
        >>> state = SpiralState()
        >>> stalls.update(state) is None, stalls.current
        (True, None)
        >>> stalls.update(state, now=time.monotonic() + 900)[:45]
        'stalled: no new policy version for 15 min and'
        >>> stalls.update(state, now=time.monotonic() + 960) is None, len(stalls.seen)
        (True, 1)
    """

    after_s: float
    current: str | None = None
    seen: list[str] = field(default_factory=list)

    def update(self, state: SpiralState, now: float | None = None) -> str | None:
        """The stall's message when a stall begins, else None; `current` always holds the latest one."""
        message = state.stall(self.after_s, now)
        began = message is not None and self.current is None
        self.current = message
        if began:
            self.seen.append(message)
        return message if began else None
