"""Evaluator throughput on the tiny policy: diagnostic items per second, batched vs one at a time.

Each repetition evaluates the same held-out synthetic items end to end (`evaluate_items`: image
decoding, prompt rendering, greedy generation, grading, rule-based attribution, EvalOutcome
events) once with `--batch-size` prompts per generate call and once one prompt at a time. A
random-initialised policy never stops early, so every answer runs to `--max-new-tokens`: these are
worst-case generation lengths. One untimed warm-up pass comes first.

Run: `python -m benchmarks.evaluator [--items 64] [--repeats 3] [--batch-size 32]`. The table goes to
stderr; the last line of stdout is one JSON object with the medians.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks._stats import print_table, spread
from dpe.inference import LocalVersion
from dpe.policy.config import TinyVLMConfig
from dpe.policy.model import Policy, build_tiny_policy
from producers.evaluator.items import EvalItem, heldout_items
from producers.evaluator.outcomes import evaluate_items
from producers.evaluator.settings import SyntheticSuites


def items_per_second(policy: Policy, items: list[EvalItem], batch_size: int, max_new_tokens: int) -> float:
    """Items evaluated per second in one full pass."""
    started = time.perf_counter()
    outcomes = evaluate_items(LocalVersion(policy, 0), items, batch_size=batch_size, max_new_tokens=max_new_tokens)
    elapsed = time.perf_counter() - started
    assert len(outcomes) == len(items)
    return len(items) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    policy = build_tiny_policy(TinyVLMConfig())
    items = heldout_items(SyntheticSuites(heldout_items=args.items))
    items_per_second(policy, items[: args.batch_size], args.batch_size, args.max_new_tokens)
    rows: dict[str, list[float]] = {"batched": [], "one at a time": [], "speedup": []}
    for _ in range(args.repeats):
        batched = items_per_second(policy, items, args.batch_size, args.max_new_tokens)
        single = items_per_second(policy, items, 1, args.max_new_tokens)
        rows["batched"].append(batched)
        rows["one at a time"].append(single)
        rows["speedup"].append(batched / single)

    units = {"batched": "items/s", "one at a time": "items/s", "speedup": "x"}
    title = (f"evaluator: {len(items)} items, tiny {policy.model.config.model_type} "
             f"({policy.num_parameters() / 1e6:.2f}M params), {args.max_new_tokens} new tokens, "
             f"batch {args.batch_size}, {args.repeats} runs, {torch.get_num_threads()} torch threads")
    print_table(title, rows, units, {"speedup": "> 1"})
    batched = spread(rows["batched"])
    print(json.dumps({
        "items_per_s": round(batched["median"], 2),
        "items_per_s_spread": round(batched["spread"], 3),
        "items_per_s_unbatched": round(spread(rows["one at a time"])["median"], 2),
        "batch_speedup": round(spread(rows["speedup"])["median"], 2),
        "items": len(items),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
