"""Kafka I/O: producing events, bounded consumption and the dead-letter queue.

Two standard clients, so that the embedded tansu broker and any real Kafka cluster work the same way:
``kafka-python`` for admin, producing and reading whole topics, and librdkafka (``confluent-kafka``) for
the one hot path, the ingest consumer (``PartitionConsumer``). Consumers never auto-commit: ingest commits
offsets only after the offline and online stores hold the batch (at-least-once delivery + idempotent
writes = an exactly-once effect).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from features.events import InteractionEvent, InvalidEvent

log = logging.getLogger("encore.kafka")

def make_producer(bootstrap: str, **overrides: object) -> KafkaProducer:
    config: dict = dict(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
        retries=5,
        client_id="encore-producer",
    )
    config.update(overrides)
    return KafkaProducer(**config)


def publish_events(producer: KafkaProducer, topic: str, events: Iterable[InteractionEvent]) -> int:
    n = 0
    for event in events:
        producer.send(topic, key=str(event.user_id).encode(), value=event.to_json_bytes())
        n += 1
    return n


@dataclass(frozen=True)
class RawMessage:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


# kafka-python option names (``KafkaSettings.client_options``) → librdkafka's
_RDKAFKA_OPTIONS = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
}


def ingest_consumer_config(bootstrap: str, group_id: str, options: dict[str, object],
                           **extra: object) -> dict[str, object]:
    """librdkafka configuration of an ingest consumer: manual offsets, large fetches, the settings' client
    options (kafka-python names, mapped) and ``extra`` librdkafka keys on top."""
    conf: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "client.id": f"encore-{group_id}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.max.bytes": 32 * 1024 * 1024,
        "max.partition.fetch.bytes": 8 * 1024 * 1024,
        "logger": logging.getLogger("encore.kafka.rdkafka"),
        **extra,
    }
    for name, value in options.items():
        if name not in _RDKAFKA_OPTIONS:
            raise ValueError(f"unsupported Kafka client option for the ingest consumer: {name}")
        conf[_RDKAFKA_OPTIONS[name]] = value
    return conf


class CommitFailed(RuntimeError):
    """The broker refused an offset commit: the batch will be redelivered (and deduplicated)."""


class PartitionConsumer:
    """The ingest consumer: fixed partitions of one topic, offsets committed to a group only when told to.

    Built on librdkafka (``confluent-kafka``) rather than kafka-python, which the rest of Encore uses:
    record decoding is the hot path of ingest, and librdkafka fetches and decodes it in C (measured on this
    broker: ~720k records/s against kafka-python's 31–35k/s; see docs/journal/2026-11-23-ingest-past-20000-events.md).

    Static assignment (``assign``), not a group subscription: no group join (which on tansu waits a whole
    rebalance timeout), and no eviction when a large first batch outlasts a poll interval. Scaling out means
    giving each worker its own partitions (Kafka keys events by user, so each user's events stay on one
    worker). ``partitions`` empty: every partition of the topic.
    """

    def __init__(self, bootstrap: str, group_id: str, topic: str, partitions: list[int] | None = None,
                 **options: object) -> None:
        from confluent_kafka import Consumer, TopicPartition as RdPartition

        self.topic = topic
        self._tp = RdPartition
        conf = ingest_consumer_config(bootstrap, group_id, options)
        self._consumer = Consumer(conf)
        try:
            if not partitions:
                meta = self._consumer.list_topics(topic, timeout=10)
                found = meta.topics.get(topic)
                if found is None or found.error is not None or not found.partitions:
                    raise RuntimeError(f"topic {topic!r} does not exist (or has no partitions) at {bootstrap}")
                partitions = sorted(found.partitions)
            self.partitions = list(partitions)
            # No offset given: start from the group's committed offset, else the beginning (auto.offset.reset).
            self._consumer.assign([RdPartition(topic, p) for p in self.partitions])
        except BaseException:
            self._consumer.close()
            raise

    def poll_batch(self, max_records: int, idle_ms: int, max_wait_ms: int | None = None) -> list[RawMessage]:
        """A bounded batch: up to ``max_records``, closed when the topic has been idle for ``idle_ms`` or,
        under steady traffic, ``max_wait_ms`` after the first record (which bounds freshness)."""
        batch: list[RawMessage] = []
        idle_deadline = time.monotonic() + idle_ms / 1000
        close_at: float | None = None
        while len(batch) < max_records:
            now = time.monotonic()
            if now >= idle_deadline or (close_at is not None and now >= close_at):
                break
            until = min(idle_deadline, close_at) if close_at is not None else idle_deadline
            polled = self._consumer.consume(num_messages=min(max_records - len(batch), 10_000),
                                            timeout=max(0.001, min(until - now, 0.5)))
            got = 0
            for m in polled:
                err = m.error()
                if err is not None:
                    # Transient broker errors surface here; librdkafka retries them itself.
                    log.debug("fetch: %s", err)
                    continue
                batch.append(RawMessage(m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]))
                got += 1
            if got:
                idle_deadline = time.monotonic() + idle_ms / 1000
            if batch and close_at is None and max_wait_ms is not None:
                close_at = time.monotonic() + max_wait_ms / 1000
        return batch

    def commit(self, batch: list[RawMessage]) -> dict[int, int]:
        """Commit the next offset to read per partition (synchronously); returns {partition: next_offset}."""
        from confluent_kafka import KafkaException

        nxt: dict[int, int] = {}
        for m in batch:
            nxt[m.partition] = max(nxt.get(m.partition, -1), m.offset + 1)
        if nxt:
            try:
                result = self._consumer.commit(offsets=[self._tp(self.topic, p, o) for p, o in nxt.items()],
                                               asynchronous=False)
            except KafkaException as exc:
                raise CommitFailed(str(exc)) from exc
            failed = [tp for tp in result or [] if tp.error is not None]
            if failed:
                raise CommitFailed(f"commit refused for partitions {[tp.partition for tp in failed]}: "
                                   f"{failed[0].error}")
        return nxt

    def committed(self, timeout_s: float = 10.0) -> dict[int, int | None]:
        """The group's committed offset per assigned partition (None: nothing committed)."""
        tps = self._consumer.committed([self._tp(self.topic, p) for p in self.partitions], timeout=timeout_s)
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in tps}

    def close(self) -> None:
        self._consumer.close()


def dlq_payload(message: RawMessage, source_topic: str, error: InvalidEvent) -> bytes:
    """DLQ record: reason plus the original bytes (latin-1 round-trips any byte string losslessly)."""
    return json.dumps(
        {
            "reason": error.reason,
            "error_type": error.error_type,
            "source_topic": source_topic,
            "partition": message.partition,
            "offset": message.offset,
            "original": None if message.value is None else message.value.decode("latin-1"),
            "original_encoding": "latin-1",
        }
    ).encode()


def read_topic(bootstrap: str, topic: str, idle_ms: int = 2000, **options: object) -> Iterator[RawMessage]:
    """Read a whole topic from the beginning, without a consumer group, until it is idle for ``idle_ms``.

    We stop on idleness rather than at the reported end offsets: tansu 0.6 reports the base offset of the
    last record batch as the end offset, which would cut the read short.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=idle_ms,
        client_id="encore-reader",
        **options,
    )
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        for r in consumer:
            yield RawMessage(r.partition, r.offset, r.key, r.value, r.timestamp)
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str, **options: object) -> dict[int, int]:
    """Log-end offsets per partition (on tansu 0.6 an underestimate: see ``read_topic``)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, client_id="encore-lag",
                             **options)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group_id: str, topic: str, **options: object) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (partitions without one are left out).

    Asked the way a consumer of the group asks (OffsetFetch to the group's coordinator, without joining it),
    not through the admin API's group listing: tansu lists no offsets for a group whose consumers never
    joined it, and the ingest workers use static assignment, so that listing read as "nothing committed"."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
                             client_id="encore-lag", **options)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        out = {}
        for p in sorted(partitions):
            offset = consumer.committed(TopicPartition(topic, p))
            if offset is not None and offset >= 0:
                out[p] = int(offset)
        return out
    finally:
        consumer.close()
