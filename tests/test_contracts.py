"""Event contracts: envelope, versions, keys, the committed AsyncAPI document and compatibility."""

from __future__ import annotations

import json
from typing import Literal, Optional

import jsonschema
import pytest
from pydantic import Field, ValidationError, create_model

from dpe import events
from dpe.bus.codec import InvalidEvent, decode, encode
from dpe.events import (
    EVENT_MODELS,
    AcceptedSample,
    AgentStep,
    AuditLead,
    AuditorCheckpoint,
    BlobRef,
    CapabilityDiagnosis,
    CapabilityWeakness,
    Checkpoint,
    DeadLetter,
    Diagnosis,
    Divergence,
    EvalOutcome,
    Event,
    FailedItem,
    FailureType,
    FailureTypes,
    OffsetRange,
    QCVerdict,
    QuotaPlan,
    RejectedSample,
    SampleBody,
    UnlabeledItem,
    WeaknessSnapshot,
)
from dpe.schema import SCHEMA_FILE, asyncapi, committed, compatibility_problems, payloads, render_document
from dpe.topics import MODEL_TOPIC, TOPICS

BLOB = BlobRef(sha256="a" * 64, media_type="image/png", size_bytes=10, width=4, height=4)


def outcome(**changes) -> EvalOutcome:
    fields = dict(policy_version=2, suite="synthetic", item_id="x1", capability="counting", answer_type="number",
                  expected="3", predicted="\\boxed{3}", correct=True, score=1.0)
    return EvalOutcome(**(fields | changes))


def test_every_event_model_has_exactly_one_topic():
    assert set(MODEL_TOPIC) == set(EVENT_MODELS)
    assert len({spec.suffix for spec in TOPICS.values()}) == len(TOPICS)


def test_envelope_is_filled_and_round_trips_as_json():
    event = outcome()
    assert event.schema_version == EvalOutcome.SCHEMA_VERSION
    assert len(event.event_id) == 32 and event.ts.tzinfo is not None
    again = EvalOutcome.model_validate_json(event.model_dump_json())
    assert again == event


def test_keys_follow_the_documented_partitioning():
    assert outcome().key() == "counting"
    assert outcome().outcome_id == "2/synthetic/x1"
    assert UnlabeledItem(item_id="abc", image=BLOB, source="synthetic:1").key() == "abc"
    assert Checkpoint(policy_version=1, uri="/c").key() == "policy"
    assert example(AuditorCheckpoint).key() == "auditor", "one compacted key: the newest auditor model stays"
    assert example(AuditLead).key() == "abc/cf/mirror", "a lead is keyed like the unlabeled image it is about"


def test_future_and_too_old_schema_versions_are_refused_clearly():
    data = outcome().model_dump(mode="json")
    with pytest.raises(ValidationError, match="newer than this reader understands"):
        EvalOutcome.model_validate(data | {"schema_version": 2})
    with pytest.raises(ValidationError, match="older than the oldest"):
        EvalOutcome.model_validate(data | {"schema_version": -1})


def test_readers_ignore_fields_added_by_newer_writers():
    data = outcome().model_dump(mode="json") | {"added_later": {"anything": 1}}
    assert EvalOutcome.model_validate(data).item_id == "x1"


def test_invalid_values_are_refused():
    with pytest.raises(ValidationError, match="finite number"):
        outcome(score=float("nan"))
    with pytest.raises(ValidationError):
        outcome(score=1.5)
    with pytest.raises(ValidationError):
        outcome(item_id="../../etc/passwd x")
    with pytest.raises(ValidationError, match="over the budget"):
        QuotaPlan(round=0, strategy="uniform", budget=3, quotas={"a": 2, "b": 2}, weights={}, snapshot_id="s",
                  policy_version=0)


def test_events_are_immutable():
    with pytest.raises(ValidationError):
        outcome().correct = False


def test_committed_document_is_current():
    assert SCHEMA_FILE.read_text() == render_document(asyncapi()), "regenerate with `dpe topics schema --write`"


@pytest.mark.parametrize("name", sorted(payloads(asyncapi())))
def test_models_stay_compatible_with_the_committed_contract(name):
    old = payloads(committed())[name]
    new = payloads(asyncapi())[name]
    assert compatibility_problems(old, new) == []


def test_committed_schemas_validate_real_events_with_a_standard_validator():
    documents = payloads(committed())
    event = outcome()
    schema = documents["EvalOutcome"]
    jsonschema.validate(event.model_dump(mode="json"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(event.model_dump(mode="json") | {"answer_type": "essay"}, schema)


def _changed(base: type, **fields) -> dict:
    model = create_model(f"Changed{base.__name__}", __base__=base, **fields)
    return model.model_json_schema(ref_template="#/$defs/{model}") | {"x-schema-version": base.SCHEMA_VERSION}


def _schema(model: type) -> dict:
    return model.model_json_schema(ref_template="#/$defs/{model}") | {"x-schema-version": model.SCHEMA_VERSION}


BREAKING = {
    "type change": dict(policy_version=(str, ...)),
    "new required field": dict(judge=(str, ...)),
    "enum widened": dict(answer_type=(Literal["choice", "number", "yes_no", "text", "essay"], ...)),
    "bound loosened": dict(score=(float, Field(ge=0.0, le=10.0))),
    "required field made optional": dict(capability=(Optional[str], None)),
}


@pytest.mark.parametrize("change", sorted(BREAKING))
def test_checker_catches_breaking_changes(change):
    problems = compatibility_problems(_schema(EvalOutcome), _changed(EvalOutcome, **BREAKING[change]))
    assert problems, f"{change} must be reported"


def test_checker_allows_an_optional_field_and_a_declared_major_bump():
    assert compatibility_problems(_schema(EvalOutcome), _changed(EvalOutcome, judge=(Optional[str], None))) == []
    bumped = _changed(EvalOutcome, policy_version=(str, ...)) | {"x-schema-version": 2}
    assert compatibility_problems(_schema(EvalOutcome), bumped) == []


def test_removed_field_breaks_old_readers():
    old = _schema(events.Checkpoint)
    new = {**old, "properties": {k: v for k, v in old["properties"].items() if k != "uri"},
           "required": [r for r in old["required"] if r != "uri"]}
    assert any("uri" in p and "old readers" in p for p in compatibility_problems(old, new))


BODY = SampleBody(image=BLOB, question="Which colour?", answer="B", answer_type="choice", options=["red", "blue"])
EXAMPLES: list[Event] = [
    UnlabeledItem(item_id="abc", image=BLOB, source="synthetic:1", metadata={"objects": [{"n": 2}]}),
    outcome(error_type="calculation"),
    Diagnosis(policy_version=2, capabilities={"counting": CapabilityDiagnosis(
        graded=4, wrong=1, error_mix={"calculation": 1.0}, analysis="1 of 4 wrong",
        failures=[FailedItem(item_id="x1", suite="synthetic", image=BLOB, question="How many?", expected="4",
                             given="5", error_type="calculation")])}),
    Divergence(policy_version=2, item_id="abc", probe_id="p1", capability="counting", question="How many?",
               image=BLOB, target_answer="3", reference_answers={"r1": "4"}, consensus_answer="4",
               consensus_strength=1.0),
    AuditLead(divergence=Divergence(
        policy_version=2, item_id="abc/cf/mirror", probe_id="p1", capability="counting", question="How many?",
        image=BLOB, counterfactual_of="abc", edit="mirror", target_answer="3", reference_answers={"r1": "4", "r2": "4"},
        consensus_answer="4", consensus_strength=1.0, consensus_agreeing=2, answer_type="number",
        failure_type="counting/all/mirror/too_low")),
    FailureTypes(policy_version=2, audited_probes=9, types={"counting/all/mirror/too_low": FailureType(
        capability="counting", count=1, exemplars=[FailedItem(item_id="abc/cf/mirror", suite="audit", image=BLOB,
                                                                question="How many?", expected="4", given="3")])}),
    WeaknessSnapshot(seq=3, policy_version=2, events_total=10, capabilities={
        "counting": CapabilityWeakness(error_rate=0.5, effective_n=4.0, ci_low=0.1, ci_high=0.9, events=4)}),
    QuotaPlan(round=1, strategy="uniform", budget=3, quotas={"a": 2}, weights={"a": 1.0}, snapshot_id="s",
              policy_version=2),
    AcceptedSample(sample_id="s1", capability="color", body=BODY, source_item_id="abc", plan_id="p",
                   agents=[AgentStep(role="writer", backend="programmatic", tools=["crop"])],
                   qc=[QCVerdict(check="answerable", passed=True, reason_code="ok", score=0.9)], policy_version=2,
                   origin="audit", divergence_id="2/abc/cf/mirror/p1"),
    RejectedSample(candidate_id="c1", capability="color", source_item_id="abc", plan_id="p",
                   qc=[QCVerdict(check="answerable", passed=False, reason_code="unanswerable")],
                   reason_code="unanswerable"),
    Checkpoint(policy_version=2, parent_version=1, uri="/c/2", metrics={"loss": 0.25},
               trained_on=[OffsetRange(topic="dpe.samples.accepted", partition=0, start=0, end=7)]),
    AuditorCheckpoint(policy_version=3, parent_version=2, uri="/a/3", target_version=5, metrics={"reward_mean": 0.4},
                      trained_on=[OffsetRange(topic="dpe.unlabeled", partition=1, start=4, end=9)]),
    DeadLetter(origin_topic="dpe.eval.outcomes", origin_partition=0, origin_offset=1, stage="decode",
               error_class="MalformedJSON", error_message="not valid JSON", payload_b64="e29vcHM="),
]


def example(model: type[Event]) -> Event:
    """The example event of `model`."""
    return next(event for event in EXAMPLES if isinstance(event, model))


def test_the_examples_cover_every_event_model():
    assert {type(e) for e in EXAMPLES} == set(EVENT_MODELS)


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda event: type(event).__name__)
def test_every_event_round_trips_through_the_strict_decoder(event):
    assert decode(type(event), encode(event, max_bytes=100_000), max_bytes=100_000) == event


def test_the_decoder_coerces_nothing_even_inside_nested_models():
    sample = example(AcceptedSample).model_dump(mode="json")
    sample["qc"][0]["passed"] = "yes"
    with pytest.raises(InvalidEvent) as caught:
        decode(AcceptedSample, json.dumps(sample).encode(), max_bytes=100_000)
    assert caught.value.error_class == "SchemaViolation" and "qc.0.passed" in caught.value.message
    assert "valid boolean" in caught.value.message


@pytest.mark.parametrize("field,value", [("policy_version", 10**9), ("parent_version", 10**12)])
def test_versions_beyond_any_real_checkpoint_are_refused(field, value):
    data = example(Checkpoint).model_dump(mode="json") | {field: value}
    with pytest.raises(InvalidEvent, match=f"{field}: .*not below {events.MAX_POLICY_VERSION}"):
        decode(Checkpoint, json.dumps(data).encode(), max_bytes=100_000)
