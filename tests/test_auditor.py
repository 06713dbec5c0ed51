"""The divergence auditor: real broker and tiny target model; references are the oracle (a test fixture that reads the
answer key, `tests/oracle.py`) and a stub endpoint; the leads and failure types it publishes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from collections import Counter

import httpx2
import pytest
from PIL import Image

from dpe.blobstore import BlobStore, ImageLimits
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber
from dpe.endpoint.client import EndpointClient
from dpe.endpoint.settings import EndpointSettings
from dpe.events import AuditLead, BlobRef, Checkpoint, DeadLetter, Divergence, FailureTypes, UnlabeledItem
from dpe.policy.config import TinyVLMConfig
from dpe.policy.model import build_tiny_policy
from dpe.world import generate_scene, image_sha256, render_scene, write_question
from producers.auditor.backends import EndpointAnswerer
from producers.auditor.service import Auditor, serve_auditor
from producers.auditor.settings import AuditorSettings
from tests.oracle import AnswerKeyAuditor, OracleAnswerer
from tests.test_bus import drain
from tests.test_evaluator import chat_reply

ENDPOINT = EndpointSettings(base_url="http://reference.invalid/v1", model="big-vlm", max_retries=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target") / "v1"
    build_tiny_policy(TinyVLMConfig(corpus_items=5)).save(folder)
    return folder


def unlabeled(store: BlobStore, image: Image.Image, metadata: dict) -> UnlabeledItem:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    ref = store.put_image(buffer.getvalue())
    return UnlabeledItem(item_id=ref.sha256, image=ref, source="test", metadata=metadata)


def scene_item(store: BlobStore, seed: int = 3, **extra) -> UnlabeledItem:
    scene = generate_scene("shapes", 2, seed=seed)
    return unlabeled(store, render_scene(scene), scene.to_metadata() | extra)


def truth_of(auditor: Auditor, items: list[UnlabeledItem]) -> dict[tuple[str, str], str]:
    """What a strong model knows: the right answer per (image pixels, question), from the scenes."""
    truth = {}
    for item in items:
        for view, probe in auditor.questions(item):
            answer = write_question(view.scene, probe.capability, probe.seed).answer
            truth[(image_sha256(view.image), probe.question)] = answer
    return truth


def reference_endpoint(answer_for) -> EndpointAnswerer:
    """A strong reference VLM behind an OpenAI-compatible endpoint. None can run here, so its HTTP edge
    is served in-process: it decodes the image and question from the real request and asks `answer_for`."""

    def handler(request):
        content = json.loads(request.content)["messages"][-1]["content"]
        data = base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])
        pixels = image_sha256(Image.open(io.BytesIO(data)).convert("RGB"))
        answer = answer_for(pixels, content[1]["text"].split("\n")[0])
        return chat_reply(f"The answer is \\boxed{{{answer}}}" if answer is not None else "I cannot tell.")

    client = EndpointClient(ENDPOINT, httpx2.Client(transport=httpx2.MockTransport(handler)))
    return EndpointAnswerer("big-vlm", client)


def wrong_answer(right: str) -> str:
    """A well-formed answer of the same kind that is not `right`."""
    if right.isdigit():
        return str(int(right) + 1)
    return {"yes": "no", "no": "yes", "A": "B"}.get(right, "A")


def audit_settings(**changes) -> AuditorSettings:
    defaults = {"sample_fraction": 1.0, "probes_per_item": 3, "edits_per_item": 2, "max_new_tokens": 6}
    return AuditorSettings(**(defaults | changes))


async def test_divergences_where_references_agree_and_the_target_does_not(settings, checkpoint, tmp_path):
    settings = settings.model_copy(update={"auditor": audit_settings(), "checkpoint_roots": (checkpoint.parent,)})
    store = BlobStore(settings.blob.url, settings.blob.limits)
    good = scene_item(store)
    truth = truth_of(AnswerKeyAuditor(settings.auditor, store, [OracleAnswerer()]), [good])
    references = [OracleAnswerer(), reference_endpoint(lambda pixels, question: truth.get((pixels, question)))]
    auditor = AnswerKeyAuditor(settings.auditor, store, references)
    missing_blob = good.model_copy(update={"item_id": "missing", "image": BlobRef(
        sha256="ab" * 32, media_type="image/png", size_bytes=10, width=64, height=64)})
    hostile = scene_item(store, seed=4, capabilities=["astrology"])
    broken_scene = unlabeled(store, Image.new("RGB", (8, 8)), {"kind": "shapes", "objects": "lots"})

    stop = asyncio.Event()
    service = asyncio.create_task(serve_auditor(settings, stop, auditor))
    try:
        async with AsyncPublisher(settings, producer_name="test") as pub:
            for item in (missing_blob, hostile, broken_scene):
                await pub.publish_and_wait(item)
            await pub.publish_and_wait(Checkpoint(policy_version=1, uri=str(checkpoint)))
            outside = shutil.copytree(checkpoint, tmp_path / "elsewhere")
            await pub.publish_and_wait(Checkpoint(policy_version=2, parent_version=1, uri=str(outside)))
            await pub.publish_and_wait(good)
            async with AsyncSubscriber(settings, [Divergence], group_id="t", service="t", publisher=pub) as sub:
                found = [d.event for d in await drain(sub, len(truth), timeout_s=120)]
            async with AsyncSubscriber(settings, [AuditLead], group_id="l", service="t", publisher=pub) as sub:
                leads = [d.event for d in await drain(sub, sum(d.diverged for d in found))]
            async with AsyncSubscriber(settings, [FailureTypes], group_id="f", service="t", publisher=pub) as sub:
                [tally] = [d.event for d in await drain(sub, 1)]
            async with AsyncSubscriber(settings, [DeadLetter], group_id="d", service="t", publisher=pub) as dead:
                letters = [d.event for d in await drain(dead, 4)]
    finally:
        stop.set()
        await service

    [refused] = [letter for letter in letters if letter.stage == "auditor.load"]
    assert refused.error_class == "CheckpointOutsideRoots" and str(outside) in refused.error_message
    letters.remove(refused)
    assert {letter.stage for letter in letters} == {"auditor.handle"}
    assert sorted(letter.error_class for letter in letters) == ["BlobMissing", "InvalidMetadata", "UnknownCapability"]
    assert "astrology" in next(letter.error_message for letter in letters if letter.error_class == "UnknownCapability")
    assert len(found) == len(truth), "one verdict per probe the references agree on"
    assert len({d.divergence_id for d in found}) == len(found)
    assert any(d.diverged for d in found), "the random target disagrees with references that agree"
    for divergence in found:
        assert divergence.policy_version == 1 and divergence.consensus_strength == 1.0
        assert set(divergence.reference_answers) == {"oracle", "big-vlm"}
        assert divergence.capability in ("counting", "color", "spatial", "existence")
    assert all(d.target_answer != d.consensus_answer for d in found if d.diverged)
    diverged = sorted(d.divergence_id for d in found if d.diverged)
    assert sorted(lead.divergence.divergence_id for lead in leads) == diverged
    assert all(lead.divergence.consensus_agreeing == 2 and lead.divergence.answer_type for lead in leads), \
        "a lead carries what grades its answer: both references agreed on it"
    named = Counter(d.failure_type for d in found if d.diverged)
    assert None not in named and {name: kind.count for name, kind in tally.types.items()} == named
    assert tally.policy_version == 1 and tally.audited_probes == len(found)
    assert all(0 < len(kind.exemplars) <= 3 and all(e.reason == name for e in kind.exemplars)
               for name, kind in tally.types.items())
    counterfactual = [d for d in found if d.counterfactual_of is not None]
    assert counterfactual and all(d.counterfactual_of == good.item_id and d.edit for d in counterfactual)
    assert all(store.exists(d.image) and d.image != good.image for d in counterfactual)
    assert {d.image for d in found if d.counterfactual_of is None} == {good.image}


def test_agreements_are_verdicts_too_and_a_split_is_none(tmp_path):
    store = BlobStore(str(tmp_path / "blobs"), ImageLimits())
    item = scene_item(store)
    truth = truth_of(AnswerKeyAuditor(audit_settings(), store, [OracleAnswerer()]), [item])
    assert truth, "the scene carries probes"
    right = reference_endpoint(lambda pixels, question: truth.get((pixels, question)))
    agreeing = AnswerKeyAuditor(audit_settings(), store, [OracleAnswerer(), right])
    verdicts = agreeing.audit(item, OracleAnswerer("target"), policy_version=1)
    assert len(verdicts) == len(truth) and not any(d.diverged for d in verdicts), "a right target: successes"
    assert all(d.target_answer == d.consensus_answer for d in verdicts)

    wrong = reference_endpoint(lambda pixels, question: wrong_answer(truth[(pixels, question)]))
    split = AnswerKeyAuditor(audit_settings(), store, [OracleAnswerer(), wrong])
    target = reference_endpoint(lambda pixels, question: "still another answer")
    assert split.audit(item, target, policy_version=1) == [], "a 1-1 split is no consensus"


class CountingStore(BlobStore):
    """A real blob store that counts the images written to it."""

    puts = 0

    def put_image(self, data: bytes) -> BlobRef:
        self.puts += 1
        return super().put_image(data)


def test_a_counterfactual_view_is_written_once_however_many_of_its_probes_are_verdicts(tmp_path):
    store = CountingStore(str(tmp_path / "blobs"), ImageLimits())
    item = scene_item(store)
    written_before = store.puts
    auditor = AnswerKeyAuditor(audit_settings(), store, [OracleAnswerer()])
    verdicts = auditor.audit(item, OracleAnswerer("target"), 1)
    views = Counter(d.item_id for d in verdicts if d.counterfactual_of is not None)
    assert views and max(views.values()) > 1, "a counterfactual view with several probes"
    assert store.puts - written_before == len(views)
    assert all(store.exists(d.image) for d in verdicts)


def test_generic_probes_for_images_without_scene_metadata(tmp_path):
    store = BlobStore(str(tmp_path / "blobs"), ImageLimits())
    item = unlabeled(store, Image.new("RGB", (32, 32), "red"), {"camera": "unknown"})
    answers = {"How many objects are in the image?": "1", "Is there any text in the image?": "no",
               "What is the main colour of the image?": "red"}
    references = [OracleAnswerer(), reference_endpoint(lambda pixels, question: answers[question])]
    target = reference_endpoint(lambda pixels, question: "2" if "How many" in question else answers[question])

    found = AnswerKeyAuditor(audit_settings(edits_per_item=0), store, references).audit(item, target, policy_version=0)
    assert [(d.capability, d.target_answer, d.consensus_answer, d.reference_answers) for d in found if d.diverged] == [
        ("counting", "2", "1", {"big-vlm": "1"})], "the oracle abstains without a scene"
    assert len([d for d in found if not d.diverged]) == 2, "the text and colour probes: the target agrees"
    assert AnswerKeyAuditor(audit_settings(), store, references).leads(found) == [], "one reference's word is no label"
    lenient = AnswerKeyAuditor(audit_settings(leads={"min_agreeing": 1}), store, references)
    assert [lead.divergence.capability for lead in lenient.leads(found)] == ["counting"]
    strict = AnswerKeyAuditor(audit_settings(edits_per_item=0, min_agreeing=2), store, references)
    assert strict.audit(item, target, 0) == []


class EditBlind:
    """A stand-in target that reads only the item's own image: on a counterfactual it repeats its (right) answer to
    the original question of the same capability."""

    name = "edit-blind"

    def answer(self, asked):
        oracle = OracleAnswerer().answer(asked)
        originals = {probe.capability: given for (view, probe), given in zip(asked, oracle)
                     if view.counterfactual_of is None}
        return [given if view.counterfactual_of is None else originals.get(probe.capability)
                for (view, probe), given in zip(asked, oracle)]


def test_a_target_that_ignores_the_edit_is_named_so_and_tallied_with_exemplars(tmp_path):
    store = BlobStore(str(tmp_path / "blobs"), ImageLimits())
    auditor = AnswerKeyAuditor(audit_settings(probes_per_item=4, edits_per_item=3), store, [OracleAnswerer()])
    items = [scene_item(store, seed=seed) for seed in range(12)]
    verdicts = [verdict for item in items for verdict in auditor.audit(item, EditBlind(), policy_version=1)]
    diverged = [verdict for verdict in verdicts if verdict.diverged]
    assert diverged and all(verdict.counterfactual_of is not None for verdict in diverged), "right on the originals"
    assert all(verdict.failure_type.endswith("/ignores_edit") for verdict in diverged), \
        sorted({verdict.failure_type for verdict in diverged})
    assert {verdict.failure_type.split("/")[2] for verdict in diverged} <= {"mirror", "remove"}
    tally = auditor.tally
    tally.add(verdicts)
    published = tally.event(producer="auditor")
    assert published.audited_probes == len(verdicts) and not tally.changed
    assert {name: kind.count for name, kind in published.types.items()} == Counter(v.failure_type for v in diverged)
    assert max(len(kind.exemplars) for kind in published.types.values()) == 3
    tally.add([verdicts[0].model_copy(update={"policy_version": 2})])
    assert tally.event(producer="auditor").audited_probes == 1, "a new target version starts a new tally"


def test_rate_limit_audits_a_stable_share():
    chosen = [Auditor.selected_fraction(f"item-{i}", 0.25, seed=0) for i in range(4000)]
    assert 0.22 < sum(chosen) / len(chosen) < 0.28
    assert chosen == [Auditor.selected_fraction(f"item-{i}", 0.25, seed=0) for i in range(4000)]
