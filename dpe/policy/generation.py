"""Batched generation: greedy or sampled, n samples per prompt, vision tokens suppressed.

Each prompt, its image included, is encoded once; its key-value cache is then copied for its n
samples, which decode together in a plain loop (one forward per token, stopping when every
sequence has ended). Token for token this gives what transformers' `generate` with n return
sequences gives (which encodes every prompt n times, and prepares its generation config, logits
processors and stopping criteria on every call): 2.2x the rollouts per second for 16 prompts x 9
samples with the default tiny policy on 2 cores from encoding once, and about 15 % more from the
plain loop. `encode_prompts` and `sample` expose the two halves: prompts encoded once can be
sampled again, any subset of them, as the difficulty band does in stages.

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
    >>> messages = build_messages(item.question, item.answer_type, item.options)
    >>> prompts = encode_prompts(policy, [item.image] * 3, [messages] * 3)
    >>> params = SamplingParams(temperature=1.0, num_samples=2, max_new_tokens=4)
    >>> [len(samples) for samples in sample(policy, prompts, params, rows=[2, 0])]
    [2, 2]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from dpe.policy.model import Policy, suppressed_token_ids
from dpe.policy.prompts import render_prompt


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. `temperature=0` means greedy, which allows one sample per prompt only."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    num_samples: int = 1
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
    """One batch: the prompts (images included) are encoded once, then sampled `num_samples` times each."""
    return sample(policy, _encode(policy, images, texts), params)


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts encoded once, images included: the key-value cache of every prompt token but the last, the last
    tokens (which start decoding), the attention mask and the multimodal position offsets (`rope_deltas`).
    `sample` draws completions from them for any subset of the prompts, as often as wanted."""

    cache: DynamicCache
    last: torch.Tensor
    attention_mask: torch.Tensor
    rope_deltas: torch.Tensor

    def __len__(self) -> int:
        return self.last.shape[0]


def encode_prompts(
    policy: Policy, images: Sequence[Image.Image], conversations: Sequence[list[dict[str, Any]]]
) -> EncodedPrompts:
    """Encode each conversation about its image once (one batch), for `sample` to draw completions from (see the
    module's example)."""
    if len(images) != len(conversations):
        raise ValueError(f"{len(images)} images for {len(conversations)} conversations")
    return _encode(policy, list(images), [render_prompt(policy.processor, messages) for messages in conversations])


def sample(policy: Policy, prompts: EncodedPrompts, params: SamplingParams,
           rows: Sequence[int] | None = None) -> list[list[str]]:
    """`params.num_samples` completions for each prompt in `rows` (all by default), in that order; the encoded
    prompts are left as they were, so they can be sampled again (`params.batch_size` does not apply here)."""
    index = torch.arange(len(prompts)) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    n = params.num_samples
    repeated = index.repeat_interleave(n).to(prompts.last.device)
    cache = DynamicCache(config=policy.model.config)
    with torch.inference_mode():
        for layer, source in enumerate(prompts.cache.layers):
            cache.update(source.keys[repeated], source.values[repeated], layer)
        policy.model.model.rope_deltas = prompts.rope_deltas[repeated]
        tokens = _decode(policy, cache, prompts.last[repeated], prompts.attention_mask[repeated], params)
    completions = policy.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [completions[start : start + n] for start in range(0, len(completions), n)]


def _encode(policy: Policy, images: list[Image.Image], texts: list[str]) -> EncodedPrompts:
    """The prompts' cache of every token but the last (which `_decode` then feeds, to start decoding), with the
    multimodal position offsets the model computed for them."""
    inputs = policy.processor(
        images=images, text=texts, padding=True, padding_side="left", return_tensors="pt"
    ).to(policy.model.device)
    cache = DynamicCache(config=policy.model.config)
    head = {name: value[:, :-1] if name in _PER_TOKEN else value for name, value in inputs.items()}
    with torch.inference_mode():
        policy.model(**head, past_key_values=cache, use_cache=True)
    return EncodedPrompts(cache, inputs["input_ids"][:, -1:], inputs["attention_mask"],
                          policy.model.model.rope_deltas)


_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")
"""Processor outputs with one entry per prompt token."""


def _decode(policy: Policy, cache: DynamicCache, last: torch.Tensor, attention_mask: torch.Tensor,
            params: SamplingParams) -> torch.Tensor:
    """New tokens (pad after a sequence's end token) from the cached prompts and their `last` tokens.

    Each step feeds one token per sequence at its text position (tokens seen so far, plus the
    multimodal offset `rope_deltas`), takes the float32 logits of it, masks the vision tokens, and
    picks greedily or samples from softmax(logits / temperature): what `generate` does, in its order.
    """
    model, tokenizer = policy.model, policy.tokenizer
    suppressed = torch.tensor(suppressed_token_ids(tokenizer), device=last.device)
    ends = torch.tensor(_end_token_ids(model), device=last.device)
    running = torch.ones(last.shape[0], dtype=torch.bool, device=last.device)
    tokens = []
    for _ in range(params.max_new_tokens):
        positions = (attention_mask.sum(dim=1, keepdim=True) - 1 + model.model.rope_deltas)[None]
        logits = model(input_ids=last, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
        logits[:, suppressed] = -float("inf")
        if params.temperature > 0:
            chosen = torch.multinomial(torch.softmax(logits / params.temperature, dim=-1), 1).squeeze(1)
        else:
            chosen = logits.argmax(dim=-1)
        chosen = torch.where(running, chosen, tokenizer.pad_token_id)
        tokens.append(chosen)
        running &= ~torch.isin(chosen, ends)
        if not running.any():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        last = chosen[:, None]
    return torch.stack(tokens, dim=1)


def _end_token_ids(model: Any) -> list[int]:
    """The model's end-of-sequence token ids (one or several)."""
    ends = model.generation_config.eos_token_id
    return list(ends) if isinstance(ends, (list, tuple)) else [ends]
