"""Supervised fine-tuning on labeled items: the loss is on the boxed answer only.

Works on any `Policy` and any items that carry an image, a question and its answer (a
`dpe.world.WorldItem`, for instance). Used for the warm-up that gives the base model its blind spots.

Example:
    >>> from dpe.policy.config import TinyVLMConfig
    >>> from dpe.policy.model import build_tiny_policy
    >>> from dpe.world import make_item
    >>> policy = build_tiny_policy(TinyVLMConfig(corpus_items=5))
    >>> batch = sft_batch(policy, [make_item("color", 1, 0)])
    >>> policy.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    '\\\\boxed{C}<|im_end|>'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from itertools import islice
from typing import Protocol

import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import BatchFeature

from dpe.events import AnswerType
from dpe.policy.image_tokens import centred_image_tokens
from dpe.policy.model import Policy
from dpe.policy.prompts import boxed, build_messages

IGNORE_INDEX = -100


class LabeledExample(Protocol):
    """What SFT needs from an item."""

    image: Image.Image
    question: str
    answer: str
    answer_type: AnswerType
    options: Sequence[str] | None


def sft_batch(policy: Policy, examples: Sequence[LabeledExample]) -> BatchFeature:
    """Model inputs for a batch with `labels` set on the assistant's answer and its end token only."""
    processor = policy.processor
    texts = [
        processor.apply_chat_template(
            build_messages(example.question, example.answer_type, example.options)
            + [{"role": "assistant", "content": boxed(example.answer)}],
            tokenize=False,
        )
        for example in examples
    ]
    images = [example.image for example in examples]
    batch = processor(images=images, text=texts, padding=True, padding_side="right", return_tensors="pt")
    batch["labels"] = _answer_labels(batch["input_ids"], policy)
    return batch


def _answer_labels(input_ids: torch.Tensor, policy: Policy) -> torch.Tensor:
    tokenizer = policy.tokenizer
    turn_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = len(tokenizer("assistant\n", add_special_tokens=False).input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, ids in enumerate(input_ids):
        first = int((ids == turn_start).nonzero()[-1]) + 1 + header
        last = int((ids == turn_end).nonzero()[-1])
        labels[row, first : last + 1] = ids[first : last + 1]
    return labels


def train_sft(
    policy: Policy,
    examples: Iterable[LabeledExample],
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    warmup_steps: int = 25,
    weight_decay: float = 0.01,
    centre_image_tokens: bool = False,
    show_progress: bool = True,
    description: str = "SFT",
) -> list[float]:
    """Train for `steps` batches drawn from `examples` (AdamW, linear warm-up, cosine decay to 10%).

    With `centre_image_tokens` the model trains under `dpe.policy.image_tokens.centred_image_tokens`.
    Returns the loss of every step. The model is left in eval mode.
    """
    model = policy.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup_steps))
    batches = _batches(iter(examples), batch_size)
    losses: list[float] = []
    model.train()
    with _progress(show_progress) as progress, centred_image_tokens(model) if centre_image_tokens else nullcontext():
        task = progress.add_task(description, total=steps, loss=float("nan"))
        for step in range(steps):
            batch = next(batches, None)
            if batch is None:
                raise ValueError(f"examples ran out after {step} of {steps} steps")
            loss = model(**sft_batch(policy, batch)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(task, advance=1, loss=sum(losses[-20:]) / len(losses[-20:]))
    model.eval()
    return losses


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(examples: Iterator[LabeledExample], size: int) -> Iterator[list[LabeledExample]]:
    while batch := list(islice(examples, size)):
        yield batch


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
