"""The weakness stream: rolling per-capability weakness from eval outcomes and divergences, and quota plans.

Pure parts (no Kafka): `streams.scoring` (decayed error rates, credible intervals, trends) and
`streams.strategies` (strategies from a weakness snapshot to a quota plan). The Faust app that runs them
over the bus is `streams.service`; `streams.service.run_worker` and the `weakness` click command start it.
"""
