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

from PIL import Image

from dpe.events import AnswerType
from dpe.grading import extract_answer, parse_choice
from dpe.imaging import EditOp, Flip, ImageEditor, PillowEditor, Recolor
from dpe.perception import NotPerceived
from dpe.perception.toolchain import TOOLCHAINS
from dpe.policy.model import Policy
from dpe.policy.prompts import build_messages, completion_text
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
        self.writer = TOOLCHAINS[settings.probe_writer]
        self.weights = weights
        self.editor = editor or PillowEditor()

    def probe(self, image: Image.Image, kind: ProbeKind) -> tuple[View, Probe] | None:
        """The view and question of a probe kind on an image (None: the probe writer cannot write one)."""
        sha = image_sha256(image)
        view_id = sha if kind.edit == "none" else f"{sha}/cf/{kind.edit}"
        view = View(view_id, self.editor.apply(image, EDITS[kind.edit][1]))
        try:
            scene = self.writer.perceive(view.image)
        except NotPerceived:
            return None
        seed = int.from_bytes(hashlib.sha256(f"{view_id}/{kind.key}".encode()).digest()[:7], "big")
        probe = world_probe(scene, kind.capability, seed, kind.question_kind)
        return None if probe is None else (view, probe)

    def judge(self, kinds: Sequence[ProbeKind | None], images: Sequence[Image.Image]) -> list[Verdict]:
        """Ask the target and the references each chosen probe about its image; one verdict per choice."""
        asked = {position: found for position, (kind, picture) in enumerate(zip(kinds, images, strict=True))
                 if kind is not None and (found := self.probe(picture.convert("RGB"), kind)) is not None}
        pairs = list(asked.values())
        given = dict(zip(asked, self.target.answer(pairs))) if pairs else {}
        answers = {reference.name: dict(zip(asked, reference.answer(pairs))) for reference in self.references}
        verdicts = []
        for position, kind in enumerate(kinds):
            if position not in asked:
                verdicts.append(Verdict(kind))
                continue
            view, probe = asked[position]
            agreed = consensus({name: by[position] for name, by in answers.items()}, probe)
            if agreed is None or not agreed.holds(self.settings):
                verdicts.append(Verdict(kind, probe))
                continue
            diverged = target_differs(given[position] or "", agreed, probe)
            named = failure_type(probe, canonical(given[position], probe), agreed.answer,
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
