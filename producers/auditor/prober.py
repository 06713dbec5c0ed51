"""The trained auditor's side of AuditDM: the menu of probes the auditor model chooses from, and its reward.

The probe writer's toolchain reads the scene in an unlabeled image; the auditor model sees the image and a lettered
menu of every probe that scene allows (`probe_menu`): a capability, the kind of question (for capabilities with
several), and a counterfactual edit from the toolbox (`EDITS`), in a fixed order. It answers with a letter in
``\\boxed{}``, as the policy answers a choice question. The question itself is written by the world's question writer
from what the toolchain sees in the edited image, so every probe is one the references can check.

`DivergenceReward` is a plain callable with TRL's reward signature: per completion, validity (the question could be
written and the references agree on its answer), divergence (the target's answer differs from their consensus), a
diversity term (minus the share of the call's completions that chose the same kind) and a penalty for an answer
that names no probe, weighted.

Example:
    >>> from dpe.world import generate_scene
    >>> menu = probe_menu(generate_scene("text", 1, seed=0))
    >>> [kind.describe() for kind in menu]
    ['text_reading, as it is', 'text_reading, mirrored', 'text_reading, red and blue swapped']
    >>> chosen_kind("\\\\boxed{B}", menu) == menu[1], chosen_kind("\\\\boxed{D}", menu)
    (True, None)
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dpe.events import AnswerType
from dpe.grading import extract_answer, parse_choice
from dpe.imaging import EditOp, Flip, ImageEditor, PillowEditor, Recolor
from dpe.perception import NotPerceived
from dpe.perception.toolchain import TOOLCHAINS
from dpe.policy.model import Policy
from dpe.policy.prompts import boxed, build_messages, completion_text, render_prompt
from dpe.policy.sft import train_sft
from dpe.world import QUESTION_KINDS, Scene, image_sha256, scene_capabilities
from producers.auditor.backends import ProbeAnswerer, View
from producers.auditor.consensus import canonical, consensus, target_differs
from producers.auditor.failures import edit_name, failure_type
from producers.auditor.probes import Probe, world_probe
from producers.auditor.settings import AuditorSettings

EDITS: dict[str, tuple[str, tuple[EditOp, ...]]] = {
    "none": ("as it is", ()),
    "mirror": ("mirrored", (Flip(axis="horizontal"),)),
    "redblue": ("red and blue swapped", (Recolor(mode="swap_red_blue"),)),
}
"""The toolbox: edit key -> (what it does, the operations)."""

QUESTION = "Which probe will the audited model get wrong?"


@dataclass(frozen=True)
class ProbeKind:
    """One entry of a menu: a capability to ask about, the kind of question (None: the writer's choice), an edit."""

    capability: str
    question_kind: str | None
    edit: str

    @property
    def key(self) -> str:
        """``capability/kind/edit`` (``any`` for no kind): how a menu travels in a dataset column.

        >>> ProbeKind("counting", "color", "mirror").key, ProbeKind.parse("color/any/none")
        ('counting/color/mirror', ProbeKind(capability='color', question_kind=None, edit='none'))
        """
        return f"{self.capability}/{self.question_kind or 'any'}/{self.edit}"

    @classmethod
    def parse(cls, key: str) -> "ProbeKind":
        capability, kind, edit = key.split("/")
        return cls(capability, None if kind == "any" else kind, edit)

    def describe(self) -> str:
        asked = f"{self.capability} ({self.question_kind})" if self.question_kind else self.capability
        return f"{asked}, {EDITS[self.edit][0]}"


def probe_menu(scene: Scene) -> tuple[ProbeKind, ...]:
    """Every probe kind a scene allows: its capabilities, their kinds of question, each edit; a fixed order."""
    return tuple(ProbeKind(capability, kind, edit) for capability in scene_capabilities(scene)
                 for kind in QUESTION_KINDS.get(capability, (None,)) for edit in EDITS)


def probe_messages(menu: Sequence[ProbeKind]) -> list[dict[str, Any]]:
    """The auditor model's prompt: the image, the question and the lettered menu."""
    return build_messages(QUESTION, "choice", [kind.describe() for kind in menu])


def chosen_kind(text: str, menu: Sequence[ProbeKind]) -> ProbeKind | None:
    """The menu entry an answer names (None: no letter of the menu)."""
    answer = extract_answer(text)
    letter = parse_choice(answer, [kind.describe() for kind in menu]) if answer else None
    index = ord(letter) - ord("A") if letter else -1
    return menu[index] if 0 <= index < len(menu) else None


def menu_probe(image: Image.Image, item_id: str, kind: ProbeKind, probe_writer: str = "regions",
               editor: ImageEditor | None = None) -> tuple[View, Probe] | None:
    """A menu entry asked about an image: the view (the image, or its edit as a counterfactual of `item_id`) and the
    question the probe writer writes from what it sees in that view (None: it cannot write one).

    Example:
        >>> from dpe.world import generate_scene, render_scene
        >>> image = render_scene(generate_scene("shapes", 2, seed=3))
        >>> view, probe = menu_probe(image, "item", ProbeKind("counting", "all", "mirror"))
        >>> view.item_id, view.counterfactual_of, probe.capability
        ('item/cf/mirror', 'item', 'counting')
    """
    edited = kind.edit != "none"
    picture = (editor or PillowEditor()).apply(image, EDITS[kind.edit][1]) if edited else image
    try:
        scene = TOOLCHAINS[probe_writer].perceive(picture)
    except NotPerceived:
        return None
    view_id = f"{item_id}/cf/{kind.edit}" if edited else item_id
    seed = int.from_bytes(hashlib.sha256(f"{view_id}/{kind.key}".encode()).digest()[:7], "big")
    probe = world_probe(scene, kind.capability, seed, kind.question_kind)
    if probe is None:
        return None
    view = View(view_id, picture, scene, EDITS[kind.edit][0] if edited else None, item_id if edited else None)
    return view, probe


@dataclass(frozen=True)
class AuditPrompt:
    """One image to probe and its menu: a row of the trainer's GRPO dataset (`GRPOEngine`)."""

    image: Image.Image
    menu: tuple[ProbeKind, ...]

    @classmethod
    def of(cls, image: Image.Image, probe_writer: str = "regions") -> "AuditPrompt | None":
        """The prompt for an image, its menu from what `probe_writer` sees (None: it sees nothing to ask about)."""
        try:
            menu = probe_menu(TOOLCHAINS[probe_writer].perceive(image))
        except NotPerceived:
            return None
        return cls(image, menu) if menu else None

    def row(self) -> dict[str, Any]:
        return {"prompt": probe_messages(self.menu), "image": self.image, "menu": [kind.key for kind in self.menu]}


def letter_token_ids(tokenizer: Any, count: int) -> list[int]:
    """The token of each of the first `count` letters as it follows ``\\boxed{`` in an answer; a clear error for a
    tokenizer that merges a letter with its neighbours (then a menu cannot be ranked by one next-token step)."""
    opening = tokenizer(boxed("")[:-1], add_special_tokens=False).input_ids
    ids = []
    for letter in (chr(ord("A") + index) for index in range(count)):
        whole = tokenizer(boxed(letter), add_special_tokens=False).input_ids
        if whole[: len(opening)] != opening or tokenizer.decode(whole[len(opening)]) != letter:
            raise ValueError(f"this tokenizer does not write {boxed(letter)!r} as the opening, then {letter!r}")
        ids.append(whole[len(opening)])
    return ids


def rank_menu(policy: Policy, prompts: Sequence[AuditPrompt], batch_size: int = 16) -> list[tuple[ProbeKind, ...]]:
    """Each prompt's menu ordered by the auditor model's choice, likeliest first: the probability of each letter as
    the next token after ``\\boxed{``. How an auditor with a budget of k probes on an image asks its k best distinct
    ones (sampling repeats the favourite of a sharpened model).

    Example:
        >>> from dpe.policy.config import TinyVLMConfig
        >>> from dpe.policy.model import build_tiny_policy
        >>> from dpe.world import generate_scene, render_scene
        >>> prompt = AuditPrompt.of(render_scene(generate_scene("text", 1, seed=0)))
        >>> [ranked] = rank_menu(build_tiny_policy(TinyVLMConfig(corpus_items=5)), [prompt])
        >>> set(ranked) == set(prompt.menu), len(ranked) == len(prompt.menu)
        (True, True)
    """
    ranked: list[tuple[ProbeKind, ...]] = []
    letters = letter_token_ids(policy.tokenizer, max((len(prompt.menu) for prompt in prompts), default=0))
    was_training = policy.model.training
    policy.model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        texts = [render_prompt(policy.processor, probe_messages(prompt.menu)) + boxed("")[:-1] for prompt in batch]
        inputs = policy.processor(images=[prompt.image for prompt in batch], text=texts, padding=True,
                                  padding_side="left", return_tensors="pt").to(policy.model.device)
        with torch.inference_mode():
            logits = policy.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        for prompt, scores in zip(batch, logits[:, letters].tolist(), strict=True):
            order = sorted(range(len(prompt.menu)), key=lambda index: -scores[index])
            ranked.append(tuple(prompt.menu[index] for index in order))
    policy.model.train(was_training)
    return ranked


@dataclass(frozen=True)
class MenuExample:
    """One supervised example of the menu's answer format: a prompt's image and menu, a letter drawn at random."""

    image: Image.Image
    options: tuple[str, ...]
    answer: str
    question: str = QUESTION
    answer_type: AnswerType = "choice"


def teach_menu(policy: Policy, prompts: Sequence[AuditPrompt], *, steps: int, seed: int = 0,
               show_progress: bool = False) -> list[float]:
    """Teach a policy the menu's answer format before GRPO: supervised letters drawn uniformly, so it starts as a
    random prober whose every answer names a probe (a model that writes no letter gives GRPO nothing to compare).

    Returns the loss of every step (`dpe.policy.sft.train_sft`, centred image tokens as the warm-up trains).
    """
    rng = random.Random(seed)

    def examples() -> Iterator[MenuExample]:
        while True:
            prompt = rng.choice(prompts)
            yield MenuExample(prompt.image, tuple(kind.describe() for kind in prompt.menu),
                              chr(ord("A") + rng.randrange(len(prompt.menu))))

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
    """What one chosen probe found: the kind (None: no letter of the menu), the probe written (None: none could be),
    whether the references agreed on an answer, whether the target differed from it, and the failure type if so."""

    kind: ProbeKind | None
    probe: Probe | None = None
    agreed: bool = False
    diverged: bool = False
    failure_type: str | None = None


class DivergenceReward:
    """The auditor's GRPO reward (see the module docstring); ``image`` and ``menu`` are the dataset's columns of each
    prompt's image and menu (`AuditPrompt.row`).

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

    def judge(self, kinds: Sequence[ProbeKind | None], images: Sequence[Image.Image]) -> list[Verdict]:
        """Ask the target and the references each chosen probe about its image; one verdict per choice. A probe
        chosen several times for the same image (a GRPO group) is edited, written and asked once."""
        written: dict[tuple[str, ProbeKind], tuple[View, Probe] | None] = {}
        asked_at: dict[int, tuple[str, ProbeKind]] = {}
        for position, (kind, picture) in enumerate(zip(kinds, images, strict=True)):
            if kind is None:
                continue
            picture = picture.convert("RGB")
            key = (image_sha256(picture), kind)
            if key not in written:
                written[key] = menu_probe(picture, key[0], kind, self.settings.probe_writer, self.editor)
            if written[key] is not None:
                asked_at[position] = key
        keys = list(dict.fromkeys(asked_at.values()))
        pairs = [written[key] for key in keys]
        given = dict(zip(keys, self.target.answer(pairs))) if pairs else {}
        answers = {reference.name: dict(zip(keys, reference.answer(pairs))) for reference in self.references}
        verdicts = []
        for position, kind in enumerate(kinds):
            if position not in asked_at:
                verdicts.append(Verdict(kind))
                continue
            key = asked_at[position]
            view, probe = written[key]
            agreed = consensus({name: by[key] for name, by in answers.items()}, probe)
            if agreed is None or not agreed.holds(self.settings):
                verdicts.append(Verdict(kind, probe))
                continue
            diverged = target_differs(given[key] or "", agreed, probe)
            named = failure_type(probe, canonical(given[key], probe), agreed.answer,
                                 edit_name(view.item_id)) if diverged else None
            verdicts.append(Verdict(kind, probe, True, diverged, named))
        return verdicts

    def __call__(self, completions: Sequence[Any], image: Sequence[Image.Image], menu: Sequence[Sequence[str]],
                 **kwargs: Any) -> list[float]:
        kinds = [chosen_kind(completion_text(completion), [ProbeKind.parse(key) for key in keys])
                 for completion, keys in zip(completions, menu, strict=True)]
        chosen = Counter(kinds)
        rewards = []
        for verdict in self.judge(kinds, image):
            if verdict.kind is None:
                rewards.append(-self.weights.malformed)
                continue
            reward = self.weights.validity * verdict.agreed + self.weights.divergence * verdict.diverged
            rewards.append(reward - self.weights.diversity * chosen[verdict.kind] / len(kinds))
        return rewards
