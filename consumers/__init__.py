"""Consumers: the agent crew that turns unlabeled items into QC-passed samples, and sample exports.

- `consumers.agents`: the ``dpe serve agents`` service (worker loop, crew, plan ledger, role backends);
- `consumers.qc`: the quality-control chain the crew runs on every candidate;
- `consumers.roles`: the roles' interface, shared by the crew and the QC checks that call roles;
- `consumers.samples`: ``dpe samples export``.
"""
