"""The agent crew service (``dpe serve agents``): follows the quota plan and fills it from unlabeled items.

`service` (the worker loop), `settings` (the ``agents`` section), `cli` (the command), `crew` (one
item and capability in, one accepted or rejected candidate out), `ledger` (how several workers fill a
plan exactly), and the role backends: `programmatic`, `llm` with its `prompts`, the `retriever`.
"""
