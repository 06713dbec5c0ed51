"""Batched generation: greedy or sampled, n samples per prompt, vision tokens suppressed.

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
    tokenizer = policy.tokenizer
    inputs = policy.processor(
        images=images, text=texts, padding=True, padding_side="left", return_tensors="pt"
    ).to(policy.model.device)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        if params.temperature > 0
        else {"do_sample": False}
    )
    with torch.inference_mode():
        sequences = policy.model.generate(
            **inputs,
            **sampling,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.num_samples,
            suppress_tokens=suppressed_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    completions = tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    n = params.num_samples
    return [completions[index : index + n] for index in range(0, len(completions), n)]
