"""A soak of the spiral with chaos, as a command: ``python -m benchmarks.soak --minutes M --chaos``.

Modules: `processes` (the `dpe run` process and its children by role), `chaos` (the seeded fault
schedule and how each fault is applied), `disk` (the tmpfs checkpoint disk and its ballast),
`observer` (the run's bus, read-only, and its checkpoint manifests), `rss` (memory per process),
`invariants` (pure checks over what was observed), `runner` (one soak, start to stop), `report`
(the tables), `__main__` (the command).
"""
