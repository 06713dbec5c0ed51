"""Learning curves of warm-up recipes: what the tiny base learns per capability, and how fast.

Each recipe trains a fresh tiny model (not cached) and measures greedy accuracy per capability on
held-out diagnostic items of the recipe's own levels every `--every` steps. Recipes are named
(`RECIPES`) or given as JSON (a `WarmupConfig` with an optional `model` object).

Writes ``<out>/warmup_curves.json`` (tidy rows: recipe, step, capability, accuracy, items; plus the
recipes) and ``<out>/warmup_curves.png`` (one panel per recipe). The table goes to stderr; the last
line of stdout is one JSON object.

Run: `python -m benchmarks.warmup --recipe colour_counting --recipe reading --every 500`
(each recipe trains on one thread, so two recipes use the two cores of a small machine).
`--recipe default --recipe uncentred` shows what centred image tokens do (`dpe.policy.image_tokens`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks._markdown import add_markdown_option, print_markdown  # noqa: E402
from dpe.policy.accuracy import image_dependence, measure_accuracy  # noqa: E402
from dpe.policy.config import TinyVLMConfig, WarmupConfig  # noqa: E402
from dpe.policy.model import build_tiny_policy  # noqa: E402
from dpe.policy.warmup import recipe_stream, train_on_recipe  # noqa: E402
from dpe.world import CAPABILITIES, WorldItem, diagnostic_sample  # noqa: E402

ALL = {capability: 1.0 for capability in CAPABILITIES}
BEFORE_CENTRING = {"centre_image_tokens": False, "steps": 2000}
"""How the exploratory recipes below were measured, before the image tokens were centred (README, #13)."""
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "uncentred": {"centre_image_tokens": False},
    "even": {"mix": ALL, "levels": [1, 2], **BEFORE_CENTRING},
    "colour_counting": {"mix": {"counting": 1.0, "color": 1.0}, "levels": [1, 2], **BEFORE_CENTRING},
    "reading": {"mix": {"text_reading": 1.0, "arithmetic": 1.0}, "levels": [1, 2], **BEFORE_CENTRING},
    "colour_counting_patch4": {"mix": {"counting": 1.0, "color": 1.0}, "levels": [1, 2], "model": {"patch_size": 4},
                               **BEFORE_CENTRING},
    "existence_unmerged": {"mix": {"existence": 1.0}, "levels": [1], "model": {"merge_size": 1}, **BEFORE_CENTRING},
}
"""Named recipes: overrides of `WarmupConfig` (``model`` overrides `TinyVLMConfig`)."""


def recipe_config(overrides: dict[str, Any], steps: int | None) -> WarmupConfig:
    """The `WarmupConfig` of a recipe's overrides, with `steps` if given.

    >>> config = recipe_config(RECIPES["colour_counting_patch4"], steps=10)
    >>> config.model.patch_size, config.steps, config.centre_image_tokens
    (4, 10, False)
    """
    fields = dict(overrides)
    model = TinyVLMConfig(**fields.pop("model", {}))
    return WarmupConfig(model=model, **fields | ({"steps": steps} if steps is not None else {}))


def _evaluated(config: WarmupConfig, items: list[WorldItem], every: int, rows: list[dict], name: str, policy: Any):
    """The recipe's training stream, measuring accuracy into `rows` every `every` batches."""
    for index, item in enumerate(recipe_stream(config)):
        if index and index % (every * config.batch_size) == 0:
            rows += _measure(policy, items, name, index // config.batch_size)
        yield item


def _measure(policy: Any, items: list[WorldItem], name: str, step: int) -> list[dict]:
    policy.model.eval()
    table = measure_accuracy(policy, items, num_samples=1)
    policy.model.train()
    return [{"recipe": name, "step": step, "capability": capability, "accuracy": row["greedy"],
             "items": int(row["items"])} for capability, row in sorted(table.items())]


def learning_curve(name: str, overrides: dict[str, Any], steps: int | None, every: int,
                   per_capability: int) -> dict[str, Any]:
    """Train one recipe on one thread; its rows, seconds and final loss."""
    torch.set_num_threads(1)
    config = recipe_config(overrides, steps)
    items = diagnostic_sample(0, per_capability * len(CAPABILITIES), seed=5, levels=config.levels,
                              image_size=config.model.image_size)
    policy = build_tiny_policy(config.model)
    rows: list[dict] = []
    started = time.perf_counter()
    losses = train_on_recipe(policy, config, examples=_evaluated(config, items, every, rows, name, policy),
                             show_progress=False)
    seconds = time.perf_counter() - started
    rows += _measure(policy, items, name, config.steps)
    return {"name": name, "config": config.model_dump(mode="json"), "rows": rows, "seconds": round(seconds, 1),
            "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1),
            "image_dependence": image_dependence(policy, items)}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """One panel per recipe: accuracy per capability against steps."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), dpi=100, squeeze=False)
    for ax, result in zip(axes[0], results):
        for capability in CAPABILITIES:
            points = [(row["step"], row["accuracy"]) for row in result["rows"] if row["capability"] == capability]
            ax.plot([s for s, _ in points], [a for _, a in points], marker=".", label=capability)
        ax.set_title(result["name"])
        ax.set_xlabel("SFT steps")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("greedy held-out accuracy")
    axes[0][-1].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_curves(results: list[dict[str, Any]]) -> None:
    table = Table(title="greedy held-out accuracy per capability (levels of each recipe)")
    for column in ("recipe", "step", *CAPABILITIES):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for result in results:
        for step in sorted({row["step"] for row in result["rows"]}):
            accuracy = {row["capability"]: row["accuracy"] for row in result["rows"] if row["step"] == step}
            table.add_row(result["name"], str(step), *(f"{accuracy.get(c, float('nan')):.2f}" for c in CAPABILITIES))
    Console(stderr=True).print(table)


def final_accuracy(rows: list[dict], recipe: str, steps: int) -> dict[str, float]:
    """A recipe's greedy accuracy per capability at its last step."""
    return {row["capability"]: row["accuracy"] for row in rows if row["recipe"] == recipe and row["step"] == steps}


def markdown(curves: dict[str, Any]) -> str:
    """The README's table of a ``warmup_curves.json``: each recipe's image dependence and final accuracies.

    >>> print(markdown({"recipes": {"a": {"config": {"steps": 2}, "image_dependence": 0.5}},
    ...                 "rows": [{"recipe": "a", "step": 2, "capability": "color", "accuracy": 0.25, "items": 4}]}))
    | recipe | image dependence | color |
    |---|---|---|
    | `a` | 0.5 | 0.25 |
    """
    capabilities = [c for c in CAPABILITIES if any(row["capability"] == c for row in curves["rows"])]
    lines = ["| " + " | ".join(["recipe", "image dependence", *capabilities]) + " |",
             "|" + "---|" * (len(capabilities) + 2)]
    for name, recipe in curves["recipes"].items():
        final = final_accuracy(curves["rows"], name, recipe["config"]["steps"])
        cells = [f"`{name}`", f"{recipe['image_dependence']:.2g}", *(f"{final[c]:.2f}" for c in capabilities)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", default=None,
                        help=f"A name ({', '.join(RECIPES)}) or a JSON recipe (repeat; default: default).")
    parser.add_argument("--steps", type=int, default=None, help="Override every recipe's steps.")
    parser.add_argument("--every", type=int, default=500, help="Measure every this many steps.")
    parser.add_argument("--per-capability", type=int, default=40, help="Held-out items per capability.")
    parser.add_argument("--out", type=Path, default=Path("runs/warmup"))
    add_markdown_option(parser, "warmup_curves.json")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        return print_markdown(args.markdown, markdown)
    recipes = {spec if spec in RECIPES else f"recipe{index}": RECIPES[spec] if spec in RECIPES else json.loads(spec)
               for index, spec in enumerate(args.recipe or ["default"])}
    with ProcessPoolExecutor(max_workers=len(recipes)) as pool:
        futures = [pool.submit(learning_curve, name, overrides, args.steps, args.every, args.per_capability)
                   for name, overrides in recipes.items()]
        results = [future.result() for future in futures]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for result in results for row in result["rows"]]
    recipes_out = {r["name"]: {k: r[k] for k in ("config", "seconds", "final_loss", "image_dependence")}
                   for r in results}
    (args.out / "warmup_curves.json").write_text(json.dumps({"recipes": recipes_out, "rows": rows}, indent=1))
    plot(results, args.out / "warmup_curves.png")
    print_curves(results)
    summary = {"out": str(args.out), "recipes": {r["name"]: {
        "seconds": r["seconds"], "image_dependence": r["image_dependence"],
        "final": final_accuracy(r["rows"], r["name"], r["config"]["steps"])} for r in results}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
