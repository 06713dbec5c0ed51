"""The policy server (`dpe serve policy`): the current policy behind an OpenAI-compatible API, moving to each
announced checkpoint (`service`), configured by the ``policy`` section (`settings`), started by `cli`."""
