"""A machine-readable description of every topic (AsyncAPI 3.0), and schema compatibility checks.

`asyncapi()` builds the document from the pydantic models and the topic registry; it is committed
as ``dpe/schemas/asyncapi.json`` (``dpe topics schema --write`` regenerates it).
`compatibility_problems(old, new)` says how a changed model would break readers: a reader built
from one schema must read every event a writer built from the other can produce, in both
directions (old readers read new events; new readers replay old events from the log).

Example:
    >>> old = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    >>> new = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    >>> compatibility_problems(old, new)[0]
    'a: old readers: type string is not accepted (reader takes integer)'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpe.topics import TOPICS

SCHEMA_FILE = Path(__file__).parent / "schemas" / "asyncapi.json"


def asyncapi(prefix: str = "dpe.") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of all topics: channels, messages, payload schemas, keys."""
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic_id, spec in TOPICS.items():
        name = spec.model.__name__
        messages[name] = {
            "name": name,
            "contentType": "application/json",
            "payload": spec.model.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
            | {"x-schema-version": spec.model.SCHEMA_VERSION},
            "headers": {
                "type": "object",
                "properties": {h: {"type": "string"} for h in
                               ("dpe-event-id", "dpe-event-type", "dpe-schema-version", "dpe-producer")},
            },
            "bindings": {"kafka": {"key": {"type": "string", "description": spec.key}}},
        }
        channels[topic_id] = {
            "address": spec.name(prefix),
            "description": spec.partitioning,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {"kafka": {"partitions": spec.partitions, "topicConfiguration": dict(spec.configs)}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "dpe-stream events", "version": "1",
                 "description": "Every topic of dpe-stream: one JSON event model per topic."},
        "defaultContentType": "application/json",
        "channels": channels,
        "components": {"messages": messages},
    }


def render_document(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def committed() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def payloads(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Message name -> payload schema."""
    return {name: msg["payload"] for name, msg in document["components"]["messages"].items()}


def compatibility_problems(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why events of one schema version could not be read by readers of the other (empty: compatible).

    dpe writers emit every field of their model, so a field is guaranteed present exactly when the
    writer's schema has it. A changed ``x-schema-version`` is a declared break: readers refuse other
    versions explicitly.
    """
    if old.get("x-schema-version") != new.get("x-schema-version"):
        return []
    return [f"{p}" for p in _accepts(_Ctx(old, new), old, new, "", "old readers")] + [
        f"{p}" for p in _accepts(_Ctx(new, old), new, old, "", "new readers")
    ]


class _Ctx:
    def __init__(self, reader_root: dict[str, Any], writer_root: dict[str, Any]):
        self.reader_root = reader_root
        self.writer_root = writer_root


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]] | {
            k: v for k, v in schema.items() if k != "$ref"
        }
    return schema


def _types(schema: dict[str, Any]) -> set[str]:
    if "type" in schema:
        kinds = schema["type"]
        return set(kinds) if isinstance(kinds, list) else {kinds}
    if "const" in schema:
        return {type(schema["const"]).__name__.replace("str", "string").replace("int", "integer")}
    return set()


def _variants(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return schema.get("anyOf") or schema.get("oneOf") or [schema]


def _accepts(ctx: _Ctx, reader: dict[str, Any], writer: dict[str, Any], path: str, who: str) -> list[str]:
    """Problems that would make `reader` reject something `writer` allows."""
    reader = _resolve(reader, ctx.reader_root)
    writer = _resolve(writer, ctx.writer_root)
    if len(_variants(writer)) > 1:
        return [p for variant in _variants(writer) for p in _accepts(ctx, reader, variant, path, who)]
    if len(_variants(reader)) > 1:
        attempts = [_accepts(ctx, variant, writer, path, who) for variant in _variants(reader)]
        return [] if any(not a for a in attempts) else min(attempts, key=len)
    where = path or "<event>"
    reader_types, writer_types = _types(reader), _types(writer)
    if "integer" in writer_types and "number" in reader_types:
        writer_types = (writer_types - {"integer"}) | {"number"}
    if reader_types and (not writer_types or not writer_types <= reader_types):
        shown = "/".join(sorted(writer_types)) or "any"
        return [f"{where}: {who}: type {shown} is not accepted (reader takes {'/'.join(sorted(reader_types))})"]
    problems = _value_constraints(reader, writer, where, who)
    if "object" in reader_types:
        problems += _object(ctx, reader, writer, path, who)
    if "array" in reader_types and "items" in reader:
        problems += _accepts(ctx, reader["items"], writer.get("items", {}), f"{path}[]", who)
    return problems


def _value_constraints(reader: dict[str, Any], writer: dict[str, Any], where: str, who: str) -> list[str]:
    problems = []
    reader_enum = reader.get("enum", [reader["const"]] if "const" in reader else None)
    writer_enum = writer.get("enum", [writer["const"]] if "const" in writer else None)
    if reader_enum is not None and (writer_enum is None or not set(writer_enum) <= set(reader_enum)):
        extra = sorted(set(writer_enum or ["<any>"]) - set(reader_enum), key=str)
        problems.append(f"{where}: {who}: values {extra} are not accepted")
    for upper in ("maxLength", "maximum", "exclusiveMaximum", "maxItems"):
        if upper in reader and (upper not in writer or writer[upper] > reader[upper]):
            problems.append(f"{where}: {who}: {upper} {writer.get(upper, 'unbounded')} exceeds {reader[upper]}")
    for lower in ("minLength", "minimum", "exclusiveMinimum", "minItems"):
        if lower in reader and (lower not in writer or writer[lower] < reader[lower]):
            problems.append(f"{where}: {who}: {lower} {writer.get(lower, 'unbounded')} is below {reader[lower]}")
    if "pattern" in reader and writer.get("pattern") != reader["pattern"]:
        problems.append(f"{where}: {who}: pattern changed from {reader['pattern']!r} to {writer.get('pattern')!r}")
    return problems


def _object(ctx: _Ctx, reader: dict[str, Any], writer: dict[str, Any], path: str, who: str) -> list[str]:
    problems = []
    reader_props, writer_props = reader.get("properties", {}), writer.get("properties", {})
    for name in reader.get("required", []):
        if name not in writer_props:
            problems.append(f"{path + '.' if path else ''}{name}: {who}: required field is not written")
    for name, schema in reader_props.items():
        if name in writer_props:
            problems += _accepts(ctx, schema, writer_props[name], f"{path + '.' if path else ''}{name}", who)
    if isinstance(reader.get("additionalProperties"), dict):
        problems += _accepts(ctx, reader["additionalProperties"], writer.get("additionalProperties", {}),
                             f"{path}{{*}}", who)
    return problems
