"""Does GRPO move held-out accuracy? The trainer's engine on right answers, graded on items it never saw.

Each variant trains the trainer's `GRPOEngine` (plain torch, one thread, in its own process) from a
base model for `--rounds` micro-rounds of `--round-samples` samples drawn from the synthetic world's
training stream: its questions and right answers, the best data the agents could make. After each
round it measures greedy accuracy per capability on the held-out suite the evaluator grades (the
diagnostic pool's first items at `--levels`). If even these rounds leave held-out accuracy where it
was, no quota strategy can show a gain on that base, and `dpe experiment` has nothing to compare.

A variant is ``NAME=JSON`` with optional keys ``grpo`` (`GRPOSettings` fields over the ``tiny``
preset), ``mix`` (capability weights of the samples; default: every capability alike), ``levels``
(of the samples; default: `--levels`) and ``method``: ``grpo`` (default) or ``sft``, the control
(supervised fine-tuning on the same items' right answers; ``sft`` sets its learning_rate and
batch_size).

Writes ``<out>/grpo_transfer.json`` (tidy rows: variant, round, capability, accuracy, items; per
round the trainer's KL and mean reward, or the SFT loss) and prints a table; ``--markdown FILE`` prints the README's
table of such a file. The last line of stdout is one JSON object.

Run: `python -m benchmarks.grpo_transfer --variant 'default={}' --variant 'colour={"mix": {"color": 1}}'`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks._markdown import add_markdown_option, print_markdown
from dpe.policy.accuracy import measure_accuracy
from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up
from dpe.world import CAPABILITIES, WorldItem, diagnostic_sample, training_stream

SEED = 11
"""Seed of the training stream the samples come from (disjoint from the diagnostic pool by construction)."""


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME=JSON`` as a name and its overrides.

    >>> parse_variant('fast={"grpo": {"learning_rate": 0.001}}')
    ('fast', {'grpo': {'learning_rate': 0.001}})
    """
    name, _, text = spec.partition("=")
    if not name or not text:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {spec!r}")
    overrides = json.loads(text)
    if overrides.get("method", "grpo") not in LEARNERS:
        raise argparse.ArgumentTypeError(f"unknown method {overrides['method']!r}; known: {sorted(LEARNERS)}")
    return name, overrides


def as_samples(items: list[WorldItem], version: int) -> list:
    """World items as the trainer's samples, made against `version`."""
    from trainer.samples import TrainingSample

    return [TrainingSample(sample_id=f"v{version}-{index}", capability=item.capability, image=item.image,
                           question=item.question, answer=item.answer, answer_type=item.answer_type,
                           options=item.options, tolerance=item.tolerance, policy_version=version)
            for index, item in enumerate(items)]


Learner = tuple[Any, Callable[[list[WorldItem], int], dict[str, float | None]]]
"""A policy and how one round trains it on some items (returning the round's metrics)."""


def grpo_learner(base: Path, overrides: dict[str, Any]) -> Learner:
    """The trainer's `GRPOEngine` (plain torch) with the ``tiny`` preset and the variant's ``grpo`` fields."""
    from trainer.engine import GRPOEngine
    from trainer.settings import TrainerSettings

    settings = TrainerSettings(base_model=str(base), torch_threads=1, deepspeed={"enabled": False},
                               grpo={"preset": "tiny", **overrides.get("grpo", {})}, staleness={"max_versions": None})
    engine = GRPOEngine(base, settings, Path(tempfile.mkdtemp(prefix="grpo-transfer-")))

    def train(items: list[WorldItem], version: int) -> dict[str, float | None]:
        summary = engine.train_round(as_samples(items, version)).summary()
        return {"kl": summary.get("kl"), "reward_mean": summary.get("reward_mean")}

    return engine.policy, train


def sft_learner(base: Path, overrides: dict[str, Any]) -> Learner:
    """The control: supervised fine-tuning on the same items' right answers (``sft``: learning_rate, batch_size;
    a fresh optimiser each round)."""
    from dpe.policy.model import load_policy
    from dpe.policy.sft import train_sft

    policy = load_policy(base)
    options = {"learning_rate": 3e-4, "batch_size": 8} | overrides.get("sft", {})

    def train(items: list[WorldItem], version: int) -> dict[str, float | None]:
        losses = train_sft(policy, iter(items), steps=len(items) // options["batch_size"], warmup_steps=0,
                           show_progress=False, **options)
        return {"loss": statistics.fmean(losses) if losses else None}

    return policy, train


METRICS = ("kl", "reward_mean", "loss")
"""What a round reports: GRPO its KL and mean reward, SFT its loss."""
LEARNERS: dict[str, Callable[[Path, dict[str, Any]], Learner]] = {"grpo": grpo_learner, "sft": sft_learner}


def transfer(name: str, overrides: dict[str, Any], base: Path, rounds: int, samples: int,
             levels: tuple[int, ...], per_capability: int) -> dict[str, Any]:
    """One variant in this process: its rows (round 0 is the base) and per-round training metrics."""
    torch.set_num_threads(1)
    policy, train = LEARNERS[overrides.get("method", "grpo")](base, overrides)
    heldout = diagnostic_sample(0, per_capability * len(CAPABILITIES), seed=0, levels=levels)
    mix = overrides.get("mix") or {capability: 1.0 for capability in CAPABILITIES}
    stream = training_stream(mix, SEED, levels=tuple(overrides.get("levels") or levels))
    rows = _measure(policy, heldout, name, 0)
    metrics = []
    for version in range(1, rounds + 1):
        items = [next(stream) for _ in range(samples)]
        metrics.append({"variant": name, "round": version, **train(items, version - 1)})
        rows += _measure(policy, heldout, name, version)
    return {"name": name, "overrides": overrides, "rows": rows, "metrics": metrics}


def _measure(policy: Any, items: list[WorldItem], name: str, version: int) -> list[dict[str, Any]]:
    policy.model.eval()
    table = measure_accuracy(policy, items)
    policy.model.train()
    return [{"variant": name, "round": version, "capability": capability, "accuracy": row["greedy"],
             "items": int(row["items"])} for capability, row in sorted(table.items())]


def accuracy_at(rows: list[dict[str, Any]], variant: str, version: int) -> dict[str, float]:
    """A variant's held-out accuracy per capability after round `version` (0: the base)."""
    return {row["capability"]: row["accuracy"] for row in rows if row["variant"] == variant and row["round"] == version}


def mean_accuracy(rows: list[dict[str, Any]], variant: str, version: int) -> float:
    """The mean over capabilities of `accuracy_at`."""
    accuracy = accuracy_at(rows, variant, version)
    return round(sum(accuracy.values()) / len(accuracy), 4)


def markdown(result: dict[str, Any]) -> str:
    """The README's table: per variant, the base and last round's accuracy per capability and their mean.

    >>> rows = [{"variant": "a", "round": r, "capability": "color", "accuracy": acc, "items": 2}
    ...         for r, acc in ((0, 0.5), (1, 1.0))]
    >>> print(markdown({"variants": {"a": {}}, "rounds": 1, "rows": rows}))
    | variant | round | color | mean |
    |---|---|---|---|
    | `a` | 0 | 0.50 | 0.50 |
    | `a` | 1 | 1.00 | 1.00 |
    """
    capabilities = [c for c in CAPABILITIES if any(row["capability"] == c for row in result["rows"])]
    lines = ["| " + " | ".join(["variant", "round", *capabilities, "mean"]) + " |",
             "|" + "---|" * (len(capabilities) + 3)]
    for name in result["variants"]:
        for version in (0, result["rounds"]):
            accuracy = accuracy_at(result["rows"], name, version)
            cells = [f"`{name}`", str(version), *(f"{accuracy[c]:.2f}" for c in capabilities),
                     f"{mean_accuracy(result['rows'], name, version):.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    table = Table(title="greedy held-out accuracy after each GRPO round (round 0: the base)")
    for column in ("variant", "round", *CAPABILITIES, "KL", "reward", "loss"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name in result["variants"]:
        metrics = {row["round"]: row for row in result["metrics"] if row["variant"] == name}
        for version in range(result["rounds"] + 1):
            accuracy = accuracy_at(result["rows"], name, version)
            extra = metrics.get(version, {})
            table.add_row(name, str(version), *(f"{accuracy[c]:.2f}" for c in CAPABILITIES),
                          *(f"{extra[k]:.3f}" if extra.get(k) is not None else "–" for k in METRICS))
    Console(stderr=True).print(table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", type=parse_variant, default=None,
                        help="NAME=JSON (repeat; default: default={}); each runs in its own process.")
    parser.add_argument("--base-model", type=Path, default=None, help="A local checkpoint (default: the default base).")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--round-samples", type=int, default=240)
    parser.add_argument("--levels", default="1", help="Difficulty levels graded (and of the samples), e.g. 1,2.")
    parser.add_argument("--per-capability", type=int, default=100, help="Held-out items per capability.")
    parser.add_argument("--out", type=Path, default=Path("runs/grpo_transfer"))
    add_markdown_option(parser, "grpo_transfer.json")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        return print_markdown(args.markdown, markdown)
    variants = dict(args.variant or [("default", {})])
    levels = tuple(int(level) for level in args.levels.split(","))
    base = args.base_model or warm_up(WarmupConfig()).folder
    with ProcessPoolExecutor(max_workers=len(variants)) as pool:
        futures = [pool.submit(transfer, name, overrides, base, args.rounds, args.round_samples, levels,
                               args.per_capability) for name, overrides in variants.items()]
        results = [future.result() for future in futures]
    result = {"base_model": str(base), "rounds": args.rounds, "round_samples": args.round_samples,
              "levels": list(levels), "variants": {r["name"]: r["overrides"] for r in results},
              "rows": [row for r in results for row in r["rows"]],
              "metrics": [row for r in results for row in r["metrics"]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpo_transfer.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    summary = {"out": str(args.out), "mean": {name: {"base": mean_accuracy(result["rows"], name, 0),
                                                     "last": mean_accuracy(result["rows"], name, args.rounds)}
                                              for name in variants}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
