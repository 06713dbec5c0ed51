"""The trained auditor's menus and reward: two letters name a question and an edit (with the parameters the image
allows) of the image's own menus; the reward pays for divergences the references confirm, a little for any valid
probe, less for a choice the rest of the call made too, and takes a point from an answer that names no probe.

References are the two default pixel toolchains; targets are stand-ins (one never answers, one answers as a
reference does), so the expected rewards are known."""

from __future__ import annotations

import pytest

from dpe.world import QUESTION_KINDS, generate_scene, render_scene
from producers.auditor.backends import ToolchainAnswerer
from producers.auditor.edits import MAX_REMOVALS, removable
from producers.auditor.menu import AuditPrompt, Choice, ProbeKind
from producers.auditor.prober import DivergenceReward, RewardWeights


class Silent:
    """A stand-in target that never gives a usable answer."""

    name = "silent"

    def answer(self, asked):
        return ["I cannot tell." for _ in asked]


REFERENCES = [ToolchainAnswerer("regions", "regions"), ToolchainAnswerer("contours", "contours")]
WEIGHTS = RewardWeights(divergence=1.0, validity=0.2, diversity=0.2, malformed=1.0)


@pytest.fixture(scope="module")
def shapes() -> AuditPrompt:
    prompt = AuditPrompt.of(render_scene(generate_scene("shapes", 2, seed=3)))
    assert prompt is not None
    return prompt


def answer(prompt: AuditPrompt, kind: ProbeKind, edit: str) -> str:
    keys = [choice.key for choice in prompt.edits]
    return f"\\boxed{{{prompt.answer(prompt.probes.index(kind), keys.index(edit))}}}"


def call(reward: DivergenceReward, prompt: AuditPrompt, completions: list[str]) -> list[float]:
    return reward(completions, image=[prompt.image] * len(completions))


def test_the_menus_are_what_the_probe_writer_sees_and_each_answer_names_one_choice(shapes):
    capabilities = {kind.capability for kind in shapes.probes}
    assert capabilities <= {"counting", "color", "spatial", "existence"}, "a shapes scene: no chart, no text"
    assert [kind for kind in shapes.probes if kind.capability == "counting"] == [
        ProbeKind("counting", kind) for kind in QUESTION_KINDS["counting"]], "every kind of question"
    keys = [edit.key for edit in shapes.edits]
    scene = generate_scene("shapes", 2, seed=3)
    removals = [key for key in keys if key.startswith("remove-")]
    assert len(removals) == min(MAX_REMOVALS, len(removable(scene))) > 0, "which object to remove is a parameter"
    assert {"occlude-top-left", "crop-right", "overwrite-stop", "mirror"} <= set(keys)
    assert max(len(shapes.probes), len(shapes.edits)) <= 26, "one letter per entry"
    every = [shapes.choice(f"\\boxed{{{shapes.answer(kind, edit)}}}") for kind in range(len(shapes.probes))
             for edit in range(len(shapes.edits))]
    assert len({choice.key for choice in every}) == len(shapes.probes) * len(shapes.edits)
    for wrong in ("\\boxed{Z,A}", "\\boxed{A,Z}", "\\boxed{A}", "no idea", "\\boxed{AB,C}"):
        assert shapes.choice(wrong) is None, wrong


def test_a_confirmed_divergence_pays_a_valid_probe_a_little_and_a_crowd_less(shapes):
    counting = ProbeKind("counting", "all")
    mirrored_text = AuditPrompt.of(render_scene(generate_scene("text", 1, seed=0)))
    silent = DivergenceReward(Silent(), REFERENCES, weights=WEIGHTS)
    rewards = call(silent, shapes, [answer(shapes, counting, "none"), "\\boxed{Z,A}"])
    assert rewards[0] == pytest.approx(1.0 + 0.2 - 0.2 / 2), "references agree, the target has no answer"
    assert rewards[1] == -1.0, "no letters: less than any probe earns"
    unwritable = call(silent, mirrored_text, ["\\boxed{A,B}"])
    assert unwritable == pytest.approx([-0.2]), "a mirrored text cannot be read: no question, only the crowd term"
    crowd = call(silent, shapes, [answer(shapes, counting, "none")] * 3)
    assert crowd == pytest.approx([1.0 + 0.2 - 0.2] * 3), "the whole call on one choice pays the full diversity term"

    right = DivergenceReward(REFERENCES[1], REFERENCES, weights=WEIGHTS)
    assert call(right, shapes, [answer(shapes, counting, "none")]) == pytest.approx([0.2 - 0.2]), "nothing to find"


def test_the_verdict_names_the_failure_type_with_the_edit_the_model_picked(shapes):
    removal = next(edit for edit in shapes.edits if edit.key.startswith("remove-"))
    choices = [Choice(ProbeKind("existence", "absent"), removal), Choice(ProbeKind("counting", "all"), removal)]
    absent, counted = DivergenceReward(Silent(), REFERENCES).judge(choices, [shapes.image] * 2)
    assert absent.diverged and absent.failure_type == "existence/absent/remove/no_answer"
    assert counted.probe is not None and counted.failure_type == "counting/all/remove/no_answer"
