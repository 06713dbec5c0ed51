"""The divergence auditor service (``dpe serve auditor``, after AuditDM).

`service` (the loop over unlabeled items), `settings` (the ``auditor`` section), `cli` (the command),
`probes` (questions to ask), `edits` (counterfactual views and the toolbox of edits), `backends` (the target and the
references), `consensus` (do the references agree, does the target differ), `failures` (failure types), `menu` (what
the trained auditor model chooses from), `prober` (the auditor model: ranking, format, reward), `trainer` (``dpe
serve auditor-trainer``: the auditor model trained continually).
"""
