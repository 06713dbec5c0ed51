"""Batched generation: greedy or sampled, n samples per prompt, vision tokens suppressed.

Each prompt, its image included, is encoded once; its key-value cache is then copied for its n
samples, which transformers' `generate` decodes together. Token for token this gives what
`generate` with n return sequences gives (which encodes every prompt n times): 2.2x the rollouts
per second for 16 prompts x 9 samples with the default tiny policy on 2 cores.

Example:
    >>> from dpe.policy.model import build_tiny_policy
    >>> from dpe.policy.config import TinyVLMConfig
    >>> from dpe.policy.prompts import build_messages
    >>> from dpe.world import make_item
    >>> policy = build_tiny_policy(TinyVLMConfig(corpus_items=5))
    >>> item = make_item("color", 1, 0)
    >>> outputs = generate(policy, [item.image], [build_messages(item.question, item.answer_type, item.options)],
    ...                    SamplingParams(temperature=1.0, num_samples=3, max_new_tokens=4), seed=0)
    >>> len(outputs), len(outputs[0])
    (1, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature, DynamicCache

from dpe.policy.model import Policy, suppressed_token_ids
from dpe.policy.prompts import render_prompt


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. `temperature=0` means greedy, which allows one sample per prompt only."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    num_samples: int = 1
    top_p: float = 1.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.max_new_tokens < 1 or self.num_samples < 1 or self.batch_size < 1:
            raise ValueError(f"invalid sampling parameters: {self}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("greedy decoding gives one sample per prompt; set a temperature for more")


def generate(
    policy: Policy,
    images: Sequence[Image.Image],
    conversations: Sequence[list[dict[str, Any]]],
    params: SamplingParams = SamplingParams(),
    *,
    seed: int | None = None,
) -> list[list[str]]:
    """Answer each conversation about its image: `params.num_samples` decoded completions per prompt.

    `conversations` come from `dpe.policy.prompts.build_messages`; `seed` seeds torch's global RNG
    first, which makes sampling reproducible.
    """
    if len(images) != len(conversations):
        raise ValueError(f"{len(images)} images for {len(conversations)} conversations")
    if seed is not None:
        torch.manual_seed(seed)
    texts = [render_prompt(policy.processor, conversation) for conversation in conversations]
    outputs: list[list[str]] = []
    for start in range(0, len(texts), params.batch_size):
        outputs += _generate_batch(
            policy, list(images[start : start + params.batch_size]), texts[start : start + params.batch_size], params
        )
    return outputs


def _generate_batch(
    policy: Policy, images: list[Image.Image], texts: list[str], params: SamplingParams
) -> list[list[str]]:
    """One batch: the prompts (images included) are encoded once, then each prompt's cache is copied for its
    `num_samples` completions, which decode together."""
    tokenizer = policy.tokenizer
    inputs = policy.processor(
        images=images, text=texts, padding=True, padding_side="left", return_tensors="pt"
    ).to(policy.model.device)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        if params.temperature > 0
        else {"do_sample": False}
    )
    n = params.num_samples
    with torch.inference_mode():
        cache = _encoded_prompts(policy.model, inputs)
        if n > 1:
            cache.batch_repeat_interleave(n)
            policy.model.model.rope_deltas = policy.model.model.rope_deltas.repeat_interleave(n, dim=0)
        sequences = policy.model.generate(
            input_ids=inputs["input_ids"].repeat_interleave(n, dim=0),
            attention_mask=inputs["attention_mask"].repeat_interleave(n, dim=0),
            past_key_values=cache,
            **sampling,
            max_new_tokens=params.max_new_tokens,
            suppress_tokens=suppressed_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    completions = tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [completions[index : index + n] for index in range(0, len(completions), n)]


def _encoded_prompts(model: Any, inputs: BatchFeature) -> DynamicCache:
    """The key-value cache of every prompt token but the last (which `generate` then feeds, to start decoding);
    the model keeps the prompts' multimodal position offsets (`rope_deltas`) for the decoding steps."""
    cache = DynamicCache(config=model.config)
    head = {name: value[:, :-1] if name in _PER_TOKEN else value for name, value in inputs.items()}
    model(**head, past_key_values=cache, use_cache=True)
    return cache


_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")
"""Processor outputs with one entry per prompt token."""
