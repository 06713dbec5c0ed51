"""Resident memory of every process of the spiral over the soak, and its growth.

`RssSampler.sample` records, per role (``run`` for `dpe run` itself, ``broker``, each service), the
summed RSS of the role's processes and their descendants. A role's growth is the median of the
late window minus the median of the early window of its samples after the warm-up (`growth_mb`):
medians, so one sample caught mid-allocation does not decide it. A killed service starts again
small, so its growth over a chaos soak reads low; the table shows its last RSS too.

Example:
    >>> series = [(t, (100 + t) * MIB) for t in range(0, 100, 10)]
    >>> growth_mb(series, after=20.0)
    60.0
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

import psutil

from benchmarks.soak.processes import RUN, processes_by_role

MIB = 2**20
Sample = tuple[float, int]
"""(seconds since the soak started, bytes)."""


def growth_mb(series: Sequence[Sample], after: float, window: float = 0.25) -> float | None:
    """Median RSS of the last `window` share of the samples at or after `after`, minus that of the first, in MiB
    (None with fewer than two such samples)."""
    kept = [rss for t, rss in series if t >= after]
    if len(kept) < 2:
        return None
    size = max(1, int(len(kept) * window))
    return (statistics.median(kept[-size:]) - statistics.median(kept[:size])) / MIB


def tree_rss(process: psutil.Process) -> int:
    """RSS of a process and all its descendants, in bytes (those gone meanwhile count 0)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class RssSampler:
    """Samples the RSS of `dpe run` and of each of its children's roles."""

    def __init__(self, run: psutil.Process):
        self.run = run
        self.series: dict[str, list[Sample]] = defaultdict(list)

    def sample(self, t: float) -> None:
        """One sample of every role at `t` seconds."""
        try:
            self.series[RUN].append((t, self.run.memory_info().rss))
            roles = processes_by_role(self.run)
        except psutil.NoSuchProcess:
            return
        for role, processes in roles.items():
            total = sum(tree_rss(process) for process in processes)
            if total:
                self.series[role].append((t, total))

    def growth(self, after: float) -> dict[str, float | None]:
        """Each role's growth in MiB after `after` seconds (`growth_mb`)."""
        return {role: growth_mb(series, after) for role, series in sorted(self.series.items())}

    def last_mb(self) -> dict[str, float]:
        """Each role's last sampled RSS in MiB."""
        return {role: series[-1][1] / MIB for role, series in sorted(self.series.items()) if series}
