"""Per-capability accuracy of a policy on labeled items, greedy and sampled.

A quick probe of a policy's blind spots (the evaluator service does the real, streamed diagnosis).
"Sampled" is the mean pass rate over `num_samples` completions at `temperature`, the quantity the
difficulty filter and GRPO care about; "pass@k" is the share of items solved at least once.
`image_dependence` asks whether the answers look at the image at all.

Example:
    >>> from dpe.policy.config import TinyVLMConfig
    >>> from dpe.policy.model import build_tiny_policy
    >>> from dpe.world import diagnostic_sample
    >>> policy = build_tiny_policy(TinyVLMConfig(corpus_items=5))
    >>> table = measure_accuracy(policy, diagnostic_sample(0, 4, capabilities=["color", "counting"]),
    ...                          num_samples=2, max_new_tokens=4)
    >>> sorted(table), sorted(table["color"])
    (['color', 'counting'], ['format', 'greedy', 'items', 'pass_at_k', 'sampled'])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import torch

from dpe.grading import grade
from dpe.policy.generation import SamplingParams, generate
from dpe.policy.model import Policy
from dpe.policy.prompts import build_messages
from dpe.policy.sft import IGNORE_INDEX, sft_batch
from dpe.world import WorldItem


def measure_accuracy(
    policy: Policy,
    items: Sequence[WorldItem],
    *,
    num_samples: int = 9,
    temperature: float = 1.0,
    max_new_tokens: int = 12,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per capability: items, greedy accuracy, sampled pass rate, pass@k and boxed-format rate."""
    images = [item.image for item in items]
    conversations = [build_messages(item.question, item.answer_type, item.options) for item in items]
    greedy = generate(policy, images, conversations, SamplingParams(max_new_tokens=max_new_tokens))
    sampled = generate(
        policy,
        images,
        conversations,
        SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, num_samples=num_samples),
        seed=seed,
    )
    rows: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for item, (best,), samples in zip(items, greedy, sampled):
        key = item.key
        grades = [grade(text, key) for text in samples]
        greedy_grade = grade(best, key)
        rows[item.capability].append(
            (
                greedy_grade.score,
                sum(g.score for g in grades) / len(grades),
                float(any(g.correct for g in grades)),
                sum(g.format_ok for g in grades) / len(grades),
            )
        )
    return {
        capability: {
            "items": float(len(values)),
            "greedy": sum(v[0] for v in values) / len(values),
            "sampled": sum(v[1] for v in values) / len(values),
            "pass_at_k": sum(v[2] for v in values) / len(values),
            "format": sum(v[3] for v in values) / len(values),
        }
        for capability, values in sorted(rows.items())
    }


def image_dependence(policy: Policy, items: Sequence[WorldItem], *, batch_size: int = 16) -> float:
    """How much the answers depend on the image, from 0 (not at all) to 1.

    For each item, the total-variation distance between the model's next-token distributions over its
    answer tokens given its own image and given the next item's image (the largest over those tokens),
    averaged over the items. Items go through the model `batch_size` at a time; their images must share
    one size, as the world's do.

    Example:
        >>> from dpe.policy.config import TinyVLMConfig
        >>> from dpe.policy.model import build_tiny_policy
        >>> from dpe.world import diagnostic_sample
        >>> policy = build_tiny_policy(TinyVLMConfig(corpus_items=5))
        >>> 0.0 <= image_dependence(policy, diagnostic_sample(0, 4, capabilities=["color"]), batch_size=3) <= 1.0
        True
    """
    swapped = [replace(item, image=items[(index + 1) % len(items)].image) for index, item in enumerate(items)]
    distances = [
        _answer_distance(policy, items[start : start + batch_size], swapped[start : start + batch_size])
        for start in range(0, len(items), batch_size)
    ]
    return round(float(torch.cat(distances).mean()), 4)


def _answer_distance(policy: Policy, items: Sequence[WorldItem], swapped: Sequence[WorldItem]) -> torch.Tensor:
    """Per item, the largest total-variation distance over its answer tokens between `items` and `swapped`."""
    own, other = (sft_batch(policy, batch).to(policy.model.device) for batch in (items, swapped))
    answers = own.pop("labels")[:, 1:] != IGNORE_INDEX
    other.pop("labels")
    with torch.no_grad():
        distances = 0.5 * (policy.model(**own).logits.softmax(-1) - policy.model(**other).logits.softmax(-1)).abs()
    return distances.sum(-1)[:, :-1].masked_fill(~answers, 0.0).amax(1)
