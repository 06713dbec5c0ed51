"""The trained auditor's model side of AuditDM: how it ranks an image's menus, how it learns their format, its reward.

The auditor model answers an `AuditPrompt` (`producers.auditor.menu`) with a question's letter and an edit's letter.
`rank_choices` orders every (question, edit) pair by the model's probability of writing it, so that an auditor with a
budget of k probes on an image asks its k best distinct ones; `teach_menu` teaches a policy the answer format before
GRPO. `DivergenceReward` is a plain callable with TRL's reward signature: per completion, validity (the question
could be written and the references agree on its answer), divergence (the target's answer differs from their
consensus), a diversity term (minus the share of the call's completions that made the same choice) and a penalty for
an answer that names no probe, weighted.

Example:
    >>> from dpe.policy.config import TinyVLMConfig
    >>> from dpe.policy.model import build_tiny_policy
    >>> from dpe.world import generate_scene, render_scene
    >>> prompt = AuditPrompt.of(render_scene(generate_scene("text", 1, seed=0)))
    >>> [ranked] = rank_choices(build_tiny_policy(TinyVLMConfig(corpus_items=5)), [prompt])
    >>> len(ranked) == len(prompt.probes) * len(prompt.edits), len({choice.key for choice in ranked}) == len(ranked)
    (True, True)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dpe.events import AnswerType
from dpe.imaging import ImageEditor, PillowEditor
from dpe.policy.model import Policy
from dpe.policy.prompts import boxed, completion_text, render_prompt
from dpe.policy.sft import train_sft
from dpe.world import image_sha256
from producers.auditor.backends import ProbeAnswerer, View
from producers.auditor.consensus import canonical, consensus, target_differs
from producers.auditor.failures import edit_name, failure_type
from producers.auditor.menu import SEPARATOR, AuditPrompt, Choice, menu_probe
from producers.auditor.probes import Probe
from producers.auditor.settings import AuditorSettings

OPENING = boxed("")[:-1]
"""What an answer starts with, before the question's letter."""


def letter_token_ids(tokenizer: Any, count: int, opening: str = OPENING) -> list[int]:
    """The token of each of the first `count` letters as it follows `opening` in an answer; a clear error for a
    tokenizer that merges a letter with its neighbours (then a menu cannot be ranked one token at a time)."""
    start = tokenizer(opening, add_special_tokens=False).input_ids
    ids = []
    for letter in (chr(ord("A") + index) for index in range(count)):
        whole = tokenizer(opening + letter, add_special_tokens=False).input_ids
        if whole[: len(start)] != start or len(whole) != len(start) + 1 or tokenizer.decode(whole[-1]) != letter:
            raise ValueError(f"this tokenizer does not write {opening + letter!r} as {opening!r}, then {letter!r}")
        ids.append(whole[-1])
    return ids


def next_letter_scores(policy: Policy, prompts: Sequence[AuditPrompt], openings: Sequence[str],
                       count: int) -> list[list[float]]:
    """Log-probabilities of the first `count` letters as the next token of each prompt's answer begun with its
    opening (all openings tokenize alike up to the letter: same length of answer so far)."""
    letters = letter_token_ids(policy.tokenizer, count, openings[0]) if prompts else []
    texts = [render_prompt(policy.processor, prompt.messages()) + opening for prompt, opening in zip(prompts, openings)]
    inputs = policy.processor(images=[prompt.image for prompt in prompts], text=texts, padding=True,
                              padding_side="left", return_tensors="pt").to(policy.model.device)
    with torch.inference_mode():
        logits = policy.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
    return torch.log_softmax(logits, dim=-1)[:, letters].tolist()


def rank_choices(policy: Policy, prompts: Sequence[AuditPrompt], batch_size: int = 16) -> list[tuple[Choice, ...]]:
    """Each prompt's (question, edit) pairs ordered by the auditor model's probability of answering with them,
    likeliest first: log P(question letter) + log P(edit letter | question letter), one next-token step each. How an
    auditor with a budget of k probes on an image asks its k best distinct ones (sampling repeats the favourite of a
    sharpened model). See the module's example."""
    was_training = policy.model.training
    policy.model.eval()
    ranked: list[tuple[Choice, ...]] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        widest = max(len(prompt.probes) for prompt in batch)
        first = next_letter_scores(policy, batch, [OPENING] * len(batch), widest)
        pairs = [(prompt, kind) for prompt in batch for kind in range(len(prompt.probes))]
        second: list[list[float]] = []
        for chunk in range(0, len(pairs), batch_size):
            part = pairs[chunk : chunk + batch_size]
            openings = [OPENING + chr(ord("A") + kind) + SEPARATOR for _, kind in part]
            second += next_letter_scores(policy, [prompt for prompt, _ in part], openings,
                                         max(len(prompt.edits) for prompt, _ in part))
        scores = iter(second)
        for prompt, kind_scores in zip(batch, first, strict=True):
            scored = [(kind_scores[kind] + edit_scores[edit], Choice(prompt.probes[kind], prompt.edits[edit]))
                      for kind, edit_scores in zip(range(len(prompt.probes)), scores)
                      for edit in range(len(prompt.edits))]
            ranked.append(tuple(choice for _, choice in sorted(scored, key=lambda pair: -pair[0])))
    policy.model.train(was_training)
    return ranked


@dataclass(frozen=True)
class MenuExample:
    """One supervised example of the menus' answer format: a prompt's image and text, letters drawn at random."""

    image: Image.Image
    question: str
    answer: str
    answer_type: AnswerType = "text"
    options: tuple[str, ...] | None = None


def teach_menu(policy: Policy, prompts: Sequence[AuditPrompt], *, steps: int, seed: int = 0,
               show_progress: bool = False) -> list[float]:
    """Teach a policy the menus' answer format before GRPO: supervised letter pairs drawn uniformly, so it starts as
    a prober whose every answer names a probe (a model that writes no letters gives GRPO nothing to compare).

    Returns the loss of every step (`dpe.policy.sft.train_sft`, centred image tokens as the warm-up trains).
    """
    rng = random.Random(seed)

    def examples() -> Iterator[MenuExample]:
        while True:
            prompt = rng.choice(prompts)
            answer = prompt.answer(rng.randrange(len(prompt.probes)), rng.randrange(len(prompt.edits)))
            yield MenuExample(prompt.image, prompt.question(), answer)

    return train_sft(policy, examples(), steps=steps, batch_size=16, learning_rate=1e-3, warmup_steps=5,
                     centre_image_tokens=True, show_progress=show_progress, description="auditor menu format")


@dataclass(frozen=True)
class RewardWeights:
    """How the parts of the auditor's reward add up."""

    divergence: float = 1.0
    validity: float = 0.2
    diversity: float = 0.2
    malformed: float = 1.0
    """Taken from an answer that names no probe: below anything a probe can earn, or GRPO unlearns the format."""


@dataclass(frozen=True)
class Verdict:
    """What one chosen probe found: the choice (None: no letters of the menus), the probe written (None: none could
    be), whether the references agreed on an answer, whether the target differed from it, and the failure type."""

    choice: Choice | None
    probe: Probe | None = None
    agreed: bool = False
    diverged: bool = False
    failure_type: str | None = None


class DivergenceReward:
    """The auditor's GRPO reward (see the module docstring); ``image`` is the dataset's column of each prompt's image
    (`AuditPrompt.row`), whose menus it reads again as the prompt did.

    The references' consensus counts as in the fixed auditor (`AuditorSettings.min_consensus` and `min_agreeing`).
    A stand-in target or reference is any `ProbeAnswerer`; in the trainer the target is the newest policy checkpoint.
    """

    __name__ = "divergence_reward"

    def __init__(self, target: ProbeAnswerer, references: Sequence[ProbeAnswerer],
                 settings: AuditorSettings = AuditorSettings(), weights: RewardWeights = RewardWeights(),
                 editor: ImageEditor | None = None) -> None:
        self.target = target
        self.references = list(references)
        self.settings = settings
        self.weights = weights
        self.editor = editor or PillowEditor()

    def judge(self, choices: Sequence[Choice | None], images: Sequence[Image.Image]) -> list[Verdict]:
        """Ask the target and the references each chosen probe about its image; one verdict per choice. A probe
        chosen several times for the same image (a GRPO group) is edited, written and asked once."""
        written: dict[tuple[str, str], tuple[View, Probe] | None] = {}
        asked_at: dict[int, tuple[str, str]] = {}
        for position, (choice, picture) in enumerate(zip(choices, images, strict=True)):
            if choice is None:
                continue
            picture = picture.convert("RGB")
            key = (image_sha256(picture), choice.key)
            if key not in written:
                written[key] = menu_probe(picture, key[0], choice, self.settings.probe_writer, self.editor)
            if written[key] is not None:
                asked_at[position] = key
        keys = list(dict.fromkeys(asked_at.values()))
        pairs = [written[key] for key in keys]
        given = dict(zip(keys, self.target.answer(pairs))) if pairs else {}
        answers = {reference.name: dict(zip(keys, reference.answer(pairs))) for reference in self.references}
        verdicts = []
        for position, choice in enumerate(choices):
            if position not in asked_at:
                verdicts.append(Verdict(choice))
                continue
            key = asked_at[position]
            view, probe = written[key]
            agreed = consensus({name: by[key] for name, by in answers.items()}, probe)
            if agreed is None or not agreed.holds(self.settings):
                verdicts.append(Verdict(choice, probe))
                continue
            diverged = target_differs(given[key] or "", agreed, probe)
            named = failure_type(probe, canonical(given[key], probe), agreed.answer,
                                 edit_name(view.item_id)) if diverged else None
            verdicts.append(Verdict(choice, probe, True, diverged, named))
        return verdicts

    def choices(self, completions: Sequence[Any], images: Sequence[Image.Image]) -> list[Choice | None]:
        """The choice each completion names, read against its image's menus (read once per image)."""
        prompts: dict[str, AuditPrompt | None] = {}
        chosen = []
        for completion, picture in zip(completions, images, strict=True):
            picture = picture.convert("RGB")
            sha = image_sha256(picture)
            if sha not in prompts:
                prompts[sha] = AuditPrompt.of(picture, self.settings.probe_writer)
            prompt = prompts[sha]
            chosen.append(prompt.choice(completion_text(completion)) if prompt is not None else None)
        return chosen

    def __call__(self, completions: Sequence[Any], image: Sequence[Image.Image], **kwargs: Any) -> list[float]:
        choices = self.choices(completions, image)
        crowd = Counter(choice.key for choice in choices if choice is not None)
        rewards = []
        for verdict in self.judge(choices, image):
            if verdict.choice is None:
                rewards.append(-self.weights.malformed)
                continue
            reward = self.weights.validity * verdict.agreed + self.weights.divergence * verdict.diverged
            rewards.append(reward - self.weights.diversity * crowd[verdict.choice.key] / len(choices))
        return rewards
