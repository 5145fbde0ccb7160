"""The Iceberg backend of ingest (``offline.backend: iceberg``): the ``Ingestor`` of features/ingest.py with the
table as its system of record and the table's snapshots as the record of consumed Kafka offsets.

Why a backend object behind three calls (``open``, ``resume``, ``store``; ``ParquetBackend`` is the default)
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

Ownership: a worker owns the partitions given to it (``partitions``; a StatefulSet ordinal maps to a fixed
set) and records offsets only for those, because it records only partitions its batch consumed, and its
consumer is assigned only its own. Two workers that are wrongly given one partition cannot both store a
batch: the table's offsets are checked against where the writer started inside the atomic commit, and the
loser is fenced (it seeks to the table's offset and drops its batch).

Not here: the Parquet store's per-item counters (item and user stats are aggregated from the table when
they are pushed), and the recovery from a broker that lost its whole log (tansu's memory storage): offsets
restart at 0 there, below the table's record; a real Kafka cluster never does that.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import TopicPartition as RdPartition

from features.events import InvalidEvent
from features.iceberg_store import Fenced, IcebergStore
from features.kafka_io import PartitionConsumer, RawMessage
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

    def __init__(self) -> None:
        self.expected: dict[int, int | None] = {}  # partition -> next offset the table holds, as we know it

    def open(self, ingestor: Any) -> IcebergOffline:
        return IcebergOffline(IcebergStore(ingestor.settings))

    def resume(self, ingestor: Any, consumer: PartitionConsumer) -> None:
        """Seek each owned partition to the table's record (partitions it has none for: the group's committed
        offset, else the beginning)."""
        group = ingestor.settings.ingest.group_id
        recorded = ingestor.offline.store.recorded_offsets(group, ingestor.topic, consumer.partitions)
        self.expected.update(recorded)
        positions = [RdPartition(ingestor.topic, p, o) if o is not None else RdPartition(ingestor.topic, p)
                     for p, o in recorded.items()]
        consumer._consumer.assign(positions)  # noqa: SLF001 - re-assign with explicit start offsets
        log.info("resuming %s from the table's offsets %s", ingestor.topic, recorded)

    def store(self, ingestor: Any, staged: list[StagedEvent], messages: list[RawMessage]) -> WriteResult:
        offline: IcebergOffline = ingestor.offline
        owned = set(ingestor.consumer.partitions)
        foreign = {m.partition for m in messages} - owned
        if foreign:  # cannot happen with an assigned consumer; never record offsets for them if it does
            raise RuntimeError(f"batch holds partitions {sorted(foreign)} this worker does not own")
        consumed: dict[int, int] = {}
        for m in messages:
            consumed[m.partition] = max(consumed.get(m.partition, -1), m.offset + 1)
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
            self.resume(ingestor, ingestor.consumer)
            return WriteResult(0, len(staged), frozenset(), ())
        except BaseException:
            offline.pending_dlq.clear()  # the batch is redelivered and rejected again
            raise
        self.expected.update(consumed)
        return WriteResult(len(keep), len(staged) - len(unique), frozenset(unique), (),
                           tuple(s.event for s in keep))


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
