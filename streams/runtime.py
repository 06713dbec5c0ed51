"""Faust plumbing for the weakness stream: the app class and its options from `StreamConfig`.

Six deliberate departures from a stock `faust.App`:

- the consumer's fetch wait comes from ``kafka.fetch_max_wait_ms`` instead of Faust's hard-coded
  1.5 s. The embedded broker does not wake a waiting fetch when data arrives, so the wait is the
  end-to-end latency of every hop (measured here: p50 0.39 s per hop with Faust's value, 11 ms with
  10 ms);
- Faust's built-in Monitor sensor is replaced by a no-op `faust.Sensor`: the Monitor's per-event
  bookkeeping cost about a quarter of the throughput (a counting agent: ~5,000 vs ~6,900 events/s),
  and the stream exports its own Prometheus metrics instead. (Some sensor must stay attached, or
  Faust warns at every rebalance.)
- end offsets come from a fetch's high-water mark (`fetched_end_offsets`). The embedded broker
  answers ListOffsets with the first offset of the last record batch, so Faust's table recovery,
  which reads a changelog up to its end offset, silently missed the last writes after a kill -9;
- once a rebalance has ended, the stream partitions are sought to their committed offsets again,
  and partitions never committed to their beginning. Faust seeks them, then resumes the flow,
  which clears the stream queues: records fetched in between were dropped, and on a partition
  without a committed offset (where aiokafka does not seek at all) never read again. This was seen
  as one lost outcome in a few restarts after kill -9. Seeking again after the flow is resumed
  only repeats records, which the idempotent scoring absorbs (dead letters may repeat: at least
  once, like every topic here);
- Faust's read offsets are forgotten (`ForgottenReadOffsets`). Faust drops a fetched record whose
  offset is below the last one it read; but a seek resets that mark while records of the fetch
  before it are still being handed out, which raises it again, so the records the seek was meant to
  bring back (the ones the queue clearing dropped) were dropped as already read. Faust also takes a
  jump in read offsets for a compacted range and lets the commit pass it. Without the mark every
  record a seek brings back is delivered; the topics the stream reads are neither compacted nor
  written in transactions, so their offsets have no real gaps;
- a commit never passes an unacknowledged record (`head_unacknowledged`). Faust commits the first
  run of consecutive acknowledged offsets when it starts at most one past the last commit, so a
  single dropped record at the committed offset was committed over and lost for good; on a
  partition never committed it starts from the partition's earliest offset.

Seen together in the kill -9 recovery test (about one run in two, once the stream waited for its
state writes) and in a chaos soak: a capability's count one short of the recomputation.

Example:
    >>> from streams.settings import StreamConfig
    >>> options = faust_options(StreamConfig.load(overrides={"kafka": {"topic_prefix": "x."}}), "h1:9092,h2:9092")
    >>> options["id"], options["broker"], options["broker_session_timeout"], options["store"]
    ('x.weakness', ['kafka://h1:9092', 'kafka://h2:9092'], 6.0, 'memory://')
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.auth import Credentials
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP

from dpe.bus.options import aiokafka_options
from dpe.config import KafkaSettings
from streams.settings import StreamConfig


async def fetched_end_offsets(probe: AIOKafkaConsumer, reported: Mapping[TP, int | None],
                              timeout_s: float = 10.0) -> dict[TP, int | None]:
    """End offsets from fetch high-water marks, fetching from just below the `reported` ones.

    `probe` is a fresh consumer without a group; it is started and stopped here. A partition whose
    high-water mark does not arrive within `timeout_s` keeps its reported offset.
    """
    wanted = {TopicPartition(tp.topic, tp.partition): tp for tp in reported}
    await probe.start()
    try:
        probe.assign(list(wanted))
        for probe_tp, tp in wanted.items():
            probe.seek(probe_tp, max((reported[tp] or 0) - 1, 0))
        deadline = time.monotonic() + timeout_s
        while any(probe.highwater(t) is None for t in wanted) and time.monotonic() < deadline:
            await probe.getmany(timeout_ms=100)
        ends = {}
        for probe_tp, tp in wanted.items():
            known = [offset for offset in (reported[tp], probe.highwater(probe_tp)) if offset is not None]
            ends[tp] = max(known, default=None)
        return ends
    finally:
        await probe.stop()


class _ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when the consumer starts; Faust offers no setting for it.
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int | None]:
        conf = self.app.conf
        probe = AIOKafkaConsumer(
            bootstrap_servers=aiokafka_driver.server_list(self.transport.url, self.transport.default_port),
            client_id=conf.broker_client_id, enable_auto_commit=False, fetch_max_wait_ms=self.app.fetch_max_wait_ms,
            **aiokafka_driver.credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context),
        )
        return await fetched_end_offsets(probe, await super()._highwaters(partitions))

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await super().seek_to_committed()
        never_committed = [tp for tp, offset in committed.items()
                           if not offset and self.app.topics.acks_enabled_for(tp.topic)]
        if never_committed:
            await self.seek_to_beginning(*never_committed)
        return committed


class ForgottenReadOffsets(dict):
    """Faust's read offsets, kept but never recalled: every lookup is None, so a record is always delivered.

    >>> offsets = ForgottenReadOffsets()
    >>> offsets["tp"] = 41
    >>> offsets["tp"] is None, "tp" in offsets
    (True, True)
    """

    def __getitem__(self, key: Any) -> None:
        return None


def head_unacknowledged(acked: list[int], start: int | None) -> bool:
    """Whether the record at `start` (the next offset to commit; None: unknown) is not among `acked`, so no
    commit may pass it.

    >>> head_unacknowledged([30, 31], start=30), head_unacknowledged([31, 32], start=30)
    (False, True)
    >>> head_unacknowledged([0, 1], start=None)
    True
    """
    return start is None or min(acked) > start


class _Consumer(aiokafka_driver.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset = ForgottenReadOffsets()
        self._log_starts: dict[TP, int] = {}

    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        uncommitted = [tp for tp in self.assignment()
                       if self._committed_offset[tp] is None and self.app.topics.acks_enabled_for(tp.topic)]
        if uncommitted:
            self._log_starts.update(await self.earliest_offsets(*uncommitted))

    def resume_point(self, tp: TP) -> int | None:
        """The offset `tp` resumes from after an assignment: the committed one, or the earliest one of a
        partition never committed (None: not known yet)."""
        committed = self._committed_offset[tp]
        return self._log_starts.get(tp) if committed is None else committed

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if acked and head_unacknowledged(acked, self.resume_point(tp)):
            return None
        return super()._new_offset(tp)


class _Transport(aiokafka_driver.Transport):
    Consumer = _Consumer


class WeaknessApp(faust.App):
    """A `faust.App` with the departures listed in the module docstring."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any):
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)

    def on_rebalance_end(self) -> None:
        super().on_rebalance_end()
        self.add_future(self._seek_stream_partitions_again())

    async def _seek_stream_partitions_again(self) -> None:
        try:
            await self.consumer.perform_seek()
        except Exception as error:  # noqa: BLE001 - the next rebalance seeks again anyway
            self.log.warning("seeking the stream partitions after the rebalance failed: %r", error)

    def on_init_dependencies(self) -> Iterable[Any]:
        services = super().on_init_dependencies()
        self.sensors.remove(self.monitor)
        self.sensors.add(faust.Sensor())
        return services


def broker_credentials(kafka: KafkaSettings, bootstrap: str) -> Credentials | None:
    """Faust credentials for the configured security protocol (None for PLAINTEXT)."""
    context = aiokafka_options(kafka, bootstrap).get("ssl_context")
    if kafka.security_protocol == "PLAINTEXT":
        return None
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return faust.SASLCredentials(username=kafka.sasl_username, password=password, ssl_context=context,
                                 mechanism=kafka.sasl_mechanism or "PLAIN")


def faust_options(settings: StreamConfig, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments of `WeaknessApp` for these settings and bootstrap servers."""
    kafka, stream = settings.kafka, settings.stream
    return {
        "id": f"{kafka.topic_prefix}{stream.app_id}",
        "broker": [f"kafka://{server}" for server in bootstrap.split(",")],
        "broker_credentials": broker_credentials(kafka, bootstrap),
        "broker_client_id": kafka.client_id,
        "broker_session_timeout": kafka.session_timeout_ms / 1000,
        "broker_heartbeat_interval": kafka.heartbeat_interval_ms / 1000,
        "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        "consumer_auto_offset_reset": "earliest",
        "consumer_max_fetch_size": max(kafka.max_event_bytes * 2, 1 << 20),
        "producer_acks": -1,
        "producer_linger": kafka.linger_ms / 1000,
        "producer_max_batch_size": kafka.max_batch_bytes,
        "producer_max_request_size": kafka.max_event_bytes * 5,
        "topic_replication_factor": kafka.replication_factor,
        "store": "memory://",
        "datadir": str(settings.home / "faust"),
        "web_enabled": False,
    }
