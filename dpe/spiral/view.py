"""The live view of a running spiral: one rich renderable built from `SpiralState`."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dpe.spiral.state import SpiralState


def _bar(value: float, width: int = 12) -> str:
    filled = round(max(0.0, min(1.0, value)) * width)
    return "█" * filled + "·" * (width - filled)


def render(state: SpiralState, target_rounds: int | None, services: dict[str, str], elapsed_s: float) -> Group:
    """Header (version, round, rates, services) and a per-capability table."""
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
        ("accepted ", "bold"), f"{len(state.accepted_ids)} ({state.accepted_per_s():.1f}/s)   ",
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
    strategy = plan.strategy if plan else "–"
    return Group(Panel(Group(*parts), title=f"dpe-stream spiral · strategy {strategy}"))
