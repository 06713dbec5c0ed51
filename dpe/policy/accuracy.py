"""Per-capability accuracy of a policy on labeled items, greedy and sampled.

A quick probe of a policy's blind spots (the evaluator service does the real, streamed diagnosis).
"Sampled" is the mean pass rate over `num_samples` completions at `temperature`, the quantity the
difficulty filter and GRPO care about; "pass@k" is the share of items solved at least once.

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

from dpe.grading import grade
from dpe.policy.generation import SamplingParams, generate
from dpe.policy.model import Policy
from dpe.policy.prompts import build_messages
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
