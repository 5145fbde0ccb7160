"""Kafka I/O: topic creation, producing events, bounded consumption and the dead-letter queue.

Plain ``kafka-python`` so that the embedded tansu broker and any real Kafka cluster work the same way.
Consumers never auto-commit: ingest commits offsets only after the offline and online stores hold the
batch (at-least-once delivery + idempotent writes = an exactly-once effect).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from features.events import InteractionEvent, InvalidEvent
from infra.settings import TopicSettings

log = logging.getLogger("encore.kafka")

# tansu holds a consumer-group join until the rebalance timeout; a short poll interval keeps joins fast.
MAX_POLL_INTERVAL_MS = 5000


def ensure_topics(bootstrap: str, topics: TopicSettings, **options: object) -> None:
    """Create the topics Encore uses where missing. ``options``: security settings (``KafkaSettings``)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="encore-admin", request_timeout_ms=10000,
                             **options)
    try:
        existing = set(admin.list_topics())
        wanted = [topics.interactions, topics.dlq, topics.exposures]
        new = [
            NewTopic(name=t, num_partitions=topics.partitions, replication_factor=topics.replication_factor)
            for t in wanted
            if t not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", [t.name for t in new])
    finally:
        admin.close()


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


def make_consumer(bootstrap: str, group_id: str, topic: str, *, partitions: list[int] | None = None,
                  listener: object | None = None, **overrides: object) -> KafkaConsumer:
    """A consumer that commits to ``group_id`` only when told to.

    ``partitions`` given: static assignment (``assign``), with offsets still committed to the group. Ingest
    uses this: no group join (which on tansu waits a whole rebalance timeout), and no eviction from the
    group when a large first batch outlasts ``max_poll_interval_ms``. Scaling out means giving each worker
    its own partitions (Kafka keys events by user, so each user's events stay on one worker).
    Otherwise: group subscription with ``listener`` for rebalances.
    """
    config: dict = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        session_timeout_ms=MAX_POLL_INTERVAL_MS,
        heartbeat_interval_ms=1000,
        max_poll_records=5000,
        fetch_max_bytes=32 * 1024 * 1024,
        client_id=f"encore-{group_id}",
    )
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    if partitions is None:
        consumer.subscribe([topic], listener=listener)
        return consumer
    if not partitions:
        partitions = sorted(consumer.partitions_for_topic(topic) or [])
        if not partitions:
            consumer.close()
            raise RuntimeError(f"topic {topic!r} does not exist (or has no partitions) at {bootstrap}")
    consumer.assign([TopicPartition(topic, p) for p in partitions])
    return consumer


@dataclass(frozen=True)
class RawMessage:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def poll_batch(consumer: KafkaConsumer, max_records: int, idle_ms: int, join_timeout_ms: int = 30000,
               max_wait_ms: int | None = None) -> list[RawMessage]:
    """A bounded batch: up to ``max_records``, closed when the topic has been idle for ``idle_ms`` or,
    under steady traffic, ``max_wait_ms`` after the first record (which bounds freshness).

    A fresh consumer first waits (up to ``join_timeout_ms``) for the group to assign it partitions:
    an empty first poll during a rebalance must not be mistaken for an empty topic.
    """
    batch: list[RawMessage] = []
    join_deadline = time.monotonic() + join_timeout_ms / 1000
    while not consumer.assignment() and time.monotonic() < join_deadline:
        for tp, records in consumer.poll(timeout_ms=200, max_records=max_records).items():
            batch.extend(RawMessage(tp.partition, r.offset, r.key, r.value, r.timestamp) for r in records)
    idle_deadline = time.monotonic() + idle_ms / 1000
    close_at: float | None = None
    while len(batch) < max_records:
        now = time.monotonic()
        if now >= idle_deadline or (close_at is not None and now >= close_at):
            break
        until = min(idle_deadline, close_at) if close_at is not None else idle_deadline
        polled = consumer.poll(timeout_ms=max(1, min(int((until - now) * 1000), 500)),
                               max_records=max_records - len(batch))
        for tp, records in polled.items():
            batch.extend(RawMessage(tp.partition, r.offset, r.key, r.value, r.timestamp) for r in records)
            if records:
                idle_deadline = time.monotonic() + idle_ms / 1000
        if batch and close_at is None and max_wait_ms is not None:
            close_at = time.monotonic() + max_wait_ms / 1000
    return batch


def commit_batch(consumer: KafkaConsumer, topic: str, batch: list[RawMessage]) -> dict[int, int]:
    """Commit the next offset to read per partition; returns {partition: next_offset}."""
    from kafka.structs import OffsetAndMetadata

    nxt: dict[int, int] = {}
    for m in batch:
        nxt[m.partition] = max(nxt.get(m.partition, -1), m.offset + 1)
    if nxt:
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in nxt.items()})
    return nxt


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
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="encore-lag-admin", **options)
    try:
        offsets = admin.list_consumer_group_offsets(group_id)
    except Exception:  # noqa: BLE001 - an unknown group simply has no committed offsets
        return {}
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}
