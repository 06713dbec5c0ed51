"""The released Qwen2.5-VL and Qwen3-VL architectures, built from their published configs with random weights.

Full depth is built on the meta device (shapes only) and checked against the parameter counts the model cards
publish; reduced depth is built for real and run through the paths a team's checkpoint takes: processor, chat
template, vision tokens, generation, save and load, and the trainer's preset and placement choices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpe.config import TINY_MAX_PARAMETERS
from dpe.policy.architectures import PUBLISHED, build_published_policy
from dpe.policy.generation import SamplingParams, generate
from dpe.policy.model import load_policy
from dpe.policy.prompts import build_messages
from dpe.policy.sft import sft_batch
from dpe.world import diagnostic_sample
from trainer.settings import GRPOSettings

PUBLISHED_PARAMETERS = {
    "qwen2.5-vl-3b": (3_754_622_976, 151_936),
    "qwen2.5-vl-7b": (8_292_166_656, 152_064),
    "qwen3-vl-2b": (2_127_532_032, 151_936),
    "qwen3-vl-8b": (8_767_123_696, 151_936),
}
"""Parameters of each released checkpoint and the vocabulary they include (the model cards' figures)."""

REDUCED = ("qwen2.5-vl-3b", "qwen3-vl-2b")
"""The smaller model of each family, built for real at one layer (the larger ones differ in widths only)."""


def test_every_published_architecture_has_a_parameter_count_on_record():
    assert set(PUBLISHED_PARAMETERS) == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_at_full_depth_the_architecture_has_the_published_parameter_count(name):
    """Only the vocabulary differs (the project's tokenizer stands in for Qwen's), so its rows are added back."""
    policy = build_published_policy(name, device="meta")
    published, vocabulary = PUBLISHED_PARAMETERS[name]
    config = policy.model.config
    embeddings = 1 if config.tie_word_embeddings else 2
    missing_rows = (vocabulary - config.text_config.vocab_size) * config.text_config.hidden_size * embeddings
    assert policy.num_parameters() + missing_rows == published


@pytest.fixture(scope="module", params=REDUCED)
def reduced(request, tmp_path_factory):
    """(name, policy, its saved folder) at one text and two vision layers."""
    policy = build_published_policy(request.param, text_layers=1, vision_layers=2)
    return request.param, policy, policy.save(tmp_path_factory.mktemp("published") / request.param)


def test_the_processor_makes_the_checkpoints_own_vision_tokens(reduced):
    name, policy, _ = reduced
    item = diagnostic_sample(0, 1)[0]
    prompt = policy.processor.apply_chat_template(build_messages(item.question, item.answer_type, item.options),
                                                  add_generation_prompt=True)
    batch = policy.processor(images=[item.image], text=[prompt], return_tensors="pt")
    patch = PUBLISHED[name].patch_size
    side = max(item.image.width, PUBLISHED[name].min_pixels ** 0.5)
    expected_grid = round(side / (patch * 2)) * 2
    assert batch["image_grid_thw"].tolist() == [[1, expected_grid, expected_grid]]
    image_pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_pad).sum()) == expected_grid**2 // 4
    assert prompt.count("<|vision_start|>") == 1 and prompt.endswith("<|im_start|>assistant\n")


def test_a_reduced_real_architecture_generates_and_learns(reduced):
    name, policy, _ = reduced
    items = diagnostic_sample(0, 2, capabilities=["color", "counting"])
    answers = generate(policy, [item.image for item in items],
                       [build_messages(item.question, item.answer_type, item.options) for item in items],
                       SamplingParams(max_new_tokens=3, temperature=1.0, num_samples=2), seed=0)
    assert [len(group) for group in answers] == [2, 2]
    trained = build_published_policy(name, text_layers=1, vision_layers=2, dtype=torch.float32)
    loss = trained.model.train()(**sft_batch(trained, items)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert trained.model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0, "the loss reaches the vision tower"


def test_a_saved_real_checkpoint_loads_in_half_precision_by_default_and_answers_the_same(reduced):
    _, policy, folder = reduced
    loaded = load_policy(folder)
    assert policy.num_parameters() > TINY_MAX_PARAMETERS
    assert loaded.model.dtype == torch.bfloat16, "a real checkpoint is never loaded in float32 on the CPU by accident"
    item = diagnostic_sample(0, 1)[0]
    conversation = [build_messages(item.question, item.answer_type, item.options)]
    params = SamplingParams(max_new_tokens=4)
    assert generate(loaded, [item.image], conversation, params) == generate(policy, [item.image], conversation, params)


def test_the_trainer_picks_the_paper_preset_for_a_real_checkpoint_and_tiny_otherwise(reduced, tmp_path):
    _, _, folder = reduced
    auto = GRPOSettings()
    assert (auto.preset, auto.learning_rate) == ("auto", 3e-4), "auto holds the tiny values until the base is known"
    real = auto.resolved(folder)
    assert (real.preset, real.learning_rate, real.bf16, real.max_completion_length) == ("paper", 1e-6, True, 1024)
    assert GRPOSettings(learning_rate=2e-6, group_size=4).resolved(folder).model_dump(
        include={"preset", "learning_rate", "group_size", "kl_coef"}) == {
        "preset": "paper", "learning_rate": 2e-6, "group_size": 4, "kl_coef": 1e-2}, "fields set otherwise are kept"
    assert GRPOSettings(preset="tiny").resolved(folder).learning_rate == 3e-4, "a set preset wins"
    assert auto.resolved(tmp_path / "not-warmed-yet").preset == "tiny"


def test_an_unknown_architecture_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown architecture 'qwen9-vl'; known: .*qwen2.5-vl-3b"):
        build_published_policy("qwen9-vl")


def test_a_tiny_checkpoint_keeps_the_tiny_preset(tmp_path: Path):
    from dpe.policy.config import TinyVLMConfig
    from dpe.policy.model import build_tiny_policy

    folder = build_tiny_policy(TinyVLMConfig(corpus_items=5)).save(tmp_path / "tiny")
    assert GRPOSettings().resolved(folder) == GRPOSettings(preset="tiny")
