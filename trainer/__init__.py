"""The GRPO trainer service: micro-rounds on accepted samples, DeepSpeed, exactly-once checkpoints.

Modules: `settings` (configuration, presets), `rewards` (TRL reward functions), `samples`
(admission: dedup, staleness, image and answer checks), `rounds` (reading micro-rounds from Kafka),
`engine` (TRL's GRPOTrainer on DeepSpeed, kept across rounds), `checkpoints` (atomic, verified,
pruned), `distributed` (process setup), `service` (the round loop, `run_trainer`), `cli`
(`dpe serve trainer`). Importing this package is cheap: nothing here imports torch.
"""
