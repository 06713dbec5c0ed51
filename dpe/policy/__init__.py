"""The policy model layer shared by the evaluator, the agents and the trainer.

Modules (import what you need; this package imports nothing heavy by itself):

- `dpe.policy.config`: `TinyVLMConfig`, `WarmupConfig`, the skewed `DEFAULT_MIX`.
- `dpe.policy.tokenizer`: byte-level BPE trained in-process, Qwen special tokens and chat template.
- `dpe.policy.processor`: Qwen processors without a video processor; `load_processor`.
- `dpe.policy.model`: `Policy`, `build_tiny_policy`, `load_policy`, `suppressed_token_ids`.
- `dpe.policy.prompts`: `build_messages`, the one prompt format used everywhere.
- `dpe.policy.generation`: batched greedy/sampled `generate` with vision tokens suppressed.
- `dpe.policy.sft`: supervised fine-tuning on labeled items.
- `dpe.policy.warmup`: the warmed base model, cached by recipe hash.
- `dpe.policy.accuracy`: per-capability greedy and sampled accuracy.
"""
