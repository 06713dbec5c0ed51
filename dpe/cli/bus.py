"""Bus commands: broker, topics, tail, publish, doctor."""

from __future__ import annotations

import json
import sys
from typing import IO

import click
from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from dpe.blobstore import BlobStore
from dpe.broker import BrokerError, EmbeddedBroker, clear_state, resolve_bootstrap, wait_until_answers, write_state
from dpe.bus.admin import ensure_topics, existing_topics
from dpe.bus.codec import InvalidEvent, decode
from dpe.bus.options import consumer_tuning, kafka_python_options
from dpe.bus.sync import Publisher
from dpe.command import CliState, pass_state
from dpe.config import mask_userinfo
from dpe.lifecycle import run_until_stopped
from dpe.schema import SCHEMA_FILE, asyncapi, committed, compatibility_problems, payloads, render_document
from dpe.settings import Settings
from dpe.topics import TOPICS, spec_for_topic

console = Console()


def _bootstrap(state: CliState) -> str:
    return resolve_bootstrap(state.settings_as(Settings))


def _full_topic(state: CliState, name: str) -> str:
    """Accept a full topic name, a registry id (eval_outcomes) or a suffix (eval.outcomes)."""
    prefix = state.settings_as(Settings).kafka.topic_prefix
    for topic_id, spec in TOPICS.items():
        if name in (topic_id, spec.suffix, spec.name(prefix)):
            return spec.name(prefix)
    known = ", ".join(spec.suffix for spec in TOPICS.values())
    raise click.BadParameter(f"unknown topic {name!r}; known: {known}")


@click.command()
@click.option("--port", type=int, default=None, help="Loopback port (default: a free one).")
@click.option("--create-topics/--no-create-topics", default=True)
@pass_state
def broker(state: CliState, port: int | None, create_topics: bool) -> None:
    """Run the embedded Kafka-compatible broker until Ctrl-C (memory storage)."""
    settings = state.settings_as(Settings)
    if settings.kafka.bootstrap_servers:
        configured = mask_userinfo(settings.kafka.bootstrap_servers)
        raise click.ClickException(f"an external Kafka is configured ({configured})")
    settings.home.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(port=port, log_path=settings.home / "broker.log") as running:
        try:
            if create_topics:
                ensure_topics(settings, running.bootstrap_servers)
            write_state(settings, running)  # last: other commands take the state file to mean "ready"
            console.print(f"[green]broker ready[/] at [bold]{running.bootstrap_servers}[/] "
                          f"(state in {settings.home / 'broker.json'}); Ctrl-C stops it")
            run_until_stopped(lambda stop: stop.wait())
        finally:
            clear_state(settings)
    console.print("broker stopped")


@click.group()
def topics() -> None:
    """Create, list and describe the registry's topics."""


@topics.command("create")
@pass_state
def topics_create(state: CliState) -> None:
    """Create every missing topic (idempotent)."""
    for status in ensure_topics(state.settings_as(Settings), _bootstrap(state)):
        word = "[green]created[/]" if status.created else "exists"
        console.print(f"{status.name:<40} {word} ({status.partitions} partitions)")


@topics.command("list")
@pass_state
def topics_list(state: CliState) -> None:
    """The registry with each topic's contract, key and whether it exists on the broker."""
    present = existing_topics(state.settings_as(Settings), _bootstrap(state))
    table = Table("topic", "event", "v", "partitions", "key", "on broker")
    for spec in TOPICS.values():
        name = spec.name(state.settings_as(Settings).kafka.topic_prefix)
        table.add_row(name, spec.model.__name__, str(spec.model.SCHEMA_VERSION), str(spec.partitions), spec.key,
                      "yes" if name in present else "[red]no[/]")
    console.print(table)


@topics.command("schema")
@click.option("--write", is_flag=True, help="Regenerate the committed AsyncAPI document (refused if incompatible).")
def topics_schema(write: bool) -> None:
    """Print the AsyncAPI document of all topics, or check and rewrite the committed one."""
    document = asyncapi()
    if not write:
        click.echo(render_document(document), nl=False)
        return
    old = payloads(committed()) if SCHEMA_FILE.exists() else {}
    problems = [f"{name}: {p}" for name, new in payloads(document).items() if name in old
                for p in compatibility_problems(old[name], new)]
    if problems:
        raise click.ClickException("incompatible change (bump SCHEMA_VERSION to declare a break):\n  "
                                   + "\n  ".join(problems))
    SCHEMA_FILE.write_text(render_document(document))
    console.print(f"wrote {SCHEMA_FILE}")


@click.command()
@click.argument("topic")
@click.option("-f", "--follow", is_flag=True, help="Keep waiting for new events.")
@click.option("--from-beginning/--from-end", default=True)
@click.option("-n", "--limit", type=int, default=None, help="Stop after this many records.")
@pass_state
def tail(state: CliState, topic: str, follow: bool, from_beginning: bool, limit: int | None) -> None:
    """Pretty-print a topic's events (read-only: invalid records are shown, not dead-lettered)."""
    name = _full_topic(state, topic)
    kafka = state.settings_as(Settings).kafka
    spec = spec_for_topic(name, kafka.topic_prefix)
    consumer = KafkaConsumer(**kafka_python_options(kafka, _bootstrap(state)), **consumer_tuning(kafka))
    partitions = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
    if not partitions:
        raise click.ClickException(f"topic {name} does not exist (run `dpe topics create`)")
    consumer.assign(partitions)
    (consumer.seek_to_beginning if from_beginning else consumer.seek_to_end)(*partitions)
    shown, idle = 0, 0
    try:
        while limit is None or shown < limit:
            records = [r for batch in consumer.poll(timeout_ms=500).values() for r in batch]
            idle = 0 if records else idle + 1
            if not records and not follow and idle >= 2:
                break
            for record in records[: None if limit is None else limit - shown]:
                _show(record, spec.model, spec.max_bytes(kafka.max_event_bytes))
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def _show(record, model, max_bytes: int) -> None:
    where = f"[dim]{record.topic}[{record.partition}]@{record.offset}[/] key={(record.key or b'').decode(errors='replace')}"
    try:
        event = decode(model, record.value, max_bytes)
    except InvalidEvent as exc:
        console.print(f"{where} [red]invalid[/] {exc}")
        return
    console.print(where, f"[bold]{type(event).__name__}[/]")
    console.print_json(event.model_dump_json(exclude={"event_id", "schema_version"}))


@click.command()
@click.argument("topic")
@click.argument("source", type=click.File("r"), default="-")
@pass_state
def publish(state: CliState, topic: str, source: IO[str]) -> None:
    """Validate events from a JSONL file (or stdin) and publish the valid ones to TOPIC.

    Invalid lines are reported with their line number and not published; the exit code is 1 if any
    line was invalid.
    """
    name = _full_topic(state, topic)
    spec = spec_for_topic(name, state.settings_as(Settings).kafka.topic_prefix)
    sent, bad = 0, 0
    with Publisher(state.settings_as(Settings), producer_name="dpe-publish", bootstrap=_bootstrap(state)) as pub:
        futures = []
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                event = spec.model.model_validate_json(line, strict=True)
            except ValidationError as exc:
                bad += 1
                first = exc.errors(include_url=False)[0]
                console.print(f"[red]line {number}[/]: {'.'.join(map(str, first['loc'])) or '<line>'}: {first['msg']}")
                continue
            futures.append(pub.publish(event))
            sent += 1
        for future in futures:
            future.get(timeout=30)
    console.print(f"published {sent} {spec.model.__name__} event(s) to {name}; {bad} invalid line(s) skipped")
    if bad:
        sys.exit(1)


@click.command()
@pass_state
def doctor(state: CliState) -> None:
    """Check the broker, the topics and the blob store; print the configuration without secrets or URL credentials."""
    settings = state.settings_as(Settings)
    checks: list[tuple[str, bool, str]] = []
    try:
        bootstrap = resolve_bootstrap(settings)
        wait_until_answers(bootstrap, timeout_s=5)
        checks.append(("broker reachable", True, bootstrap))
        present = existing_topics(settings, bootstrap)
        missing = [s.name(settings.kafka.topic_prefix) for s in TOPICS.values()
                   if s.name(settings.kafka.topic_prefix) not in present]
        checks.append(("topics present", not missing, "all" if not missing else "missing: " + ", ".join(missing)))
    except BrokerError as exc:
        checks.append(("broker reachable", False, str(exc)))
    try:
        BlobStore(settings.blob.url, settings.blob.limits).check_writable()
        checks.append(("blob store writable", True, settings.blob.url))
    except OSError as exc:
        checks.append(("blob store writable", False, f"{settings.blob.url}: {exc}"))
    table = Table("check", "ok", "detail")
    for name, ok, detail in checks:
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", mask_userinfo(detail))
    console.print(table)
    console.print_json(json.dumps(settings.summary()))
    if not all(ok for _, ok, _ in checks):
        sys.exit(1)
