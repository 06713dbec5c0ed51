"""A Qwen-style tokenizer trained in-process: byte-level BPE over the world's questions and answers.

Nothing is downloaded. Digits are split one per token (as Qwen does), the Qwen special tokens are
added, and the chat template follows Qwen's layout (``<|im_start|>role ... <|im_end|>`` with
``<|vision_start|><|image_pad|><|vision_end|>`` for each image), without a default system turn.

Example:
    >>> tokenizer = train_tokenizer(world_corpus(50), vocab_size=400)
    >>> tokenizer.eos_token, tokenizer.pad_token
    ('<|im_end|>', '<|endoftext|>')
    >>> tokenizer.decode(tokenizer("What is 12+7?").input_ids)
    'What is 12+7?'
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dpe.policy.prompts import INSTRUCTIONS, boxed, format_question
from dpe.world import (
    CAPABILITIES,
    DIFFICULTY_LEVELS,
    SCENE_KIND_OF,
    QuestionNotPossible,
    generate_scene,
    write_question,
)
from dpe.world.palette import COLORS, SHAPES, WORDS
from dpe.world.seeds import derive_seed

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2-VL's special tokens, in Qwen's order."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)
"""Qwen-style chat template; images become ``<|vision_start|><|image_pad|><|vision_end|>``."""


def world_corpus(items_per_capability: int, seed: int = 0) -> list[str]:
    """Texts for tokenizer training: formatted questions and boxed answers from every capability
    and level, plus the world's vocabulary, numbers and the chat roles."""
    rng = random.Random(seed)
    texts = ["system", "user", "assistant", *INSTRUCTIONS.values(), *WORDS, *COLORS, *SHAPES]
    texts += [boxed(str(number)) for number in range(-100, 1001)]
    for capability in CAPABILITIES:
        for index in range(items_per_capability):
            scene_seed = derive_seed("training", f"tokenizer/{seed}/{capability}/{index}")
            level = rng.choice(DIFFICULTY_LEVELS)
            scene = generate_scene(SCENE_KIND_OF[capability], level, scene_seed)
            try:
                question = write_question(scene, capability, index)
            except QuestionNotPossible:
                continue
            texts.append(format_question(question.question, question.answer_type, question.options))
            texts.append(boxed(question.answer))
    return texts


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` and wrap it with Qwen's special tokens and chat template."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
