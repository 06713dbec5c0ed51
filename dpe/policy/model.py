"""The policy: a Qwen-family VLM with its processor, built tiny from a config or loaded from a folder.

Nothing is downloaded: `build_tiny_policy` trains its tokenizer in-process and initialises the
weights randomly; `load_policy` reads a local checkpoint folder only, and its weights from
safetensors only (pickled weights can run code as they load). `Policy.save` writes safetensors.

Example:
    >>> policy = build_tiny_policy(TinyVLMConfig(corpus_items=5))
    >>> policy.model.config.model_type, policy.num_parameters() < 1_000_000
    ('qwen2_vl', True)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from dpe.config import PlacementSettings
from dpe.policy.config import Family, TinyVLMConfig
from dpe.policy.placement import resolve_placement
from dpe.policy.processor import PROCESSOR_CLASSES, load_processor
from dpe.policy.tokenizer import CHAT_TEMPLATE, train_tokenizer, world_corpus
from dpe.policy.weights import adapter_base, refuse_pickled_weights

VISION_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Tokens the policy must never generate: sampling one breaks the next forward pass."""

@dataclass
class Policy:
    """A vision-language model and the processor that feeds it."""

    model: PreTrainedModel
    processor: ProcessorMixin

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.processor.tokenizer

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    def save(self, folder: str | Path, extra_files: Mapping[str, str] | None = None) -> Path:
        """Write model, processor and `extra_files` (name -> text) to `folder`, all at once.

        Everything goes to a temporary sibling first, which then replaces `folder`.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.model.save_pretrained(staging)
            self.processor.save_pretrained(staging)
            for name, text in (extra_files or {}).items():
                (staging / Path(name).name).write_text(text)
            staging.chmod(0o755)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder


def suppressed_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the `VISION_TOKENS` that exist in this tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in VISION_TOKENS if token in vocab]


def build_tiny_policy(config: TinyVLMConfig = TinyVLMConfig()) -> Policy:
    """A random-initialised tiny VLM of `config.family` with a freshly trained tokenizer."""
    tokenizer = train_tokenizer(world_corpus(config.corpus_items, config.seed), config.vocab_size)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=config.patch_size,
        merge_size=config.merge_size,
        temporal_patch_size=2,
        size={"shortest_edge": (config.patch_size * config.merge_size) ** 2, "longest_edge": config.image_size**2},
    )
    return assemble_policy(config.family, _MODEL_CONFIGS[config.family](config, tokenizer), tokenizer,
                           image_processor, seed=config.seed)


def assemble_policy(
    family: Family,
    model_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Qwen2VLImageProcessorPil,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Policy:
    """A random-initialised policy of `family` (weights drawn from `seed`, in `dtype`) with the project's chat template
    and image-only processor around `tokenizer` and `image_processor`, greedy and ending at ``<|im_end|>``."""
    processor = PROCESSOR_CLASSES[family](image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHAT_TEMPLATE)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family]._from_config(model_config, dtype=dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return Policy(model=model.eval(), processor=processor)


def load_policy(folder: str | Path, placement: PlacementSettings = PlacementSettings()) -> Policy:
    """Load a local checkpoint folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL...) with its processor, on the device, in the
    dtype and with the attention kernel `placement` resolves to for it (`dpe.policy.placement`).

    A LoRA adapter checkpoint (`dpe.policy.weights.adapter_base`) loads its base with the adapter merged in. Weights
    come from safetensors only: a folder with pickled weights alone is refused (`dpe.policy.weights.PickledWeights`).
    """
    refuse_pickled_weights(folder)
    base = adapter_base(folder)
    if base is not None:
        refuse_pickled_weights(base)
    weights = base or Path(folder)
    resolved = resolve_placement(placement, weights)
    model = AutoModelForImageTextToText.from_pretrained(
        str(weights), dtype=resolved.dtype, attn_implementation=resolved.attention, local_files_only=True,
        use_safetensors=True,
    )
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder), local_files_only=True).merge_and_unload()
    return Policy(model=model.to(resolved.device).eval(), processor=load_processor(folder))


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The vision token ids a Qwen-family config names, as `tokenizer` numbers them."""
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in ids.items()}


def _text_config(config: TinyVLMConfig, tokenizer: PreTrainedTokenizerBase, mrope_section: list[int]) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }


def _mrope_section(config: TinyVLMConfig, temporal_share: float) -> list[int]:
    half = config.hidden_size // config.num_heads // 2
    temporal = max(1, round(half * temporal_share))
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _qwen2_vl_config(config: TinyVLMConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    return Qwen2VLConfig(
        text_config=_text_config(config, tokenizer, _mrope_section(config, 0.25)),
        vision_config={
            "depth": config.vision_depth,
            "embed_dim": config.vision_dim,
            "hidden_size": config.hidden_size,
            "num_heads": config.vision_heads,
            "mlp_ratio": 2,
            "patch_size": config.patch_size,
            "spatial_merge_size": config.merge_size,
            "temporal_patch_size": 2,
        },
        **special_token_ids(tokenizer),
    )


def _merger_vision_config(config: TinyVLMConfig) -> dict[str, Any]:
    """Vision settings shared by Qwen2.5-VL and Qwen3-VL (both project to the text width with a merger)."""
    return {
        "depth": config.vision_depth,
        "hidden_size": config.vision_dim,
        "intermediate_size": config.vision_dim * 2,
        "num_heads": config.vision_heads,
        "out_hidden_size": config.hidden_size,
        "patch_size": config.patch_size,
        "spatial_merge_size": config.merge_size,
        "temporal_patch_size": 2,
    }


def _qwen2_5_vl_config(config: TinyVLMConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    return Qwen2_5_VLConfig(
        text_config=_text_config(config, tokenizer, _mrope_section(config, 0.25)),
        vision_config=_merger_vision_config(config) | {
            "window_size": config.image_size // 2,
            "fullatt_block_indexes": [config.vision_depth - 1],
        },
        **special_token_ids(tokenizer),
    )


def _qwen3_vl_config(config: TinyVLMConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    text = _text_config(config, tokenizer, _mrope_section(config, 0.375))
    text["head_dim"] = config.hidden_size // config.num_heads
    text["rope_parameters"]["mrope_interleaved"] = True
    grid = config.image_size // config.patch_size
    return Qwen3VLConfig(
        text_config=text,
        vision_config=_merger_vision_config(config) | {
            "num_position_embeddings": grid * grid,
            "deepstack_visual_indexes": [config.vision_depth - 1],
        },
        **special_token_ids(tokenizer),
    )


_MODEL_CONFIGS = {"qwen2_vl": _qwen2_vl_config, "qwen2_5_vl": _qwen2_5_vl_config, "qwen3_vl": _qwen3_vl_config}
_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}
