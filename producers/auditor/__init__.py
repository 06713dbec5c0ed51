"""The divergence auditor service (``dpe serve auditor``, after AuditDM).

`service` (the loop over unlabeled items), `settings` (the ``auditor`` section), `cli` (the command),
`probes` (questions to ask), `edits` (counterfactual views), `backends` (the target and the
references), `consensus` (do the references agree, does the target differ).
"""
