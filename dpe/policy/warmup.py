"""The warmed base model: a tiny VLM after a short SFT on a deliberately skewed capability mix.

The result is cached by the hash of its recipe (model config, mix, levels, steps, optimiser, seed
and `RECIPE_VERSION`) under the cache folder: ``cache_dir`` argument, else ``$DPE_MODEL_CACHE``,
else ``~/.cache/dpe/models``. A second call with the same recipe loads the cached model; a lock
file makes concurrent first calls train once.

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
from dataclasses import dataclass
from pathlib import Path

from dpe.policy.config import WarmupConfig
from dpe.policy.model import Policy, build_tiny_policy, load_policy
from dpe.policy.sft import train_sft
from dpe.world import training_stream

RECIPE_VERSION = "2"
"""Bump when the world, the tokenizer or the training code change what a recipe produces."""

RECIPE_FILE = "recipe.json"


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
                    description: str = "SFT") -> list[float]:
    """SFT `policy` on the recipe's skewed training stream; returns the per-step losses."""
    return train_sft(
        policy,
        training_stream(config.mix, config.seed, levels=config.levels, image_size=config.model.image_size),
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        show_progress=show_progress,
        description=description,
    )


def warm_up(
    config: WarmupConfig = WarmupConfig(), *, cache_dir: str | Path | None = None, show_progress: bool = True
) -> WarmupResult:
    """The warmed policy of `config`: loaded from the cache, or built, trained and cached."""
    started = time.perf_counter()
    folder = cached_folder(config, cache_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / RECIPE_FILE).exists():
            return WarmupResult(load_policy(folder), folder, True, time.perf_counter() - started)
        policy = build_tiny_policy(config.model)
        losses = train_on_recipe(policy, config, show_progress=show_progress, description="warm-up SFT")
        seconds = time.perf_counter() - started
        recipe = {
            "version": RECIPE_VERSION,
            "config": config.model_dump(mode="json"),
            "seconds": round(seconds, 2),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        }
        policy.save(folder, extra_files={RECIPE_FILE: json.dumps(recipe, indent=2)})
    return WarmupResult(policy, folder, False, seconds)

