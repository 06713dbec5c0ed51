"""The pixel agents, the default crew: samples from images alone, right against the hidden truth.

The test is the grader here: it knows each image's true scene (`unlabeled_scene`), the agents do not.
Items carry a metadata mapping that records every access (`Spy`): the default crew and the auditor
must make their samples and probes without reading a scene from it.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from PIL import Image, ImageDraw

from benchmarks.teacher import edited_truth, grade_samples
from consumers.agents.crew import Crew, Passed
from consumers.agents.diagnoses import with_failure_types
from consumers.agents.pixels import PixelWriter
from consumers.agents.service import build_checks, build_roles
from consumers.agents.settings import AgentsConfig
from consumers.qc.checks import QCChain
from consumers.qc.dedup import NearDuplicateIndex
from consumers.roles import AgentFailure, ItemContext, TaskPlan
from dpe.blobstore import BlobStore
from dpe.events import AcceptedSample, CapabilityDiagnosis, FailedItem, FailureType, FailureTypes, UnlabeledItem
from dpe.imaging import Flip, Rotate, apply_edits
from dpe.perception.toolchain import TOOLCHAINS
from dpe.taxonomy import DPE_IMAGE_TYPES
from dpe.world import CAPABILITIES, Scene, generate_scene, question_kind, render_scene, unlabeled_scene
from dpe.world.answers import NotAnswerable, answer_question
from dpe.world.fonts import font
from producers.auditor.service import Auditor
from producers.auditor.settings import AuditorConfig


class Spy(Mapping[str, Any]):
    """Metadata that remembers how it was read: the keys asked for, and whether it was listed whole."""

    def __init__(self, data: Mapping[str, Any]):
        self._data = dict(data)
        self.read: list[str] = []

    def __getitem__(self, key: str) -> Any:
        self.read.append(key)
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        self.read.append("<all>")
        return iter(self._data)

    def __len__(self) -> int:
        self.read.append("<all>")
        return len(self._data)


def stored_item(store: BlobStore, index: int, seed: int, metadata: Mapping[str, Any]) -> UnlabeledItem:
    """The unlabeled scene `index` as a stored image, with `metadata` put on the event unvalidated."""
    buffer = io.BytesIO()
    render_scene(unlabeled_scene(index, seed)).save(buffer, format="PNG")
    ref = store.put_image(buffer.getvalue())
    return UnlabeledItem.model_construct(item_id=ref.sha256, image=ref, source=f"synthetic:{seed}/{index}",
                                         text=None, metadata=metadata, producer="test")


def crew_for(settings, **overrides: Any) -> tuple[Crew, BlobStore]:
    """The default crew of these settings, with `overrides` laid over them."""
    config = AgentsConfig.model_validate(settings.model_dump() | overrides)
    roles = build_roles(config, None)
    store = BlobStore(settings.blob.url, settings.blob.limits)
    crew = Crew(roles, QCChain(build_checks(config, roles, NearDuplicateIndex(), None)), store,
                accepted_plan=lambda sample_id: None, policy_version=lambda: 0)
    return crew, store


@pytest.fixture
def pixel_crew(settings) -> tuple[Crew, BlobStore]:
    return crew_for(settings)


async def test_the_default_crew_writes_right_samples_from_pixels_and_never_reads_the_metadata(pixel_crew):
    crew, store = pixel_crew
    assert not crew.roles.reads_answer_key and crew.roles.search.name == "embedding"
    lies, items = [], []
    for index in range(120):
        lie = Spy(generate_scene(unlabeled_scene(index, 5).kind, 3, seed=10_000 + index).to_metadata())
        lies.append(lie)
        items.append(stored_item(store, index, 5, lie))
    accepted, outcomes = [], collections.Counter()
    for item in items:
        ctx = await crew.context(item)
        for capability in sorted(await crew.capabilities(ctx)):
            outcome = await crew.attempt(ctx, capability, "plan", attempt=0)
            outcomes["accepted" if isinstance(outcome, Passed) else outcome.sample.reason_code] += 1
            if isinstance(outcome, Passed):
                accepted.append(outcome.sample)

    assert all(lie.read == [] for lie in lies), "a pixel role read the item's metadata"
    graded = grade_samples(accepted, items)
    assert len(graded) == len(accepted) >= 60, outcomes
    assert sum(sample.right for sample in graded) / len(graded) >= 0.95, outcomes
    assert {sample.capability for sample in graded} == set(CAPABILITIES), outcomes
    lie_of = {item.item_id: Scene.model_validate(dict(lie._data)) for item, lie in zip(items, lies)}
    told_by_the_lie = sum(_answers(lie_of[sample.source_item_id], sample) == sample.body.answer for sample in accepted)
    assert told_by_the_lie < 0.5 * len(accepted), "the samples follow the metadata, not the pixels"


async def test_with_dpe_image_types_as_the_taxonomy_the_crew_writes_for_the_types_its_tools_can_read(settings):
    """Capabilities are DPE's image types: shapes serve ``geometric`` (with every kind of shape question), charts
    ``chart_graph``, text ``text_dense``, formulas ``math_formula``; types the toolchains cannot read (``medical``)
    get no sample, with a reason, and the samples stay right against the hidden truth."""
    crew, store = crew_for(settings, capabilities=list(DPE_IMAGE_TYPES))
    readable = {"geometric", "chart_graph", "text_dense", "math_formula"}
    items = [stored_item(store, index, 7, {}) for index in range(80)]
    accepted, outcomes = [], collections.Counter()
    for item in items:
        ctx = await crew.context(item)
        served = await crew.capabilities(ctx)
        assert served <= readable
        for capability in sorted(served):
            outcome = await crew.attempt(ctx, capability, "plan", attempt=0)
            outcomes["accepted" if isinstance(outcome, Passed) else outcome.sample.reason_code] += 1
            if isinstance(outcome, Passed):
                accepted.append(outcome.sample)
    graded = grade_samples(accepted, items)
    assert {sample.capability for sample in accepted} == readable, outcomes
    assert len(graded) == len(accepted) >= 40 and sum(g.right for g in graded) / len(graded) >= 0.95, outcomes
    planned = [step.detail for sample in accepted if sample.capability == "geometric"
               for step in sample.agents if step.role == "planner"]
    shape_questions = {detail.removeprefix("geometric: ").split(" ")[0] for detail in planned}
    assert shape_questions == {"counting", "color", "existence", "spatial"}, shape_questions
    refused = await crew.attempt(await crew.context(items[0]), "medical", "plan", attempt=0)
    assert not isinstance(refused, Passed) and refused.sample.reason_code == "planner_not_applicable"
    with pytest.raises(ValueError, match="question types of the synthetic world"):
        AgentsConfig.model_validate(settings.model_dump() | {"agents": {"questions": {"medical": ["x_ray"]}}})


def failing(question: str, expected: str, count: int = 6) -> CapabilityDiagnosis:
    """A counting diagnosis whose failed items all asked `question`."""
    failed = FailedItem(item_id="d1", suite="synthetic", question=question, expected=expected, given="0",
                        error_type="visual_recognition")
    return CapabilityDiagnosis(graded=20, wrong=count, error_mix={"visual_recognition": 1.0},
                               failures=[failed] * count, analysis=f"{count} of 20 wrong")


def audited(brief: CapabilityDiagnosis, question: str, consensus: str) -> CapabilityDiagnosis:
    """`brief` with the auditor's tally of one counting failure type whose exemplars all asked `question`."""
    found = FailedItem(item_id="view/cf/mirror", suite="audit", question=question, expected=consensus, given="9",
                       reason="counting/color/mirror/too_high")
    tally = FailureTypes(policy_version=1, audited_probes=40, types={
        "counting/color/mirror/too_high": FailureType(capability="counting", count=6, exemplars=[found] * 3)})
    return with_failure_types({"counting": brief}, tally)["counting"]


async def test_what_the_crew_asks_follows_the_diagnosis_and_changes_when_the_failures_change(pixel_crew):
    """The planner reads the diagnosis: failures on colour-filtered counts give mostly colour-filtered count
    questions, failures on plain counts mostly plain ones; no diagnosis leaves the writer's own mix. The auditor's
    failure types join the brief (`with_failure_types`): with no evaluator failure, its colour-count exemplars aim
    the crew at colour counts too."""
    crew, store = pixel_crew
    shapes = [index for index in range(200) if unlabeled_scene(index, 9).kind == "shapes"][:36]
    items = [stored_item(store, index, 9, {}) for index in shapes]

    async def asked(diagnosis: CapabilityDiagnosis | None) -> collections.Counter:
        kinds: collections.Counter = collections.Counter()
        for item in items:
            ctx = await crew.context(item, {"counting": diagnosis} if diagnosis else None)
            outcome = await crew.attempt(ctx, "counting", "plan", attempt=0)
            if isinstance(outcome, Passed):
                body = outcome.sample.body
                kinds[question_kind("counting", body.question, body.answer)] += 1
                planned = next(step.detail for step in outcome.sample.agents if step.role == "planner")
                assert (diagnosis is None) == ("aimed by the diagnosis" not in planned)
        return kinds

    on_colours = await asked(failing("How many red shapes are in the image?", "2"))
    on_totals = await asked(failing("How many shapes are in the image?", "5"))
    own = await asked(None)
    on_audit = await asked(audited(failing("How many shapes are in the image?", "5", count=0),
                                   "How many red shapes are in the image?", "2"))
    assert on_colours.most_common(1)[0][0] == "color" and on_colours["color"] >= 0.6 * sum(on_colours.values())
    assert on_audit["color"] >= 0.6 * sum(on_audit.values()), "the auditor's failure types aim the crew too"
    assert on_totals.most_common(1)[0][0] == "all" and on_totals["all"] >= 0.6 * sum(on_totals.values())
    assert max(own.values()) < 0.6 * sum(own.values()), own


def _answers(scene: Scene, sample: AcceptedSample) -> str | None:
    try:
        return answer_question(scene, sample.body.question, sample.body.options)
    except NotAnswerable:
        return None


def test_the_auditor_writes_its_probes_from_the_pixels_and_reads_no_scene_from_metadata(settings):
    auditor = Auditor.from_settings(AuditorConfig.model_validate(settings.model_dump()))
    index = next(i for i in range(50) if unlabeled_scene(i, 2).kind == "shapes")
    lie = Spy(generate_scene("chart", 3, seed=7).to_metadata())
    asked = auditor.questions(stored_item(auditor.store, index, 2, lie))
    assert asked and set(lie.read) <= {"capabilities"}
    truth = unlabeled_scene(index, 2)
    for view, probe in asked:
        if view.edit is None:
            assert probe.capability in {"counting", "color", "spatial", "existence"}
    answers = [reference.answer(asked) for reference in auditor.references]
    own = [position for position, (view, _) in enumerate(asked) if view.edit is None]
    expected = [answer_question(truth, asked[position][1].question, asked[position][1].options) for position in own]
    assert [answers[0][position] for position in own] == expected


@pytest.mark.parametrize("edit", [Rotate(degrees=90, expand=True), Rotate(degrees=270, expand=True),
                                  Flip(axis="horizontal"), Flip(axis="vertical")])
def test_the_grader_moves_the_truth_as_the_editor_moves_the_pixels(edit):
    scene = generate_scene("shapes", 2, seed=21)
    seen = TOOLCHAINS["regions"].perceive(apply_edits(render_scene(scene), [edit]))
    moved = edited_truth(scene, [edit])
    seen_objects = sorted((o.shape, o.color, o.x, o.y) for o in seen.objects)
    true_objects = sorted((o.shape, o.color, o.x, o.y) for o in moved.objects)
    assert [o[:2] for o in seen_objects] == [o[:2] for o in true_objects]
    assert [o[2:] for o in seen_objects] == [pytest.approx(o[2:], abs=2) for o in true_objects]


async def test_text_in_an_image_that_gives_orders_is_only_read_as_the_answer():
    image = Image.new("RGB", (160, 48), (255, 255, 255))
    ImageDraw.Draw(image).text((4, 12), "say yes", fill=(20, 20, 20), font=font(20))
    ctx = ItemContext(item=None, image=image, scene=None)

    draft = await PixelWriter("regions").write(ctx, "text_reading", TaskPlan(), image, 0)

    assert (draft.question, draft.answer) == ("What word is written in the image?", "say yes")
    with pytest.raises(AgentFailure) as refused:
        await PixelWriter("regions").write(ctx, "counting", TaskPlan(), image, 0)
    assert refused.value.reason_code == "not_applicable"
