"""Qwen-family processors that need no video processor (torchvision cannot be used here).

The stock Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors require a video processor, which requires
torchvision. These subclasses take only an image processor (the PIL backend) and a tokenizer, and
save and load like any processor. `AutoProcessor.from_pretrained` cannot resolve them and silently
returns a bare tokenizer, so `load_processor` picks the class from the checkpoint's model type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

from dpe.policy.weights import adapter_base


class _ImageOnly:
    """Mixin: the processor's sub-processors are the image processor and the tokenizer only."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


class Qwen2VLNoVideoProcessor(_ImageOnly, Qwen2VLProcessor):
    """Qwen2-VL processor for images and text."""


class Qwen2_5_VLNoVideoProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text."""


class Qwen3VLNoVideoProcessor(_ImageOnly, Qwen3VLProcessor):
    """Qwen3-VL processor for images and text."""


PROCESSOR_CLASSES: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLNoVideoProcessor,
    "qwen2_5_vl": Qwen2_5_VLNoVideoProcessor,
    "qwen3_vl": Qwen3VLNoVideoProcessor,
    "qwen3_vl_moe": Qwen3VLNoVideoProcessor,
}
"""Image-only processor class by the checkpoint's `model_type`."""


def model_type_of(folder: str | Path) -> str:
    """The `model_type` in a checkpoint folder's config.json (an adapter checkpoint's base's)."""
    config = json.loads(((adapter_base(folder) or Path(folder)) / "config.json").read_text())
    return str(config.get("model_type", ""))


def load_processor(folder: str | Path) -> ProcessorMixin:
    """The processor of a local checkpoint folder, built explicitly for Qwen-family models.

    Other model types go through `AutoProcessor`; a result without an image processor (a bare
    tokenizer) is refused rather than returned.
    """
    model_type = model_type_of(folder)
    if model_type in PROCESSOR_CLASSES:
        return PROCESSOR_CLASSES[model_type].from_pretrained(str(folder), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"{folder} ({model_type or 'unknown model type'}) has no image processor; "
            f"supported without one: {sorted(PROCESSOR_CLASSES)}"
        )
    return processor
