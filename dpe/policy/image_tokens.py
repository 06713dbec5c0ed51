"""Image tokens centred while the tiny model learns, so that its answers come to depend on the image.

Trained plainly, the tiny model's vision merger learns to hand the language model one large constant
vector per image token: after the language model's first norm the part that differs from image to
image is about 1 % of each token, and the answers do not depend on the image at all (swapping the
images of a batch changed no answer probability in the third decimal). While
`centred_image_tokens` is active, every forward pass in training mode takes the batch mean out of
the merger's output, so no gradient can build that constant, and keeps a running mean of it; on
exit the running mean is folded into the merger's last bias. The model that is saved is a plain
checkpoint of its family whose image tokens come out centred without any hook.

Example:
    >>> from dpe.policy.config import TinyVLMConfig
    >>> from dpe.policy.model import build_tiny_policy
    >>> from dpe.policy.sft import sft_batch
    >>> from dpe.world import make_item
    >>> policy = build_tiny_policy(TinyVLMConfig(corpus_items=5))
    >>> batch = sft_batch(policy, [make_item("color", 1, 0), make_item("counting", 1, 1)])
    >>> bool(image_tokens(policy.model, batch).mean(0).abs().max() > 1e-3)
    True
    >>> with centred_image_tokens(policy.model):
    ...     _ = policy.model.train()(**batch)
    >>> bool(image_tokens(policy.model.eval(), batch).mean(0).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def merger_output_layer(model: nn.Module) -> nn.Linear:
    """The last linear layer of a Qwen-family vision merger: the one whose output the language model reads."""
    layers = [module for module in model.model.visual.merger.modules() if isinstance(module, nn.Linear)]
    if not layers or layers[-1].bias is None:
        raise ValueError(f"{type(model).__name__}'s vision merger has no last linear layer with a bias to centre")
    return layers[-1]


def image_tokens(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The image tokens the language model reads for a processed batch: one row per token, all images together."""
    with torch.no_grad():
        return model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output


@contextmanager
def centred_image_tokens(model: nn.Module, momentum: float = 0.05) -> Iterator[None]:
    """Centre the merger's output on every training forward pass; fold the running mean into its bias on exit."""
    layer = merger_output_layer(model)
    running: list[torch.Tensor] = []

    def centre(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        mean = output.mean(0)
        running[:] = [mean.detach() if not running else (1 - momentum) * running[0] + momentum * mean.detach()]
        return output - mean

    handle = model.model.visual.merger.register_forward_hook(centre)
    try:
        yield
    finally:
        handle.remove()
        if running:
            with torch.no_grad():
                layer.bias -= running[0]
