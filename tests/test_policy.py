"""The policy layer: tiny model, tokenizer, processor, save/load, generation, SFT and the warm-up cache."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil
import socket
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoProcessor

from dpe.cli.model import model as model_cli
from dpe.grading import grade
from dpe.policy.accuracy import measure_accuracy
from dpe.policy.config import TinyVLMConfig, WarmupConfig
from dpe.policy.generation import SamplingParams, encode_prompts, generate, sample
from dpe.policy.image_tokens import (
    centred_image_tokens,
    image_tokens,
    merger_output_layer,
)
from dpe.policy.model import (
    VISION_TOKENS,
    build_tiny_policy,
    load_policy,
    suppressed_token_ids,
)
from dpe.policy.processor import Qwen2VLNoVideoProcessor, load_processor
from dpe.policy.prompts import build_messages, format_question, render_prompt
from dpe.policy.sft import IGNORE_INDEX, sft_batch, train_sft
from dpe.policy.warmup import RECIPE_FILE, cached_folder, recorded_heldout, warm_up
from dpe.policy.weights import PICKLED_WEIGHTS, PickledWeights
from dpe.world import CAPABILITIES, diagnostic_sample, make_item, training_stream

SMALL = TinyVLMConfig(corpus_items=20)
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def policy():
    return build_tiny_policy(SMALL)


@pytest.fixture(scope="module")
def items():
    return [make_item(capability, 1 + index % 3, index) for index, capability in enumerate(CAPABILITIES * 2)]


def _inputs(policy, items):
    texts = [render_prompt(policy.processor, build_messages(i.question, i.answer_type, i.options)) for i in items]
    return policy.processor(
        images=[i.image for i in items], text=texts, padding=True, padding_side="left", return_tensors="pt"
    )


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(policy):
    tokenizer = policy.tokenizer
    for item in (make_item(capability, 5, 3) for capability in CAPABILITIES):
        text = format_question(item.question, item.answer_type, item.options) + f" \\boxed{{{item.answer}}}"
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.decode(tokenizer("Ünïcode ✓ 😀").input_ids) == "Ünïcode ✓ 😀"
    for token in VISION_TOKENS + ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer(token).input_ids) == 1
    digits = tokenizer.convert_ids_to_tokens(tokenizer("1234").input_ids)
    assert digits == ["1", "2", "3", "4"]


def test_chat_template_is_qwen_style(policy):
    messages = build_messages("How many shapes?", "number", system="Be brief.")
    text = render_prompt(policy.processor, messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many shapes?\n"
        "Answer with a number in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_tiny_and_sees_16_image_tokens(family, items, no_network):
    policy = build_tiny_policy(TinyVLMConfig(family=family, corpus_items=5))
    assert policy.model.config.model_type == family
    assert policy.num_parameters() < 1_000_000
    inputs = _inputs(policy, items[:3])
    image_pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((inputs["input_ids"] == image_pad).sum(dim=1) == 16).all()
    with torch.no_grad():
        logits = policy.model(**inputs).logits
    assert logits.shape[-1] == len(policy.tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trips_exactly(family, items, tmp_path, no_network):
    policy = build_tiny_policy(TinyVLMConfig(family=family, corpus_items=5))
    policy.save(tmp_path / "ckpt", extra_files={"note.json": "{}"})
    loaded = load_policy(tmp_path / "ckpt")
    assert type(loaded.processor) is type(policy.processor)
    assert loaded.processor.chat_template == policy.processor.chat_template
    assert loaded.tokenizer.get_vocab() == policy.tokenizer.get_vocab()
    inputs = _inputs(policy, items[:4])
    assert torch.equal(inputs["input_ids"], _inputs(loaded, items[:4])["input_ids"])
    with torch.no_grad():
        difference = (policy.model(**inputs).logits - loaded.model(**inputs).logits).abs().max().item()
    assert difference == 0.0
    assert json.loads((tmp_path / "ckpt" / "note.json").read_text()) == {}


def test_policies_save_safetensors_and_a_folder_of_pickled_weights_is_refused(policy, tmp_path):
    saved = policy.save(tmp_path / "safe")
    assert list(saved.glob("*.safetensors")), "save_pretrained writes safetensors"
    assert not [path for pattern in PICKLED_WEIGHTS for path in saved.glob(pattern)]
    pickled = shutil.copytree(saved, tmp_path / "pickled")
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(policy.model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(PickledWeights, match="pytorch_model.bin holds pickled weights .* safetensors only"):
        load_policy(pickled)


def test_tiny_build_is_deterministic():
    first, second = build_tiny_policy(TinyVLMConfig(corpus_items=5)), build_tiny_policy(TinyVLMConfig(corpus_items=5))
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    for left, right in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(left, right)


def test_auto_processor_would_return_a_bare_tokenizer(policy, tmp_path):
    policy.save(tmp_path / "ckpt")
    assert not hasattr(AutoProcessor.from_pretrained(tmp_path / "ckpt"), "image_processor")
    assert isinstance(load_processor(tmp_path / "ckpt"), Qwen2VLNoVideoProcessor)


def test_load_processor_refuses_a_checkpoint_without_image_processor(policy, tmp_path):
    folder = tmp_path / "text_only"
    policy.tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="no image processor"):
        load_processor(folder)


def test_generate_returns_n_samples_and_is_reproducible(policy, items):
    images = [item.image for item in items]
    conversations = [build_messages(i.question, i.answer_type, i.options) for i in items]
    sampled = SamplingParams(temperature=1.0, num_samples=3, max_new_tokens=6, batch_size=5)
    first = generate(policy, images, conversations, sampled, seed=1)
    assert len(first) == len(items) and all(len(samples) == 3 for samples in first)
    assert generate(policy, images, conversations, sampled, seed=1) == first
    greedy = generate(policy, images, conversations, SamplingParams(max_new_tokens=6, batch_size=4))
    one_by_one = [
        generate(policy, [image], [conversation], SamplingParams(max_new_tokens=6))[0]
        for image, conversation in zip(images, conversations)
    ]
    assert greedy == one_by_one
    with pytest.raises(ValueError):
        SamplingParams(num_samples=2)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_prompts_encoded_once_decode_exactly_as_transformers_generate_does(family, items):
    """`generate` encodes each prompt (its image included) once, copies its cache for the n samples and decodes in
    its own loop; greedy and seeded sampling (at two temperatures) must give token for token what transformers'
    own `generate` gives with n return sequences."""
    policy = build_tiny_policy(SMALL.model_copy(update={"family": family}))
    inputs = _inputs(policy, items)
    images = [item.image for item in items]
    conversations = [build_messages(i.question, i.answer_type, i.options) for i in items]

    def reference(**sampling) -> list[str]:
        torch.manual_seed(7)
        with torch.inference_mode():
            sequences = policy.model.generate(**inputs, max_new_tokens=8, top_k=0,
                                              pad_token_id=policy.tokenizer.pad_token_id,
                                              suppress_tokens=suppressed_token_ids(policy.tokenizer), **sampling)
        return policy.tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    greedy = generate(policy, images, conversations, SamplingParams(max_new_tokens=8, batch_size=len(items)))
    assert [samples[0] for samples in greedy] == reference(do_sample=False)
    for temperature in (1.0, 0.7):
        sampled = generate(policy, images, conversations, SamplingParams(
            max_new_tokens=8, temperature=temperature, num_samples=3, batch_size=len(items)), seed=7)
        assert [text for samples in sampled for text in samples] == reference(
            do_sample=True, temperature=temperature, num_return_sequences=3)


def test_encoded_prompts_are_sampled_again_by_subset_as_if_encoded_alone(policy, items):
    """The difficulty band samples in stages from prompts encoded once: any subset of rows, in any order, any number
    of times, gives what encoding those prompts alone would give (greedy), and sampling leaves the prompts intact."""
    images = [item.image for item in items]
    conversations = [build_messages(i.question, i.answer_type, i.options) for i in items]
    prompts = encode_prompts(policy, images, conversations)
    greedy = SamplingParams(max_new_tokens=6)
    rows = [len(items) - 1, 0, 2]
    alone = generate(policy, [images[row] for row in rows], [conversations[row] for row in rows], greedy)
    assert sample(policy, prompts, greedy, rows=rows) == alone
    assert sample(policy, prompts, greedy, rows=rows) == alone
    assert sample(policy, prompts, greedy) == generate(policy, images, conversations, greedy)
    twice = sample(policy, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=2), rows=[1])
    assert len(twice) == 1 and len(twice[0]) == 2


def test_vision_tokens_are_never_generated(policy, items):
    vision_ids = suppressed_token_ids(policy.tokenizer)
    assert len(vision_ids) == len(VISION_TOKENS)
    boost = torch.zeros(len(policy.tokenizer))
    boost[vision_ids] = 50.0
    hook = policy.model.lm_head.register_forward_hook(lambda module, args, output: output + boost)
    try:
        inputs = _inputs(policy, items[:4])
        with torch.no_grad():
            unsuppressed = policy.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert set(unsuppressed[:, inputs["input_ids"].shape[1] :].flatten().tolist()) <= set(vision_ids)
        conversations = [build_messages(i.question, i.answer_type, i.options) for i in items]
        images = [item.image for item in items]
        greedy = SamplingParams(max_new_tokens=8)
        sampled = SamplingParams(temperature=1.5, num_samples=4, max_new_tokens=8)
        for params in (greedy, sampled):
            outputs = generate(policy, images, conversations, params, seed=0)
            ids = policy.tokenizer([text for samples in outputs for text in samples]).input_ids
            assert not {token for row in ids for token in row} & set(vision_ids)
    finally:
        hook.remove()


def test_sft_labels_cover_only_the_boxed_answer(policy, items):
    batch = sft_batch(policy, items)
    for row, item in enumerate(items):
        labels = batch["labels"][row]
        assert policy.tokenizer.decode(labels[labels != IGNORE_INDEX]) == f"\\boxed{{{item.answer}}}<|im_end|>"
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_sft_learns_a_single_easy_capability():
    policy = build_tiny_policy(SMALL)
    stream = training_stream({"existence": 1.0}, seed=2, levels=(1,))
    losses = train_sft(policy, stream, steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5, show_progress=False)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 4
    held_out = diagnostic_sample(0, 8, capabilities=["existence"], levels=(1,))
    (texts,) = zip(*generate(policy, [i.image for i in held_out],
                             [build_messages(i.question, i.answer_type, i.options) for i in held_out]))
    assert all(grade(text, item.key).format_ok for text, item in zip(texts, held_out))


@pytest.mark.parametrize("family", FAMILIES)
def test_centred_image_tokens_give_a_constant_no_gradient_and_leave_it_in_the_bias(family, items):
    """Trained plainly, the merger builds one constant image token and the answers ignore the image
    (`dpe.policy.image_tokens`). Centred, the merger's last bias, the one way to a constant, gets no gradient; on
    exit the hook is gone and the bias holds the mean, so the saved model hands out centred tokens by itself."""
    policy = build_tiny_policy(SMALL.model_copy(update={"family": family}))
    model, bias = policy.model.train(), merger_output_layer(policy.model).bias
    batch = sft_batch(policy, items)

    def bias_gradient() -> torch.Tensor:
        model.zero_grad()
        model(**batch).loss.backward()
        return bias.grad.abs().max()

    plain = bias_gradient()
    before = bias.detach().clone()
    with centred_image_tokens(model):
        assert bias_gradient() < plain * 1e-3
    assert bias_gradient() > plain * 1e-1, "the hook is removed on exit"
    assert not torch.equal(bias, before)
    assert image_tokens(model.eval(), batch).mean(0).abs().max() < 1e-5


def test_measure_accuracy_reports_every_capability(policy):
    table = measure_accuracy(policy, diagnostic_sample(0, 14), num_samples=2, max_new_tokens=6)
    assert set(table) == set(CAPABILITIES)
    for row in table.values():
        assert row["items"] == 2
        assert 0.0 <= row["greedy"] <= 1.0 and 0.0 <= row["sampled"] <= row["pass_at_k"] <= 1.0


def test_recipe_hash_follows_the_recipe():
    base = WarmupConfig(mix={"color": 1, "counting": 1})
    assert base.recipe_hash("1") == WarmupConfig(mix={"color": 2, "counting": 2}).recipe_hash("1")
    assert base.recipe_hash("1") != WarmupConfig(mix={"color": 2, "counting": 1}).recipe_hash("1")
    assert base.recipe_hash("1") != base.model_copy(update={"steps": 7}).recipe_hash("1")
    assert base.recipe_hash("1") != base.recipe_hash("2")
    with pytest.raises(ValueError):
        WarmupConfig(mix={"juggling": 1.0})


def test_warm_up_is_cached_by_recipe(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("DPE_MODEL_CACHE", str(tmp_path / "env-cache"))
    config = WarmupConfig(model=TinyVLMConfig(corpus_items=5), steps=3, batch_size=4)
    first = warm_up(config, show_progress=False, measure_heldout=False)
    assert not first.from_cache and first.folder == cached_folder(config)
    assert first.folder.parent == tmp_path / "env-cache" and (first.folder / RECIPE_FILE).exists()

    started = time.perf_counter()
    second = warm_up(config, show_progress=False, measure_heldout=False)
    assert second.from_cache and second.folder == first.folder
    assert time.perf_counter() - started < 5
    inputs = _inputs(first.policy, [make_item("chart", 2, 0)])
    with torch.no_grad():
        assert torch.equal(first.policy.model(**inputs).logits, second.policy.model(**inputs).logits)

    other = warm_up(config.model_copy(update={"seed": 1}), cache_dir=tmp_path / "arg-cache", show_progress=False,
                    measure_heldout=False)

    assert recorded_heldout(first.folder) is None
    measured = warm_up(config, show_progress=False)
    assert measured.from_cache and set(recorded_heldout(first.folder)) == set(CAPABILITIES), \
        "a model cached before its recipe recorded the held-out accuracy gets it recorded on next use"
    assert not other.from_cache and other.folder.parent == tmp_path / "arg-cache"


def test_a_recipe_trains_the_same_model_on_any_number_of_threads(tmp_path, no_network):
    """The warm-up trains on the recipe's `threads` (1), whatever the process runs on, so a recipe's floating-point
    path, and with it which capabilities its base is strong in, is the same in every run; the process's own number
    of threads is left as it was."""
    config = WarmupConfig(model=TinyVLMConfig(corpus_items=5), steps=12, batch_size=4)
    threads = torch.get_num_threads()
    weights = []
    for process_threads, cache in ((1, "one"), (2, "two")):
        torch.set_num_threads(process_threads)
        try:
            policy = warm_up(config, cache_dir=tmp_path / cache, show_progress=False, measure_heldout=False).policy
            assert torch.get_num_threads() == process_threads
        finally:
            torch.set_num_threads(threads)
        weights.append(policy.model.state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_cli_init_tiny_sft_and_accuracy(tmp_path, no_network):
    runner = CliRunner()
    result = runner.invoke(model_cli, ["init-tiny", "-o", str(tmp_path / "tiny"), "--family", "qwen2_5_vl"])
    assert result.exit_code == 0, result.output
    assert load_policy(tmp_path / "tiny").model.config.model_type == "qwen2_5_vl"

    args = ["sft", "--steps", "2", "--batch-size", "2", "--mix", "color=3,counting=1", "--levels", "1,2",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "warm"), "--eval-items", "7",
            "--eval-samples", "2"]
    result = runner.invoke(model_cli, args)
    assert result.exit_code == 0, result.output
    assert "trained" in result.output and "base held-out accuracy, as recipe.json records it" in result.output
    recorded = recorded_heldout(tmp_path / "warm")
    assert set(recorded) == set(CAPABILITIES) and all(row["items"] == 100 for row in recorded.values())
    assert 0.0 <= json.loads((tmp_path / "warm" / RECIPE_FILE).read_text())["image_dependence"] <= 1.0
    assert "loaded from cache" in runner.invoke(model_cli, args).output

    result = runner.invoke(model_cli, ["accuracy", str(tmp_path / "warm"), "--items", "7", "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert "the answers' dependence on the image" in result.output

    bad = runner.invoke(model_cli, ["sft", "--mix", "juggling=1", "--cache-dir", str(tmp_path / "cache")])
    assert bad.exit_code != 0 and "juggling" in bad.output


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_default_warm_up_is_strong_somewhere_and_weak_but_learnable_elsewhere():
    """In the default cache, as `dpe run` warms it (`.ci/run` warms it while the tools install). What #13 needs of a
    base, on the held-out suite its `recipe.json` records: at least two capabilities it masters, at least two it
    mostly fails but sometimes solves (GRPO has a signal there), and answers that depend on the image."""
    result = warm_up(WarmupConfig(), show_progress=False)
    recorded = recorded_heldout(result.folder)
    assert set(recorded) == set(CAPABILITIES) and all(row["items"] == 100 for row in recorded.values())
    assert all(row["format"] > 0.9 for row in recorded.values()), recorded
    strong = [name for name, row in recorded.items() if row["greedy"] >= 0.85]
    weak_but_learnable = [name for name, row in recorded.items() if row["greedy"] <= 0.35 and row["pass_at_k"] > 0.3]
    assert len(strong) >= 2 and len(weak_but_learnable) >= 2, recorded
    assert json.loads((result.folder / RECIPE_FILE).read_text())["image_dependence"] > 0.1, "the answers use the image"
