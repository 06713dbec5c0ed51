"""Configuration of the policy layer: the tiny model's shape and the SFT warm-up recipe.

Example:
    >>> TinyVLMConfig().tokens_per_image
    16
    >>> WarmupConfig(mix={"color": 3, "counting": 1}).normalized_mix()
    {'color': 0.75, 'counting': 0.25}
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dpe.world import CAPABILITIES, DIFFICULTY_LEVELS

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

DEFAULT_MIX: dict[str, float] = {
    "color": 0.35,
    "existence": 0.35,
    "counting": 0.10,
    "spatial": 0.05,
    "chart": 0.05,
    "text_reading": 0.05,
    "arithmetic": 0.05,
}
"""Deliberately skewed: mostly the questions a colour answers, on which the tiny model learns to look at its image;
little of the rest, which stay weak but not blind (some sampled answers right)."""
DEFAULT_LEVELS: tuple[int, ...] = (1,)
"""The difficulty levels the default base is trained on, and the synthetic suites grade by default."""


class TinyVLMConfig(BaseModel):
    """Shape of a tiny random-initialised Qwen-family VLM and of its tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family = "qwen2_vl"
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(256, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    vision_dim: int = Field(64, ge=16)
    vision_depth: int = Field(2, ge=1)
    vision_heads: int = Field(4, ge=1)
    patch_size: int = Field(8, ge=2)
    merge_size: int = Field(2, ge=1)
    image_size: int = Field(64, ge=16, description="Images are resized to at most this many pixels a side.")
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary target, special tokens included.")
    corpus_items: int = Field(200, ge=1, description="Questions per capability in the tokenizer corpus.")
    seed: int = 0

    @model_validator(mode="after")
    def _divisible(self) -> "TinyVLMConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if self.vision_dim % self.vision_heads:
            raise ValueError("vision_dim must divide by vision_heads")
        if self.image_size % (self.patch_size * self.merge_size):
            raise ValueError("image_size must be a multiple of patch_size * merge_size")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("the text head dimension must be a multiple of 4 (multimodal rope sections)")
        return self

    @property
    def tokens_per_image(self) -> int:
        """Image tokens the language model sees for a full-size image."""
        return (self.image_size // (self.patch_size * self.merge_size)) ** 2


class WarmupConfig(BaseModel):
    """The SFT warm-up recipe. Its hash names the cached warmed model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: TinyVLMConfig = Field(default_factory=TinyVLMConfig)
    mix: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MIX))
    levels: tuple[int, ...] = Field(DEFAULT_LEVELS, description="Difficulty levels trained on (and measured on).")
    steps: int = Field(4000, ge=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(25, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = Field(0, ge=0)
    threads: int = Field(
        1,
        ge=0,
        description="Torch threads the SFT runs on (0: torch's default). The floating-point path, and with it which "
        "capabilities the tiny model ends up strong in, depends on it: with a fixed number the recipe makes the same "
        "model on every machine of a kind (two threads made different bases in different runs).",
    )
    centre_image_tokens: bool = Field(
        True,
        description="Train with centred image tokens (`dpe.policy.image_tokens`), without which the tiny model's "
        "answers ignore the image.",
    )

    @field_validator("mix")
    @classmethod
    def _known_capabilities(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = set(mix) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown capabilities in mix: {sorted(unknown)}; known: {CAPABILITIES}")
        if any(weight < 0 for weight in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError("mix weights must be non-negative with a positive sum")
        return mix

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, levels: tuple[int, ...]) -> tuple[int, ...]:
        if not levels or set(levels) - set(DIFFICULTY_LEVELS):
            raise ValueError(f"levels must be a non-empty subset of {DIFFICULTY_LEVELS}")
        return levels

    def normalized_mix(self) -> dict[str, float]:
        """The mix as shares summing to 1, zero weights dropped."""
        total = sum(self.mix.values())
        return {name: weight / total for name, weight in self.mix.items() if weight > 0}

    def recipe_hash(self, version: str) -> str:
        """A short hash of this recipe and the code `version` that produced it."""
        recipe = {"version": version, **self.model_dump(mode="json")}
        recipe["mix"] = dict(sorted(self.normalized_mix().items()))
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
