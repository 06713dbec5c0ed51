"""The trained auditor's menu and reward: a letter names a probe kind of the image's own menu; the reward pays for
divergences the references confirm, a little for any valid probe, less for a kind the rest of the call chose too,
and takes a point from an answer that names no probe.

References are the two default pixel toolchains; targets are stand-ins (one never answers, one answers as a
reference does), so the expected rewards are known."""

from __future__ import annotations

import pytest

from dpe.world import QUESTION_KINDS, generate_scene, render_scene
from producers.auditor.backends import ToolchainAnswerer
from producers.auditor.prober import EDITS, AuditPrompt, DivergenceReward, ProbeKind, RewardWeights, chosen_kind


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


def letter(prompt: AuditPrompt, kind: ProbeKind) -> str:
    return f"\\boxed{{{chr(ord('A') + prompt.menu.index(kind))}}}"


def call(reward: DivergenceReward, prompt: AuditPrompt, completions: list[str]) -> list[float]:
    row = prompt.row()
    return reward(completions, image=[row["image"]] * len(completions), menu=[row["menu"]] * len(completions))


def test_the_menu_is_what_the_probe_writer_sees_and_every_letter_names_one_kind(shapes):
    capabilities = {kind.capability for kind in shapes.menu}
    assert capabilities <= {"counting", "color", "spatial", "existence"}, "a shapes scene: no chart, no text"
    counting = [kind for kind in shapes.menu if kind.capability == "counting"]
    assert len(counting) == len(QUESTION_KINDS["counting"]) * len(EDITS), "every kind of question, every edit"
    assert len(shapes.menu) <= 26, "one letter per entry"
    assert [chosen_kind(letter(shapes, kind), shapes.menu) for kind in shapes.menu] == list(shapes.menu)
    assert chosen_kind("\\boxed{Z}", shapes.menu) is None and chosen_kind("no idea", shapes.menu) is None
    assert [ProbeKind.parse(key) for key in shapes.row()["menu"]] == list(shapes.menu)


def test_a_confirmed_divergence_pays_a_valid_probe_a_little_and_a_crowd_less(shapes):
    counting = ProbeKind("counting", "all", "none")
    mirrored_text = AuditPrompt.of(render_scene(generate_scene("text", 1, seed=0)))
    silent = DivergenceReward(Silent(), REFERENCES, weights=WEIGHTS)
    rewards = call(silent, shapes, [letter(shapes, counting), "\\boxed{Z}"])
    assert rewards[0] == pytest.approx(1.0 + 0.2 - 0.2 / 2), "references agree, the target has no answer"
    assert rewards[1] == -1.0, "no letter: less than any probe earns"
    unwritable = call(silent, mirrored_text, ["\\boxed{B}"])
    assert unwritable == pytest.approx([-0.2]), "a mirrored text cannot be read: no question, only the crowd term"
    crowd = call(silent, shapes, [letter(shapes, counting)] * 3)
    assert crowd == pytest.approx([1.0 + 0.2 - 0.2] * 3), "the whole call on one kind pays the full diversity term"

    right = DivergenceReward(REFERENCES[1], REFERENCES, weights=WEIGHTS)
    assert call(right, shapes, [letter(shapes, counting)]) == pytest.approx([0.2 - 0.2]), "no divergence to find"


def test_the_verdict_names_the_failure_type(shapes):
    kind = ProbeKind("existence", "absent", "mirror")
    [verdict] = DivergenceReward(Silent(), REFERENCES).judge([kind], [shapes.image])
    assert verdict.diverged and verdict.failure_type == "existence/absent/mirror/no_answer"
