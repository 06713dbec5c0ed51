"""The warmed base model: a tiny VLM after a short SFT on a deliberately skewed capability mix.

The result is cached by the hash of its recipe (model config, mix, levels, steps, optimiser, seed
and `RECIPE_VERSION`) under the cache folder: ``cache_dir`` argument, else ``$DPE_MODEL_CACHE``,
else ``~/.cache/dpe/models``. A second call with the same recipe loads the cached model; a lock
file makes concurrent first calls train once. Its ``recipe.json`` also records the base's accuracy
per capability on the held-out suite that the evaluator and `dpe experiment` grade on by default
(`base_heldout_items`).

Example:
    >>> folder = cached_folder(WarmupConfig(steps=10), cache_dir="/tmp/models")
    >>> folder.parent.as_posix(), folder.name.startswith("qwen2_vl-")
    ('/tmp/models', True)
    >>> folder == cached_folder(WarmupConfig(steps=11), cache_dir="/tmp/models")
    False
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpe.policy.accuracy import image_dependence, measure_accuracy
from dpe.policy.config import WarmupConfig
from dpe.policy.model import Policy, build_tiny_policy, load_policy
from dpe.policy.sft import train_sft
from dpe.policy.threads import torch_threads
from dpe.world import CAPABILITIES, WorldItem, diagnostic_sample, training_stream

RECIPE_VERSION = "2"
"""Bump when the world, the tokenizer or the training code change what a recipe produces."""

RECIPE_FILE = "recipe.json"
HELDOUT_PER_CAPABILITY = 100
"""Held-out items per capability the base is measured on (`dpe experiment`'s default suite)."""
HELDOUT_SAMPLES = 4
"""Sampled completions per held-out item (temperature 1) for the pass rate: are some rollouts solved?"""


@dataclass(frozen=True)
class WarmupResult:
    """The warmed policy, where it is cached, and whether this call trained it."""

    policy: Policy
    folder: Path
    from_cache: bool
    seconds: float


def default_cache_dir() -> Path:
    """``$DPE_MODEL_CACHE`` if set, else ``~/.cache/dpe/models``."""
    return Path(os.environ.get("DPE_MODEL_CACHE") or Path.home() / ".cache" / "dpe" / "models")


def cached_folder(config: WarmupConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the model of this recipe is (or will be) cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{config.model.family}-{config.recipe_hash(RECIPE_VERSION)}"


def train_on_recipe(policy: Policy, config: WarmupConfig, *, show_progress: bool = True,
                    description: str = "SFT", examples: Iterable[WorldItem] | None = None) -> list[float]:
    """SFT `policy` as the recipe says, on its `threads`, on `examples` (default: the recipe's skewed training
    stream); returns the per-step losses."""
    with torch_threads(config.threads):
        return train_sft(
            policy,
            examples if examples is not None else recipe_stream(config),
            steps=config.steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            centre_image_tokens=config.centre_image_tokens,
            show_progress=show_progress,
            description=description,
        )


def recipe_stream(config: WarmupConfig) -> Iterator[WorldItem]:
    """The recipe's endless training stream: its mix, at its levels, from its seed."""
    return training_stream(config.mix, config.seed, levels=config.levels, image_size=config.model.image_size)


def base_heldout_items(config: WarmupConfig) -> list[WorldItem]:
    """The first `HELDOUT_PER_CAPABILITY` items of each capability in the diagnostic pool (seed 0) at the recipe's
    levels: the evaluator's held-out suite for that many items per capability at those levels."""
    return diagnostic_sample(0, HELDOUT_PER_CAPABILITY * len(CAPABILITIES), seed=0, levels=config.levels,
                             image_size=config.model.image_size)


def heldout_accuracy(policy: Policy, config: WarmupConfig) -> dict[str, dict[str, float]]:
    """Per capability: greedy accuracy, sampled pass rate, pass@k and format rate on `base_heldout_items`."""
    table = measure_accuracy(policy, base_heldout_items(config), num_samples=HELDOUT_SAMPLES)
    return {capability: {name: round(value, 4) for name, value in row.items()} for capability, row in table.items()}


def base_measurements(policy: Policy, config: WarmupConfig) -> dict[str, Any]:
    """What ``recipe.json`` records about a warmed base: its `heldout_accuracy`, and the `image_dependence` of its
    answers on an eighth of those items (spread over the capabilities; near 0 means the base ignores the image)."""
    spread = base_heldout_items(config)[:: HELDOUT_PER_CAPABILITY // 8]
    return {"heldout": heldout_accuracy(policy, config), "image_dependence": image_dependence(policy, spread)}


def recorded_heldout(folder: Path) -> dict[str, dict[str, float]] | None:
    """The held-out accuracy table a warmed model's ``recipe.json`` records (None for models cached before it did)."""
    return json.loads((folder / RECIPE_FILE).read_text()).get("heldout")


def warm_up(
    config: WarmupConfig = WarmupConfig(), *, cache_dir: str | Path | None = None, show_progress: bool = True,
    measure_heldout: bool = True,
) -> WarmupResult:
    """The warmed policy of `config`: loaded from the cache, or built, trained and cached.

    Its `base_measurements` are recorded in ``recipe.json`` (measured once, also for a model cached before the
    recipe recorded it) unless `measure_heldout` is off (a throwaway model in a test).
    """
    started = time.perf_counter()
    folder = cached_folder(config, cache_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / RECIPE_FILE).exists():
            policy = load_policy(folder)
            if measure_heldout and recorded_heldout(folder) is None:
                _record(folder, json.loads((folder / RECIPE_FILE).read_text()) | base_measurements(policy, config))
            return WarmupResult(policy, folder, True, time.perf_counter() - started)
        policy = build_tiny_policy(config.model)
        losses = train_on_recipe(policy, config, show_progress=show_progress, description="warm-up SFT")
        seconds = time.perf_counter() - started
        recipe = {
            "version": RECIPE_VERSION,
            "config": config.model_dump(mode="json"),
            "seconds": round(seconds, 2),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            **(base_measurements(policy, config) if measure_heldout else {}),
        }
        policy.save(folder, extra_files={RECIPE_FILE: json.dumps(recipe, indent=2)})
    return WarmupResult(policy, folder, False, seconds)


def _record(folder: Path, recipe: dict) -> None:
    """Replace ``recipe.json`` atomically."""
    staged = folder / f".{RECIPE_FILE}.tmp"
    staged.write_text(json.dumps(recipe, indent=2))
    os.replace(staged, folder / RECIPE_FILE)

