"""Real Qwen-VL architectures without their weights: published shapes, random weights, any depth.

A team's checkpoint is a Qwen2.5-VL or Qwen3-VL folder; nothing may be downloaded here, so the code paths such a
folder takes (its processor's patch and merge sizes, its vision tokens, window attention or deepstack, its widths)
are exercised on models built from the published ``config.json`` and ``preprocessor_config.json`` values below,
with random weights and, for tests, a reduced depth. Two things cannot be published shapes: the tokenizer is the
project's own (trained in-process, with Qwen's special tokens and chat template), so the vocabulary is its size and
the vision token ids are its ids; and vision blocks that a reduced depth removes take their special roles with them
(window attention's full-attention blocks and deepstack taps keep the published indexes that still exist, else the
last block).

Example:
    >>> sorted(PUBLISHED)
    ['qwen2.5-vl-3b', 'qwen2.5-vl-7b', 'qwen3-vl-2b', 'qwen3-vl-8b']
    >>> policy = build_published_policy("qwen2.5-vl-3b", text_layers=1, vision_layers=1, device="meta")
    >>> policy.model.config.text_config.hidden_size, policy.model.config.vision_config.hidden_size
    (2048, 1280)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dpe.policy.config import Family
from dpe.policy.model import Policy, assemble_policy, special_token_ids
from dpe.policy.tokenizer import train_tokenizer, world_corpus

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PublishedArchitecture:
    """A released checkpoint's shape: its config.json text and vision parts and its image preprocessing."""

    family: Family
    text: dict[str, Any]
    vision: dict[str, Any]
    patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    reduced_vision_roles: tuple[str, ...] = ()

    @property
    def text_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def vision_layers(self) -> int:
        return int(self.vision["depth"])


def _qwen2_5_vl(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                tied: bool) -> PublishedArchitecture:
    """A Qwen2.5-VL checkpoint: its text widths; every size shares the 32-block window-attention vision tower."""
    return PublishedArchitecture(
        family="qwen2_5_vl",
        text={"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 128000, "hidden_act": "silu",
              "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}},
        vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
                "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
        patch_size=14, min_pixels=3136, max_pixels=12845056,
        reduced_vision_roles=("fullatt_block_indexes",),
    )


def _qwen3_vl(hidden: int, intermediate: int, layers: int, heads: int, tied: bool,
              vision: dict[str, Any]) -> PublishedArchitecture:
    """A Qwen3-VL checkpoint: its text widths and its vision tower (`vision`: depth, widths, deepstack taps)."""
    return PublishedArchitecture(
        family="qwen3_vl",
        text={"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": tied,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "hidden_act": "silu", "attention_bias": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                  "mrope_interleaved": True}},
        vision=vision | {"num_heads": 16, "out_hidden_size": hidden, "hidden_act": "gelu_pytorch_tanh",
                         "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                         "num_position_embeddings": 2304},
        patch_size=16, min_pixels=65536, max_pixels=16777216, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        reduced_vision_roles=("deepstack_visual_indexes",),
    )


PUBLISHED: dict[str, PublishedArchitecture] = {
    "qwen2.5-vl-3b": _qwen2_5_vl(2048, 11008, 36, 16, 2, tied=True),
    "qwen2.5-vl-7b": _qwen2_5_vl(3584, 18944, 28, 28, 4, tied=False),
    "qwen3-vl-2b": _qwen3_vl(2048, 6144, 28, 16, tied=True, vision={
        "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "deepstack_visual_indexes": [5, 11, 17]}),
    "qwen3-vl-8b": _qwen3_vl(4096, 12288, 36, 32, tied=False, vision={
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "deepstack_visual_indexes": [8, 16, 24]}),
}
"""Shapes of released Qwen-VL checkpoints (their ``config.json`` and ``preprocessor_config.json``)."""

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}


def published_config(name: str, *, text_layers: int | None = None, vision_layers: int | None = None,
                     tokenizer: Any) -> PretrainedConfig:
    """The model config of `PUBLISHED[name]` at the given depths (None: the published depth), with `tokenizer`'s
    vocabulary and special token ids."""
    architecture = _architecture(name)
    depth = architecture.vision_layers if vision_layers is None else vision_layers
    vision = architecture.vision | {"depth": depth}
    for role in architecture.reduced_vision_roles:
        vision[role] = [index for index in vision[role] if index < depth] or [depth - 1]
    text = architecture.text | {
        "num_hidden_layers": architecture.text_layers if text_layers is None else text_layers,
        "vocab_size": len(tokenizer),
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    return _CONFIG_CLASSES[architecture.family](
        text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
        **special_token_ids(tokenizer),
    )


def build_published_policy(
    name: str,
    *,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    seed: int = 0,
    corpus_items: int = 20,
) -> Policy:
    """A random-weight policy of the released architecture `name` (see `PUBLISHED`) at the given depths, with the
    project's tokenizer and the checkpoint's own image preprocessing; ``device="meta"`` builds shapes only."""
    architecture = _architecture(name)
    tokenizer = train_tokenizer(world_corpus(corpus_items, seed))
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=architecture.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": architecture.min_pixels, "longest_edge": architecture.max_pixels},
        image_mean=list(architecture.image_mean),
        image_std=list(architecture.image_std),
    )
    config = published_config(name, text_layers=text_layers, vision_layers=vision_layers, tokenizer=tokenizer)
    with torch.device(device):
        return assemble_policy(architecture.family, config, tokenizer, image_processor, seed=seed, dtype=dtype)


def _architecture(name: str) -> PublishedArchitecture:
    if name not in PUBLISHED:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(PUBLISHED)}")
    return PUBLISHED[name]
