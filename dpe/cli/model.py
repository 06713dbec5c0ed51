"""`dpe model`: build the tiny policy, warm it up by SFT on the synthetic world, probe its accuracy."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from dpe.policy.config import Family, TinyVLMConfig, WarmupConfig

console = Console()

FAMILIES = list(Family.__args__)
RECIPE_DEFAULTS = WarmupConfig()


def _parse_mix(value: str | None) -> dict[str, float] | None:
    """'color=3,counting=1' -> {'color': 3.0, 'counting': 1.0}."""
    if not value:
        return None
    mix = {}
    for part in value.split(","):
        name, _, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise click.BadParameter(f"expected capability=weight, got {part!r}", param_hint="--mix") from None
    return mix


def _parse_levels(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(level) for level in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected levels such as 1,2,3, got {value!r}", param_hint="--levels") from None


def _config(model_fields: dict[str, Any], warmup_fields: dict[str, Any]) -> WarmupConfig:
    try:
        model = TinyVLMConfig(**{k: v for k, v in model_fields.items() if v is not None})
        return WarmupConfig(model=model, **{k: v for k, v in warmup_fields.items() if v is not None})
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from None


def _print_accuracy(table: dict[str, dict[str, float]], title: str) -> None:
    view = Table(title=title)
    for column in ("capability", "items", "greedy", "sampled", "pass@k", "format"):
        view.add_column(column, justify="left" if column == "capability" else "right")
    for capability, row in table.items():
        view.add_row(
            capability,
            f"{row['items']:.0f}",
            f"{row['greedy']:.2f}",
            f"{row['sampled']:.2f}",
            f"{row['pass_at_k']:.2f}",
            f"{row['format']:.2f}",
        )
    console.print(view)


def _probe(policy: Any, items: int, samples: int, levels: tuple[int, ...] | None, seed: int) -> None:
    from dpe.policy.accuracy import image_dependence, measure_accuracy
    from dpe.world import DIFFICULTY_LEVELS, diagnostic_sample

    held_out = diagnostic_sample(round=0, n=items, seed=seed, levels=levels or DIFFICULTY_LEVELS)
    started = time.perf_counter()
    table = measure_accuracy(policy, held_out, num_samples=samples)
    _print_accuracy(table, f"held-out accuracy, {items} diagnostic items ({time.perf_counter() - started:.1f} s)")
    console.print(f"the answers' dependence on the image: {image_dependence(policy, held_out):.3f} "
                  "(0: the same answers whatever the image)")


@click.group("model")
def model() -> None:
    """Build, warm up and probe the policy model (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@model.command("init-tiny")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the checkpoint to.")
@click.option("--family", type=click.Choice(FAMILIES), default=None, help="Qwen family (default qwen2_vl).")
@click.option("--image-size", type=int, default=None, help="Image side in pixels (default 64: 16 image tokens).")
@click.option("--hidden-size", type=int, default=None, help="Text hidden size (default 128).")
@click.option("--layers", "num_layers", type=int, default=None, help="Text layers (default 2).")
@click.option("--vocab-size", type=int, default=None, help="BPE vocabulary target (default 1024).")
@click.option("--seed", type=int, default=None, help="Initialisation seed (default 0).")
def init_tiny(output: Path, **fields: Any) -> None:
    """Write a random-initialised tiny Qwen-family VLM with a locally trained tokenizer."""
    from dpe.policy.model import build_tiny_policy

    config = _config(fields, {}).model
    policy = build_tiny_policy(config)
    policy.save(output, extra_files={"tiny_config.json": config.model_dump_json(indent=2)})
    console.print(
        f"wrote {output}: {config.family}, {policy.num_parameters():,} parameters, "
        f"vocabulary {len(policy.tokenizer)}, {config.tokens_per_image} tokens per image"
    )


@model.command("sft")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Copy the warmed model here (it is always cached).")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Fine-tune this local checkpoint instead of a fresh tiny model (not cached; needs --output).")
@click.option("--steps", type=int, default=None, help=f"Optimizer steps (default {RECIPE_DEFAULTS.steps}).")
@click.option("--batch-size", type=int, default=None, help=f"Items per step (default {RECIPE_DEFAULTS.batch_size}).")
@click.option("--lr", "learning_rate", type=float, default=None,
              help=f"Peak learning rate (default {RECIPE_DEFAULTS.learning_rate:g}).")
@click.option("--mix", default=None, help="Capability weights, e.g. color=0.5,counting=0.1 (default: skewed).")
@click.option("--levels", default=None, help="Difficulty levels to train on, e.g. 1,2 (default "
              f"{','.join(map(str, RECIPE_DEFAULTS.levels))}).")
@click.option("--family", type=click.Choice(FAMILIES), default=None, help="Qwen family of the tiny model.")
@click.option("--seed", type=int, default=None, help="Data and initialisation seed (default 0).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model cache (default $DPE_MODEL_CACHE or ~/.cache/dpe/models).")
@click.option("--eval-items", type=int, default=0, show_default=True,
              help="Afterwards, probe per-capability accuracy on this many held-out diagnostic items.")
@click.option("--eval-samples", type=int, default=9, show_default=True, help="Samples per item (T=1.0) in the probe.")
@click.option("--eval-levels", default=None,
              help="Difficulty levels of the probe items, e.g. 1,2,3 (default: those trained on).")
def sft(
    output: Path | None,
    base: Path | None,
    steps: int | None,
    batch_size: int | None,
    learning_rate: float | None,
    mix: str | None,
    levels: str | None,
    family: str | None,
    seed: int | None,
    cache_dir: Path | None,
    eval_items: int,
    eval_samples: int,
    eval_levels: str | None,
) -> None:
    """Warm up the tiny policy by SFT on a skewed capability mix (cached by recipe)."""
    config = _config(
        {"family": family, "seed": seed},
        {
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "mix": _parse_mix(mix),
            "levels": _parse_levels(levels),
            "seed": seed,
        },
    )
    if base is not None:
        policy = _fine_tune(base, output, config)
    else:
        from dpe.policy.warmup import RECIPE_FILE, recorded_heldout, warm_up

        result = warm_up(config, cache_dir=cache_dir)
        origin = "loaded from cache" if result.from_cache else "trained"
        console.print(f"{origin} in {result.seconds:.1f} s: {result.folder}")
        recorded = recorded_heldout(result.folder)
        if recorded:
            _print_accuracy(recorded, f"base held-out accuracy, as {RECIPE_FILE} records it")
        policy = result.policy
        if output is not None:
            shutil.copytree(result.folder, output, dirs_exist_ok=True)
            console.print(f"copied to {output}")
    if eval_items:
        _probe(policy, eval_items, eval_samples, _parse_levels(eval_levels) or config.levels, config.seed)


def _fine_tune(base: Path, output: Path | None, config: WarmupConfig) -> Any:
    from dpe.policy.model import load_policy
    from dpe.policy.warmup import train_on_recipe

    if output is None:
        raise click.UsageError("--base needs --output")
    policy = load_policy(base)
    train_on_recipe(policy, config)
    policy.save(output)
    console.print(f"fine-tuned {base} for {config.steps} steps: {output}")
    return policy


@model.command("accuracy")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--items", type=int, default=140, show_default=True, help="Held-out diagnostic items.")
@click.option("--samples", type=int, default=9, show_default=True, help="Samples per item at T=1.0.")
@click.option("--levels", default=None, help="Difficulty levels, e.g. 1,2,3 (default: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Diagnostic sample seed.")
def accuracy(checkpoint: Path, items: int, samples: int, levels: str | None, seed: int) -> None:
    """Per-capability greedy and sampled accuracy of a checkpoint on held-out diagnostic items."""
    from dpe.policy.model import load_policy

    _probe(load_policy(checkpoint), items, samples, _parse_levels(levels), seed)


@model.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (replaced whole, never left half-written).")
@click.option("--merged", is_flag=True,
              help="Merge a LoRA adapter checkpoint into its base (required for one: a full model folder any "
              "transformers or vLLM loads).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Precision of the written weights (auto: float32 for a tiny model, else half).")
def export(checkpoint: Path, output: Path, merged: bool, dtype: str) -> None:
    """Write a checkpoint's model alone (weights, config, processor; no optimiser or DeepSpeed state)."""
    from dpe.config import PlacementSettings
    from dpe.policy.model import load_policy
    from dpe.policy.weights import adapter_base

    base = adapter_base(checkpoint)
    if base is not None and not merged:
        raise click.UsageError(f"{checkpoint} is a LoRA adapter on {base}: export it with --merged")
    load_policy(checkpoint, PlacementSettings(device="cpu", dtype=dtype)).save(output)
    console.print(f"exported {checkpoint}{f' merged into {base}' if base else ''}: {output}")
