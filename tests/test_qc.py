"""Quality control: format checks, programmatic validator and answerer, near-duplicates (rebuilt from the
accepted topic), the difficulty band on the tiny policy, and per-reason metrics."""

from __future__ import annotations

import asyncio
import io
import itertools
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client import REGISTRY

from consumers.agents.programmatic import ProgrammaticAnswerer, ProgrammaticValidator, ProgrammaticWriter
from consumers.agents.service import AgentWorker
from consumers.qc.checks import (
    AgreementCheck,
    AnswerabilityCheck,
    Candidate,
    DifficultyCheck,
    QCChain,
    SchemaCheck,
    schema_problem,
)
from consumers.qc.dedup import DedupKey, NearDuplicateIndex
from consumers.qc.difficulty import PolicyHolder, PolicyPassRate, decided, next_stage
from consumers.qc.settings import DifficultySettings
from consumers.roles import AnswererQuestion, ItemContext, TaskPlan
from dpe import inference
from dpe.blobstore import BlobStore
from dpe.bus.aio import AsyncPublisher
from dpe.config import with_overrides
from dpe.events import AcceptedSample, BlobRef, Checkpoint, RejectedSample, SampleBody, UnlabeledItem
from dpe.imaging import Compose, Flip, Recolor, Rotate, Zoom
from dpe.policy.checkpoints import load_checkpoint
from dpe.world import generate_scene, render_scene, scene_capabilities, unlabeled_scene, write_question
from producers.ingest.service import Ingestor
from producers.ingest.sources import synthetic_entries
from tests.agent_helpers import eventually, plan, png, publish_all, read_all

REF = BlobRef(sha256="0" * 64, media_type="image/png", size_bytes=1, width=64, height=64)


def body(**changes) -> SampleBody:
    fields = dict(image=REF, question="What colour is the circle?", answer="B", answer_type="choice",
                  options=["red", "blue", "green"])
    return SampleBody(**(fields | changes))


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"options": ["red", "blue"], "answer": "A"}, "too_few_options"),
    ({"options": [str(i) for i in range(9)], "answer": "A"}, "too_many_options"),
    ({"options": ["red", "Red!", "green"]}, "duplicate_options"),
    ({"answer": "D"}, "bad_choice_letter"),
    ({"answer": "blue"}, "bad_choice_letter"),
    ({"answer_type": "number", "answer": "3", "options": ["1", "2", "3"]}, "unexpected_options"),
    ({"answer_type": "number", "answer": "three", "options": None}, "answer_not_number"),
    ({"answer_type": "number", "answer": "1,000", "options": None}, None),
    ({"answer_type": "yes_no", "answer": "maybe", "options": None}, "answer_not_yes_no"),
    ({"answer_type": "text", "answer": "?!", "options": None}, "empty_answer"),
    ({"answer_type": "text", "answer": "x" * 101, "options": None}, "answer_too_long"),
    ({"answer_type": "text", "answer": "circle", "options": None}, "answer_in_question"),
])
def test_schema_check_reason_codes(changes, reason):
    problem = schema_problem(body(**changes), min_options=3, max_options=8)
    assert (problem[0] if problem else None) == reason


def context(scene) -> ItemContext:
    item = UnlabeledItem(item_id="i" * 64, image=REF, source="test", metadata=scene.to_metadata())
    return ItemContext(item=item, image=render_scene(scene), scene=scene)


async def test_programmatic_answerer_agrees_with_the_writer_on_every_capability():
    answerer, writer = ProgrammaticAnswerer(), ProgrammaticWriter()
    checked = 0
    for index in range(120):
        scene = unlabeled_scene(index, seed=5)
        for capability in scene_capabilities(scene):
            for edits in ([], [Compose(place="right")]):
                ctx = context(scene)
                draft = await writer.write(ctx, capability, TaskPlan(edits=edits), ctx.image, attempt=index)
                question = AnswererQuestion(draft.question, draft.answer_type, tuple(draft.options or ()) or None)
                assert await answerer.answer(ctx, TaskPlan(edits=edits), ctx.image, question) == draft.answer
                checked += 1
    assert checked > 300


async def test_programmatic_validator_refuses_edits_that_change_or_hide_the_answer():
    validator = ProgrammaticValidator()
    scene = next(s for s in (generate_scene("shapes", 3, seed=i) for i in range(200)) if "spatial" in scene_capabilities(s))
    ctx = context(scene)
    spatial = await ProgrammaticWriter().write(ctx, "spatial", TaskPlan(), ctx.image, 0)
    colour = write_question(scene, "existence", seed=0)
    colour_draft = spatial.model_copy(update={"question": colour.question, "answer": colour.answer,
                                              "answer_type": "yes_no", "options": None})

    async def verdict(draft, *edits):
        return (await validator.validate(ctx, TaskPlan(edits=list(edits)), ctx.image, draft)).answerable

    assert await verdict(spatial) and await verdict(spatial, Zoom(factor=0.8))
    assert not await verdict(spatial, Flip()) and not await verdict(spatial, Rotate(degrees=90, expand=True))
    assert await verdict(colour_draft, Rotate(degrees=90, expand=True))
    assert not await verdict(colour_draft, Recolor(mode="hue_shift"))
    assert not await verdict(colour_draft, Zoom(factor=2.0)), "zooming in may cut objects off"
    assert not await verdict(colour_draft, Zoom(factor=0.25)), "objects this small cannot be seen"


def test_near_duplicates_need_the_same_picture_and_the_same_question():
    image = render_scene(generate_scene("chart", 3, seed=1))
    recompressed = Image.open(io.BytesIO(jpeg(image.resize((60, 60)).resize((64, 64)))))
    index = NearDuplicateIndex()
    index.add("s1", DedupKey.of(image, "What is the value of the red bar?"))
    assert index.find(DedupKey.of(recompressed, "What is the value of the red bar ?")) == "s1"
    assert index.find(DedupKey.of(image, "Which bar is the tallest?")) is None
    scenes = [unlabeled_scene(i, seed=7) for i in range(400)]
    for scene in scenes:
        index.add(str(scene.seed), DedupKey.of(render_scene(scene), "same question"))
    content = {str(s.seed): s.model_dump(exclude={"seed", "noise", "background", "clutter"}) for s in scenes}
    for scene in scenes:
        twin = index.find(DedupKey.of(render_scene(scene), "same question"))
        assert twin is not None and content[twin] == content[str(scene.seed)], "only scenes with the same content collide"


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def _metric(check: str, reason: str) -> float:
    return REGISTRY.get_sample_value("dpe_qc_checks_total", {"check": check, "reason": reason}) or 0.0


async def test_chain_stops_at_the_first_failure_and_counts_each_reason():
    scene = generate_scene("formula", 1, seed=4)
    ctx = context(scene)
    draft = await ProgrammaticWriter().write(ctx, "arithmetic", TaskPlan(), ctx.image, 0)
    chain = QCChain([SchemaCheck(), AnswerabilityCheck(ProgrammaticValidator()), AgreementCheck(ProgrammaticAnswerer())])

    def candidate(answer: str) -> Candidate:
        wrong = draft.model_copy(update={"answer": answer})
        return Candidate(ctx=ctx, capability="arithmetic", plan=TaskPlan(), image=ctx.image, draft=wrong,
                         body=body(question=wrong.question, answer=answer, answer_type="number", options=None))

    before = {key: _metric(*key) for key in [("agreement", "ok"), ("agreement", "disagree"), ("schema", "answer_not_number")]}
    good = await chain.run(candidate(draft.answer))
    wrong = await chain.run(candidate(str(int(draft.answer) + 1)))
    broken = await chain.run(candidate("seven"))
    assert [v.reason_code for v in good] == ["ok", "ok", "ok"]
    assert [v.reason_code for v in wrong] == ["ok", "ok", "disagree"]
    assert [v.reason_code for v in broken] == ["answer_not_number"], "the chain stops at the first failure"
    assert _metric("agreement", "ok") == before[("agreement", "ok")] + 1
    assert _metric("agreement", "disagree") == before[("agreement", "disagree")] + 1
    assert _metric("schema", "answer_not_number") == before[("schema", "answer_not_number")] + 1


@pytest.fixture(scope="module")
def tiny_policy_folder(tmp_path_factory):
    from dpe.policy.config import TinyVLMConfig
    from dpe.policy.model import build_tiny_policy

    return str(build_tiny_policy(TinyVLMConfig(corpus_items=10)).save(tmp_path_factory.mktemp("policy") / "v0"))


async def test_difficulty_band_uses_the_newest_checkpoint(tiny_policy_folder):
    holder = PolicyHolder(base_policy=tiny_policy_folder, roots=[Path(tiny_policy_folder).parent])
    await holder.start()
    assert holder.get().version == 0
    await holder.use(Checkpoint(policy_version=3, uri=tiny_policy_folder))
    await holder.use(Checkpoint(policy_version=2, uri="/nonexistent/older"))
    assert holder.get().version == 3, "older checkpoints are ignored"
    scene = generate_scene("shapes", 1, seed=0)
    ctx = context(scene)
    draft = await ProgrammaticWriter().write(ctx, "counting", TaskPlan(), ctx.image, 0)
    sample = body(question=draft.question, answer=draft.answer, answer_type=draft.answer_type, options=None)
    candidate = Candidate(ctx=ctx, capability="counting", plan=TaskPlan(), image=ctx.image, draft=draft, body=sample)
    settings = DifficultySettings(enabled=True, samples=3, min_correct=0, max_correct=2, max_new_tokens=4)
    estimator = PolicyPassRate(holder, settings)
    try:
        accepted = await DifficultyCheck(estimator, settings)(candidate)
        hard = await DifficultyCheck(estimator, settings.model_copy(update={"min_correct": 3, "max_correct": 3}))(candidate)
    finally:
        await estimator.close()
    assert accepted.passed and accepted.reason_code == "ok" and candidate.policy_version == 3
    assert 0.0 <= candidate.pass_rate <= 1.0 and "policy v3 solved" in accepted.detail
    assert hard.reason_code in ("too_hard", "ok") and (hard.reason_code == "ok") == (candidate.pass_rate == 1.0)


async def test_a_checkpoint_loaded_while_the_base_policy_loads_is_kept(tiny_policy_folder, monkeypatch):
    """A resumed run announces its newest checkpoint at once: loaded while the base is still loading, it stays
    the policy the band measures with (the base used to overwrite it, and the samples were made for version 0)."""
    holder = PolicyHolder(base_policy=tiny_policy_folder, roots=[Path(tiny_policy_folder).parent])
    checkpoint_loaded = threading.Event()

    def load(folder: str, **options: Any) -> Any:
        if options.get("roots") is None:  # the base policy: its load ends after the checkpoint's
            checkpoint_loaded.wait(30)
        return load_checkpoint(folder, **options)

    monkeypatch.setattr(inference, "load_checkpoint", load)
    starting = asyncio.create_task(holder.start())
    await asyncio.sleep(0)
    await holder.use(Checkpoint(policy_version=3, uri=tiny_policy_folder))
    checkpoint_loaded.set()
    await starting
    assert holder.get().version == 3


@pytest.mark.parametrize("band", [(9, 3, 7), (9, 0, 8), (5, 1, 4), (8, 4, 4), (3, 0, 3)])
def test_the_band_stops_early_only_when_the_full_k_would_give_the_same_verdict(band):
    """For every sequence of right and wrong answers, rolling out in `next_stage` stages until `decided` gives the
    verdict all k rollouts give (the check's rule: below, above or inside the band), never with more rollouts."""
    k, low, high = band
    settings = DifficultySettings(samples=k, min_correct=low, max_correct=high)

    def verdict(correct: int, done: int) -> str:
        return "too_hard" if correct + k - done < low else "too_easy" if correct > high else "ok"

    spent = []
    for answers in itertools.product((0, 1), repeat=k):
        correct = done = 0
        while stage := next_stage([correct], [done], settings):
            correct, done = correct + sum(answers[done : done + stage]), done + stage
        assert decided(correct, done, settings) and done <= k
        assert verdict(correct, done) == verdict(sum(answers), k), (answers, correct, done)
        spent.append(done)
    if band == (9, 3, 7):
        assert max(spent) == 9 and sum(spent) / len(spent) < 7.5, "the reference band saves rollouts on average"


def agent_settings(settings, **agents):
    group = f"agents-{settings.kafka.topic_prefix}"
    return settings.model_copy(update={"agents": settings.agents.model_validate(
        settings.agents.model_dump() | {"group_id": group} | agents)})


@asynccontextmanager
async def running_worker(settings):
    stop, ready = asyncio.Event(), asyncio.Event()
    worker = AgentWorker(settings)
    task = asyncio.create_task(worker.run(stop, ready))
    await asyncio.wait_for(ready.wait(), 90)
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_near_duplicate_state_is_rebuilt_from_the_accepted_topic(settings):
    settings = agent_settings(settings, edit_rate=0.0)
    store = BlobStore(settings.blob.url, settings.blob.limits)
    scene = generate_scene("text", 2, seed=9)
    image = render_scene(scene)
    ref = store.put_image(png(image))
    earlier = AcceptedSample(sample_id="a" * 64, capability="text_reading", source_item_id=ref.sha256, plan_id="older",
                             agents=[], qc=[], policy_version=0,
                             body=SampleBody(image=ref, question="What word is written in the image?",
                                             answer=scene.text.text, answer_type="text"))
    touched = image.copy()
    touched.putpixel((0, 0), (0, 0, 0))
    twin_ref = store.put_image(png(touched))
    twin = UnlabeledItem(item_id=twin_ref.sha256, image=twin_ref, source="test", metadata=scene.to_metadata())
    await publish_all(settings, [earlier, plan({"text_reading": 4}), twin])

    async def rejected() -> list[RejectedSample]:
        return [r for r in await read_all(settings, RejectedSample) if r.source_item_id == twin.item_id]

    async with running_worker(settings):
        assert await eventually(lambda: _count(rejected, 3), 60)
    reasons = [r.reason_code for r in await rejected()]
    assert reasons == ["near_duplicate"] * 3
    assert all("a" * 64 in next(v for v in r.qc if not v.passed).detail for r in await rejected())
    assert not [s for s in await read_all(settings, AcceptedSample) if s.source_item_id == twin.item_id]


async def _count(read, n: int) -> bool:
    return len(await read()) >= n


async def test_worker_records_the_checkpoint_it_measured_difficulty_against(settings, tiny_policy_folder):
    settings = agent_settings(settings, qc={"difficulty": {"enabled": True, "samples": 3, "min_correct": 0,
                                                           "max_correct": 2, "max_new_tokens": 4}})
    settings = with_overrides(settings, {"checkpoint_roots": [str(Path(tiny_policy_folder).parent)]})
    quotas = {"counting": 2, "text_reading": 2}
    await publish_all(settings, [Checkpoint(policy_version=3, uri=tiny_policy_folder), plan(quotas)])
    async with AsyncPublisher(settings) as publisher:
        await Ingestor.from_settings(settings, publisher).ingest(synthetic_entries(80, seed=4))

    async def filled() -> bool:
        return len({s.sample_id for s in await read_all(settings, AcceptedSample)}) >= 4

    async with running_worker(settings):
        assert await eventually(filled, 90)
    for sample in await read_all(settings, AcceptedSample):
        assert sample.policy_version == 3 and sample.pass_rate is not None
        verdicts = {verdict.check: verdict for verdict in sample.qc}
        assert verdicts["difficulty"].passed and all(verdict.passed for verdict in sample.qc)
        assert [verdict.check for verdict in sample.qc][-3:] == ["difficulty", "answerability", "agreement"], \
            "the band, which turns down most candidates for the least time, goes before the pixel checks"


async def test_a_band_rejection_ends_the_attempts_at_that_capability_on_that_item(settings, tiny_policy_folder):
    """The band's verdict is on the item (too hard for the current policy), so the crew does not retry the capability
    on it, although other rejections are retried up to `attempts_per_item` times."""
    settings = agent_settings(settings, attempts_per_item=3,
                              qc={"difficulty": {"enabled": True, "samples": 3, "min_correct": 3, "max_correct": 3,
                                                 "max_new_tokens": 4}})
    settings = with_overrides(settings, {"checkpoint_roots": [str(Path(tiny_policy_folder).parent)]})
    await publish_all(settings, [Checkpoint(policy_version=1, uri=tiny_policy_folder),
                                 plan({"counting": 50, "arithmetic": 50})])
    async with AsyncPublisher(settings) as publisher:
        await Ingestor.from_settings(settings, publisher).ingest(synthetic_entries(40, seed=5))

    async def judged() -> bool:
        return len([s for s in await read_all(settings, RejectedSample) if s.reason_code == "too_hard"]) >= 10

    async with running_worker(settings):
        assert await eventually(judged, 90)
    too_hard = [(s.source_item_id, s.capability) for s in await read_all(settings, RejectedSample)
                if s.reason_code == "too_hard"]
    assert len(too_hard) >= 10 and len(set(too_hard)) == len(too_hard), "one band rejection per item and capability"


async def test_capabilities_the_band_keeps_nothing_of_are_out_of_reach_and_no_longer_attempted(settings,
                                                                                            tiny_policy_folder):
    """With a random policy that solves nothing and a band that wants one right answer, every candidate is too hard:
    after `reach_evidence` verdicts a capability is out of reach (ledger, gauge), and the worker stops spending
    rollouts on it while its quota is still open, until the next checkpoint."""
    settings = agent_settings(settings, qc={"difficulty": {"enabled": True, "samples": 2, "min_correct": 1,
                                                           "max_correct": 2, "max_new_tokens": 4, "reach_evidence": 5,
                                                           "batch_size": 16}})  # items in flight: concurrency, 16
    settings = with_overrides(settings, {"checkpoint_roots": [str(Path(tiny_policy_folder).parent)]})
    await publish_all(settings, [Checkpoint(policy_version=2, uri=tiny_policy_folder),
                                 plan({"counting": 100, "arithmetic": 100})])
    async with AsyncPublisher(settings) as publisher:
        await Ingestor.from_settings(settings, publisher).ingest(synthetic_entries(200, seed=6))

    async with running_worker(settings) as worker:
        assert await eventually(lambda: _out_of_reach(worker, {"counting", "arithmetic"}), 90)
        judged = await _settled(lambda: read_all(settings, RejectedSample))  # the attempts then in flight end
        await asyncio.sleep(2)
        rejected = await read_all(settings, RejectedSample)
        assert len(rejected) == judged, "nothing more is attempted"
        reasons = Counter(sample.reason_code for sample in rejected)
        assert worker.reach.version == 2 and all(left > 50 for left in worker.ledger.remaining().values())
        gauge = {labels["capability"]: value for _, labels, value in _samples("dpe_agent_out_of_reach")}
        assert gauge == {name: float(name in ("counting", "arithmetic")) for name in settings.capabilities}
        await publish_all(settings, [Checkpoint(policy_version=3, uri=tiny_policy_folder)])

        async def retried() -> bool:
            return any(s.policy_version == 3 for s in await read_all(settings, RejectedSample))

        assert await eventually(retried, 60), "a new checkpoint tries every capability again"
    verdicts = reasons["too_hard"] + reasons["too_easy"]
    assert verdicts <= 2 * (5 + settings.agents.concurrency), f"evidence + attempts in flight: {reasons}"


async def _settled(read, quiet_s: float = 1.0, timeout_s: float = 30.0) -> int:
    """How many events `read` finds once the count stopped growing for `quiet_s`."""
    count, deadline = len(await read()), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = len(await read())
        if now == count:
            return count
        count = now
    raise TimeoutError(f"still growing after {timeout_s} s")


async def _out_of_reach(worker, capabilities: set[str]) -> bool:
    return worker.ledger.out_of_reach == capabilities


def _samples(name: str):
    return [(sample.name, sample.labels, sample.value) for metric in REGISTRY.collect() for sample in metric.samples
            if sample.name == name]
