"""Events to Kafka records and back, with validation on both sides.

Values are UTF-8 JSON of the event model; headers repeat the envelope (event id, type, schema
version, producer) so that tools can route without parsing. Anything that cannot become a valid
event raises `InvalidEvent`, whose `error_class` is a stable, bounded name used as a metric label.

Decoding is strict: a value must have its field's JSON type, so ``"yes"`` is no boolean and ``"3"``
no integer (pydantic's lax mode would coerce both). JSON's own forms still decode: datetimes from
ISO 8601 strings, enums and literals from their values, tuples from arrays.

Example:
    >>> from dpe.events import Checkpoint
    >>> raw = encode(Checkpoint(policy_version=1, uri="/ckpt/1"), max_bytes=10_000)
    >>> decode(Checkpoint, raw, max_bytes=10_000).policy_version
    1
    >>> decode(Checkpoint, b"{not json", max_bytes=10_000)
    Traceback (most recent call last):
    ...
    dpe.bus.codec.InvalidEvent: MalformedJSON: not valid JSON: ...
    >>> decode(Checkpoint, b'{"policy_version": "1", "uri": "/ckpt/1"}', max_bytes=10_000)
    Traceback (most recent call last):
    ...
    dpe.bus.codec.InvalidEvent: SchemaViolation: Checkpoint: policy_version: Input should be a valid integer
"""

from __future__ import annotations

from pydantic import ValidationError

from dpe.events import Event

HEADER_EVENT_ID = "dpe-event-id"
HEADER_EVENT_TYPE = "dpe-event-type"
HEADER_SCHEMA_VERSION = "dpe-schema-version"
HEADER_PRODUCER = "dpe-producer"


class InvalidEvent(ValueError):
    """A record that is not a valid event of its topic's contract."""

    def __init__(self, error_class: str, message: str, stage: str = "decode"):
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.message = message
        self.stage = stage


def encode(event: Event, max_bytes: int) -> bytes:
    """The record value of `event`; raises InvalidEvent(OversizedEvent) past `max_bytes`."""
    value = event.model_dump_json().encode()
    if len(value) > max_bytes:
        raise InvalidEvent(
            "OversizedEvent", f"{type(event).__name__} is {len(value)} bytes, over the {max_bytes}-byte limit",
            stage="encode",
        )
    return value


def headers_for(event: Event) -> list[tuple[str, bytes]]:
    """Envelope headers of `event`."""
    return [
        (HEADER_EVENT_ID, event.event_id.encode()),
        (HEADER_EVENT_TYPE, type(event).__name__.encode()),
        (HEADER_SCHEMA_VERSION, str(event.schema_version).encode()),
        (HEADER_PRODUCER, event.producer.encode()),
    ]


def decode(model: type[Event], value: bytes | None, max_bytes: int) -> Event:
    """Parse and validate a record value as `model` (strictly: no type coercion), or raise InvalidEvent
    saying why not."""
    if value is None or len(value) == 0:
        raise InvalidEvent("EmptyMessage", "the record has no value")
    if len(value) > max_bytes:
        raise InvalidEvent("OversizedEvent", f"{len(value)} bytes, over the {max_bytes}-byte limit")
    try:
        return model.model_validate_json(value, strict=True)
    except ValidationError as exc:
        raise _explain(model, exc) from None


def _explain(model: type[Event], exc: ValidationError) -> InvalidEvent:
    errors = exc.errors(include_url=False, include_input=False)
    kinds = {err["type"] for err in errors}
    if kinds & {"json_invalid", "json_type"}:
        return InvalidEvent("MalformedJSON", f"not valid JSON: {errors[0]['msg']}")
    if kinds == {"model_type"} or kinds == {"model_attributes_type"}:
        return InvalidEvent("MalformedJSON", f"expected a JSON object for {model.__name__}", stage="validate")
    if any(err["loc"] == ("schema_version",) for err in errors):
        msg = next(err["msg"] for err in errors if err["loc"] == ("schema_version",))
        return InvalidEvent("UnsupportedSchemaVersion", msg.removeprefix("Value error, "), stage="validate")
    details = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in errors[:10])
    more = f" (+{len(errors) - 10} more)" if len(errors) > 10 else ""
    return InvalidEvent("SchemaViolation", f"{model.__name__}: {details}{more}", stage="validate")
