"""The evaluator service (``dpe serve evaluator``, ``dpe eval``): one outcome per diagnostic item per checkpoint.

`service` (the loop over checkpoints), `settings` (the ``evaluator`` section), `cli` (the commands),
`items` (diagnostic items and the synthetic suites), `outcomes` (answers, grades, outcome events),
`rules` and `judge` (failure attribution), `loaders` (benchmark files).
"""
