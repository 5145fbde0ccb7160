"""The Iceberg backend of ingest (``offline.backend: iceberg``): the ``Ingestor`` of features/ingest.py with the
table as its system of record and the table's snapshots as the record of consumed Kafka offsets.

Why a backend object behind three calls (``open``, ``consumer``, ``store``; ``ParquetBackend`` is the default)
rather than a second worker loop: validation, the DLQ, the online push and the stats pushes are the same in
both backends; only where a batch is stored and where a partition resumes differ. The ``Ingestor`` picks
its backend from the settings, so ``encore ingest``, the Dagster ingest asset and the benchmarks run either.
(This module does not import features/ingest.py: the ``ingestor`` arguments are typed ``Any``.)

Per batch (compare ``features/ingest.py``):

1. validate; rejects are buffered for the DLQ ledger table (and sent to the DLQ topic, as before);
2. append the DLQ rows (their own table), then the valid events *and the next offset of every partition the
   batch consumed* in one snapshot (``IcebergStore.append_batch``); a crash before that commit re-reads the
   batch, a crash after it re-reads nothing, because
3. on start (and whenever the consumer is recreated) every owned partition is sought to the offset the
   table records, not to Kafka's committed offset;
4. push online what the snapshot holds (the online store is fed only rows the table accepted);
5. commit offsets to Kafka, best effort (monitoring reads lag from there; nothing else does).

Ownership: a worker owns the partitions given to it (``partitions``, e.g. a StatefulSet ordinal's set) or,
with ``offline.worker_assignment: group``, those the consumer group assigns it (``GroupConsumer``: every
assignment seeks to the table's offsets). It records offsets only for partitions it owns at commit time,
and drops messages below the offset the table records. Two workers that both believe they own a
partition (a wrong assignment, a zombie after a rebalance) cannot both store a batch: the table's offsets
are checked against where the writer started inside the atomic commit, and the loser is fenced (it seeks
to the table's offset and drops its batch).

Not here: the Parquet store's per-item counters (item and user stats are aggregated from the table when
they are pushed), and the recovery from a broker that lost its whole log (tansu's memory storage): offsets
restart at 0 there, below the table's record; a real Kafka cluster never does that.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from confluent_kafka import TopicPartition as RdPartition

from features.events import InvalidEvent
from features.iceberg_store import Fenced, IcebergStore
from features.kafka_io import PartitionConsumer, RawMessage, ingest_consumer_config
from features.offline_store import DATA_ERRORS, StagedEvent, WriteResult, _table

log = logging.getLogger("encore.ingest.iceberg")


class IcebergOffline:
    """What ``Ingestor`` asks of its offline store, on the Iceberg tables: DLQ records are buffered and
    stored with the next commit (one table commit per batch, not per rejected message)."""

    def __init__(self, store: IcebergStore) -> None:
        self.store = store
        self.pending_dlq: list[dict] = []

    def record_dlq(self, partition: int, offset: int, error_type: str, reason: str, original: bytes | None) -> bool:
        self.pending_dlq.append({"kafka_partition": partition, "kafka_offset": offset, "error_type": error_type,
                                 "reason": reason, "original": original, "recorded_at_ms": int(time.time() * 1000)})
        return True  # no ledger lookup per message: a redelivered reject may reach the DLQ topic twice

    def item_stats(self, item_ids: list[int] | None = None, **kwargs: object):  # noqa: ANN201 - DataFrame
        return self.store.item_stats(item_ids, **kwargs)  # type: ignore[arg-type]

    def user_stats(self, user_ids: list[int] | None = None):  # noqa: ANN201 - DataFrame
        return self.store.user_stats(user_ids)

    def close(self) -> None:
        self.store.close()


class IcebergBackend:
    """``ParquetBackend``'s three steps (features/ingest.py) on the Iceberg tables."""

    # The table's offsets are the resume point; Kafka's committed ones are best effort (monitoring only).
    resumes_from_kafka = False

    def __init__(self) -> None:
        self.expected: dict[int, int | None] = {}  # partition -> next offset the table holds, as we know it

    def open(self, ingestor: Any) -> IcebergOffline:
        return IcebergOffline(IcebergStore(ingestor.settings))

    def consumer(self, ingestor: Any) -> PartitionConsumer:
        settings = ingestor.settings
        if settings.offline.worker_assignment == "group" and not ingestor._partitions:  # noqa: SLF001
            def positions(partitions: list[int]) -> dict[int, int | None]:
                ingestor.history_cache.clear()  # another worker may have moved these users' histories
                return self._positions(ingestor, partitions)

            return GroupConsumer(ingestor.bootstrap, settings.ingest.group_id, ingestor.topic, positions,
                                 **settings.kafka.client_options())
        consumer = PartitionConsumer(ingestor.bootstrap, settings.ingest.group_id, ingestor.topic,
                                     ingestor._partitions, **settings.kafka.client_options())  # noqa: SLF001
        try:
            self.resume(ingestor, consumer)
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _positions(self, ingestor: Any, partitions: list[int]) -> dict[int, int | None]:
        recorded = ingestor.offline.store.recorded_offsets(ingestor.settings.ingest.group_id, ingestor.topic,
                                                           partitions)
        self.expected.update(recorded)
        log.info("resuming %s from the table's offsets %s", ingestor.topic, recorded)
        return recorded

    def resume(self, ingestor: Any, consumer: PartitionConsumer) -> None:
        """Seek each owned partition to the table's record (partitions it has none for: the group's committed
        offset, else the beginning)."""
        recorded = self._positions(ingestor, consumer.partitions)
        consumer._consumer.assign(_start_at(ingestor.topic, recorded))  # noqa: SLF001 - explicit start offsets

    def store(self, ingestor: Any, staged: list[StagedEvent], messages: list[RawMessage]) -> WriteResult:
        offline: IcebergOffline = ingestor.offline
        owned = set(ingestor.consumer.partitions)
        foreign = {m.partition for m in messages} - owned
        if foreign:  # revoked while this batch was read (group assignment): their new owner re-reads them
            log.warning("dropping messages of partitions %s, no longer this worker's", sorted(foreign))

        # A message below the offset the table records for its partition is stored already, whatever the
        # consumer's position says (e.g. a batch read before a re-seek): drop it, and its DLQ record. Offsets
        # are recorded only for partitions this worker owns.
        def new(partition: int, offset: int) -> bool:
            start = self.expected.get(partition)
            return partition in owned and (start is None or offset >= start)

        fresh = [m for m in messages if new(m.partition, m.offset)]
        before = len(staged)
        staged = [s for s in staged if new(s.partition, s.offset)]
        offline.pending_dlq[:] = [r for r in offline.pending_dlq if new(r["kafka_partition"], r["kafka_offset"])]
        consumed: dict[int, int] = {}
        for m in fresh:
            consumed[m.partition] = max(consumed.get(m.partition, -1), m.offset + 1)
        if not consumed:
            return WriteResult(0, before, frozenset(), ())
        unique: dict[str, StagedEvent] = {}
        for s in staged:  # first delivery of each id inside the batch
            unique.setdefault(s.event.event_id, s)
        keep = _isolate_unstorable(ingestor, list(unique.values()), messages)
        try:
            offline.store.append_dlq(offline.pending_dlq)  # before the offsets that move past them
            offline.pending_dlq.clear()
            offline.store.append_batch(keep, consumed, group=ingestor.settings.ingest.group_id, topic=ingestor.topic,
                                       expected=self.expected)
        except Fenced as fenced:
            # Another writer stored (some of) these offsets: ours are stale. Drop the batch, resume where the
            # table says, and forget cached histories (that writer may have moved them).
            log.warning("fenced: %s; seeking to the table's offsets", fenced)
            offline.pending_dlq.clear()
            ingestor.history_cache.clear()
            if isinstance(ingestor.consumer, GroupConsumer):
                # no assign() outside a rebalance callback; messages below the new offsets are dropped anyway
                self._positions(ingestor, ingestor.consumer.partitions)
            else:
                self.resume(ingestor, ingestor.consumer)
            return WriteResult(0, len(staged), frozenset(), ())
        except BaseException:
            offline.pending_dlq.clear()  # the batch is redelivered and rejected again
            raise
        self.expected.update(consumed)
        return WriteResult(len(keep), before - len(unique), frozenset(unique), (), tuple(s.event for s in keep))


def _isolate_unstorable(ingestor: Any, staged: list[StagedEvent], messages: list[RawMessage]) -> list[StagedEvent]:
    """Events Arrow cannot hold go to the DLQ (before the commit, so their record is never lost) and the
    rest are stored; the normal case builds one table and pays nothing more."""
    try:
        _table(staged, 0)
        return staged
    except DATA_ERRORS:
        pass
    by_offset = {(m.partition, m.offset): m for m in messages}
    keep = []
    for s in staged:
        try:
            _table([s], 0)
            keep.append(s)
        except DATA_ERRORS as exc:
            reason = f"the offline store cannot hold this event: {type(exc).__name__}: {str(exc)[:300]}"
            ingestor._dead_letter(by_offset[(s.partition, s.offset)],  # noqa: SLF001 - the Ingestor's DLQ path
                                  InvalidEvent(reason=reason, error_type="store_rejected"))
    return keep


def _start_at(topic: str, offsets: dict[int, int | None]) -> list[RdPartition]:
    return [RdPartition(topic, p, o) if o is not None else RdPartition(topic, p) for p, o in offsets.items()]


class GroupConsumer(PartitionConsumer):
    """``PartitionConsumer`` under consumer-group assignment: Kafka decides which partitions this worker
    owns, and every (re)assignment starts each partition at the offset the table records (``positions``),
    never at the group's committed one. Until the first assignment (a join takes seconds on tansu) and
    after a revocation, ``partitions`` is empty and the worker stores nothing."""

    def __init__(self, bootstrap: str, group_id: str, topic: str,
                 positions: Callable[[list[int]], dict[int, int | None]], **options: object) -> None:
        from confluent_kafka import Consumer

        self.topic, self._tp, self.partitions = topic, RdPartition, []
        self._positions = positions
        # a dead worker's partitions move after this long (the drill's SIGKILL): seconds, not the default 45
        conf = ingest_consumer_config(bootstrap, group_id, options, **{"session.timeout.ms": 6000,
                                                                       "heartbeat.interval.ms": 1000})
        self._consumer = Consumer(conf)
        self._consumer.subscribe([topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._revoked)

    def _assigned(self, consumer: Any, assigned: list[RdPartition]) -> None:
        start = self._positions(sorted(tp.partition for tp in assigned))
        consumer.assign(_start_at(self.topic, start))
        self.partitions = sorted(start)

    def _revoked(self, consumer: Any, revoked: list[RdPartition]) -> None:
        self.partitions = []
        consumer.unassign()
