"""The stream's Faust topics: evidence in, worker reports between workers and planner, events out.

Values stay raw bytes: they are decoded and encoded with the registry contracts (`dpe.bus.codec`),
and every event goes out with its envelope headers, like everything else on the bus.
"""

from __future__ import annotations

import faust
from faust.types import TopicT

from dpe.bus.codec import encode, headers_for
from dpe.events import DeadLetter, Divergence, EvalOutcome, Event, QuotaPlan, WeaknessSnapshot
from dpe.topics import MODEL_TOPIC, topic_for
from monitoring.metrics import DEADLETTERS
from streams.contracts import PartialWeakness, partial_topic
from streams.settings import StreamConfig

SERVICE = "weakness"
"""Producer name of everything the stream writes, and prefix of its dead-letter stages."""


class StreamTopics:
    """The topics the stream reads and writes, declared on one app."""

    def __init__(self, app: faust.App, settings: StreamConfig):
        self.max_event_bytes = settings.kafka.max_event_bytes
        prefix = settings.kafka.topic_prefix
        self._topics: dict[type[Event], TopicT] = {
            model: app.topic(topic_for(model, prefix), key_serializer="raw", value_serializer="raw")
            for model in (EvalOutcome, Divergence, WeaknessSnapshot, QuotaPlan, DeadLetter)
        }
        self.partials = app.topic(partial_topic(prefix), partitions=1, internal=True,
                                  key_serializer="raw", value_serializer="raw")
        self._topics[PartialWeakness] = self.partials

    def source(self, model: type[Event]) -> TopicT:
        """The topic of `model` events, for an agent to consume (values stay raw bytes)."""
        return self._topics[model]

    async def send(self, event: Event) -> None:
        """Queue `event` on its topic (delivery is confirmed before the next offset commit)."""
        spec = MODEL_TOPIC.get(type(event))
        max_bytes = spec.max_bytes(self.max_event_bytes) if spec else self.max_event_bytes
        await self._topics[type(event)].send(key=event.key().encode(), value=encode(event, max_bytes),
                                             headers=headers_for(event))

    async def dead_letter(self, letter: DeadLetter) -> None:
        """Send a dead letter and count it."""
        await self.send(letter)
        DEADLETTERS.labels(letter.origin_topic, letter.stage, letter.error_class).inc()
