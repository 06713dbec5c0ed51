"""What the auditor model chooses from: for an unlabeled image, a question to ask and an edit of the image.

The probe writer's toolchain reads the scene in the image. The auditor model sees the image and two lettered menus:
the questions that scene allows (`probe_menu`: a capability and, for capabilities with several, the kind of
question) and the edits of the toolbox with the parameters the scene allows (`producers.auditor.edits.toolbox`:
which object to remove, which quarter to cover, which half to zoom to, which text to write...). It answers with
both letters, ``\\boxed{B,D}``. The question itself is written by the world's question writer from what the
toolchain sees in the edited image (`menu_probe`), so every probe is one the references can check.

Example:
    >>> from dpe.world import generate_scene, render_scene
    >>> prompt = AuditPrompt.of(render_scene(generate_scene("text", 1, seed=0)))
    >>> [kind.describe() for kind in prompt.probes], [edit.key for edit in prompt.edits][:3]
    (['text_reading'], ['none', 'mirror', 'redblue'])
    >>> prompt.choice("\\\\boxed{A,B}").key, prompt.choice("\\\\boxed{A}"), prompt.choice("\\\\boxed{B,A}")
    ('text_reading/any/mirror', None, None)
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from typing import Any

from PIL import Image

from dpe.grading import extract_answer
from dpe.imaging import ImageEditor, PillowEditor
from dpe.perception import NotPerceived
from dpe.perception.toolchain import TOOLCHAINS
from dpe.policy.prompts import build_messages
from dpe.world import QUESTION_KINDS, Scene, scene_capabilities
from producers.auditor.backends import View
from producers.auditor.edits import Counterfactual, toolbox
from producers.auditor.probes import Probe, world_probe

QUESTION = "Which probe will the audited model get wrong? Choose a question to ask and an edit of the image."
SEPARATOR = ","
"""Between the question's letter and the edit's in an answer."""


@dataclass(frozen=True)
class ProbeKind:
    """A question to ask: a capability and the kind of question (None: the question writer's choice)."""

    capability: str
    question_kind: str | None

    @property
    def key(self) -> str:
        """``capability/kind`` (``any`` for no kind).

        >>> ProbeKind("counting", "color").key, ProbeKind("color", None).key
        ('counting/color', 'color/any')
        """
        return f"{self.capability}/{self.question_kind or 'any'}"

    def describe(self) -> str:
        return f"{self.capability} ({self.question_kind})" if self.question_kind else self.capability


@dataclass(frozen=True)
class Choice:
    """A probe the auditor model chose: the question to ask and the edit to ask it about."""

    kind: ProbeKind
    edit: Counterfactual

    @property
    def key(self) -> str:
        """``capability/kind/edit``: the failure types' first parts."""
        return f"{self.kind.key}/{self.edit.key}"


def probe_menu(scene: Scene) -> tuple[ProbeKind, ...]:
    """Every question a scene allows: its capabilities and their kinds of question, in a fixed order."""
    return tuple(ProbeKind(capability, kind) for capability in scene_capabilities(scene)
                 for kind in QUESTION_KINDS.get(capability, (None,)))


@dataclass(frozen=True)
class AuditPrompt:
    """One image to probe and its two menus: a row of the trainer's GRPO dataset (`GRPOEngine`)."""

    image: Image.Image
    probes: tuple[ProbeKind, ...]
    edits: tuple[Counterfactual, ...]

    @classmethod
    def of(cls, image: Image.Image, probe_writer: str = "regions") -> "AuditPrompt | None":
        """The prompt for an image, its menus from what `probe_writer` sees (None: it sees nothing to ask about)."""
        try:
            return cls.seen(image, TOOLCHAINS[probe_writer].perceive(image))
        except NotPerceived:
            return None

    @classmethod
    def seen(cls, image: Image.Image, scene: Scene) -> "AuditPrompt | None":
        """The prompt for an image whose probe writer's reading is `scene` (None: it allows no question)."""
        probes = probe_menu(scene)
        return cls(image, probes, toolbox(scene)) if probes else None

    def question(self) -> str:
        """The text the model reads: the task, both lettered menus and how to answer."""
        lines = [QUESTION, "Questions:"]
        lines += [f"{letter}. {kind.describe()}" for letter, kind in zip(string.ascii_uppercase, self.probes)]
        lines.append("Edits:")
        lines += [f"{letter}. {edit.description}" for letter, edit in zip(string.ascii_uppercase, self.edits)]
        lines.append(f"Name a question's letter and an edit's letter, as in B{SEPARATOR}D.")
        return "\n".join(lines)

    def messages(self) -> list[dict[str, Any]]:
        return build_messages(self.question(), "text")

    def answer(self, kind: int, edit: int) -> str:
        """The answer naming question `kind` and edit `edit` (indexes of the menus), unboxed.

        >>> from dpe.world import generate_scene, render_scene
        >>> AuditPrompt.of(render_scene(generate_scene("text", 1, seed=0))).answer(0, 2)
        'A,C'
        """
        return f"{string.ascii_uppercase[kind]}{SEPARATOR}{string.ascii_uppercase[edit]}"

    def choice(self, text: str) -> Choice | None:
        """The choice an answer names (None: not a letter of each menu)."""
        answer = (extract_answer(text) or "").replace(" ", "").upper()
        letters = answer.split(SEPARATOR)
        if len(letters) != 2 or not all(len(letter) == 1 and letter.isalpha() for letter in letters):
            return None
        kind, edit = (ord(letter) - ord("A") for letter in letters)
        if kind >= len(self.probes) or edit >= len(self.edits):
            return None
        return Choice(self.probes[kind], self.edits[edit])

    def row(self) -> dict[str, Any]:
        """The GRPO dataset's row: the conversation and the image (the reward reads the menus off the image again)."""
        return {"prompt": self.messages(), "image": self.image}


def menu_probe(image: Image.Image, item_id: str, choice: Choice, probe_writer: str = "regions",
               editor: ImageEditor | None = None) -> tuple[View, Probe] | None:
    """A choice asked about an image: the view (the image, or its edit as a counterfactual of `item_id`) and the
    question the probe writer writes from what it sees in that view (None: it cannot write one).

    Example:
        >>> from dpe.world import generate_scene, render_scene
        >>> image = render_scene(generate_scene("shapes", 2, seed=3))
        >>> prompt = AuditPrompt.of(image)
        >>> view, probe = menu_probe(image, "item", Choice(ProbeKind("counting", "all"), prompt.edits[1]))
        >>> view.item_id, view.counterfactual_of, probe.capability
        ('item/cf/mirror', 'item', 'counting')
    """
    edit = choice.edit
    edited = bool(edit.ops)
    picture = (editor or PillowEditor()).apply(image, edit.ops) if edited else image
    try:
        scene = TOOLCHAINS[probe_writer].perceive(picture)
    except NotPerceived:
        return None
    view_id = f"{item_id}/cf/{edit.key}" if edited else item_id
    seed = int.from_bytes(hashlib.sha256(f"{view_id}/{choice.key}".encode()).digest()[:7], "big")
    probe = world_probe(scene, choice.kind.capability, seed, choice.kind.question_kind)
    if probe is None:
        return None
    return View(view_id, picture, scene, edit.description if edited else None, item_id if edited else None), probe
