"""Ingest: Kafka ``interactions`` → validation → offline store → Feast online store → commit offsets.

Feast does not consume Kafka itself (its KafkaSource needs a Spark processor), so Encore owns this path.
Per bounded batch, in this order (each step idempotent, so a crash anywhere is repaired by a retry):

1. validate every message; rejects go to the DLQ ledger and the ``interactions.dlq`` topic with the reason
   and the original bytes (the run goes on);
2. write valid events to the offline store (system of record; deduplicated by ``event_id``); an event it
   cannot hold goes to the DLQ with the store's reason, and the rest of the batch is stored;
3. push what the offline store accepted (its copy of each event id of the batch, never a second event
   that reuses an id) as the affected users' ``user_history``, and the items' ``item_stats``, to the
   Feast online store;
4. only then commit the Kafka offsets.

No single message can stop this loop: the parser never raises, and a value that passes validation but
fails a store write is isolated and dead-lettered, so offsets always move past it.

A crash before step 4 redelivers the batch; step 2 skips what it already holds and step 3 merges by a
natural key, so nothing is lost and nothing counts twice.

Where step 2 stores and where a partition resumes is the offline backend's (``offline.backend``):
``ParquetBackend`` below, or ``features/iceberg_ingest.py``'s ``IcebergBackend``, which commits the batch and
its offsets in one Iceberg snapshot and resumes from the table instead of from Kafka.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from feast import FeatureStore
from kafka import KafkaProducer

from features.events import InteractionEvent, InvalidEvent, parse_event
from features.feature_repo import feature_store, user_stats_dir, write_online
from features.kafka_io import CommitFailed, PartitionConsumer, RawMessage, dlq_payload, make_producer
from features.offline_store import DATA_ERRORS, OfflineStore, StagedEvent, WriteResult
from infra.settings import EncoreSettings

log = logging.getLogger("encore.ingest")

HISTORY_FEATURES = [
    "user_history:item_ids",
    "user_history:event_types",
    "user_history:timestamps_ms",
    "user_history:played_ratios",
]


@dataclass
class BatchReport:
    consumed: int = 0
    valid: int = 0
    written: int = 0
    duplicates: int = 0
    dlq: int = 0
    users_updated: int = 0
    first_offset: int | None = None
    last_offset: int | None = None
    seconds: float = 0.0
    freshness_s: list[float] = field(default_factory=list, repr=False)
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class IngestReport:
    batches: int = 0
    consumed: int = 0
    valid: int = 0
    written: int = 0
    duplicates: int = 0
    dlq: int = 0
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    offset_ranges: dict[int, list[int]] = field(default_factory=dict)  # partition -> [first, last]
    seconds: float = 0.0
    freshness_p50_s: float | None = None
    freshness_p99_s: float | None = None
    broker_resets: int = 0

class Ingestor:
    """Owns one consumer, producer, offline store and Feast store for the life of an ingest run."""

    def __init__(self, settings: EncoreSettings, bootstrap: str, *, store: FeatureStore | None = None,
                 partitions: list[int] | None = None) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.topic = settings.topics.interactions
        self.backend = offline_backend(settings)
        self.offline = self.backend.open(self)
        self.store = store or feature_store(settings)
        # Histories of this worker's users, as last pushed. Kafka keys events by user and the worker owns
        # its partitions statically, so no other process writes these users while it runs.
        self.history_cache: dict[int, dict[str, list]] = {}
        # That cache holds millions of small objects, and each batch allocates ~100k more: with CPython's
        # default thresholds (700 allocations) the cyclic GC keeps re-walking the cache (0.1-0.3 s of a
        # batch, measured). Ingest creates no reference cycles worth collecting early; collect rarely.
        gc.set_threshold(200_000, 50, 100)
        self._partitions = list(partitions or [])
        self.consumer: PartitionConsumer = self._new_consumer()
        # One worker per partition at a time: its history cache below must be the only writer of its users.
        # Workers on disjoint partitions may run side by side (Kafka keys events by user).
        self._locks = []
        try:
            for partition in sorted(self.consumer.partitions):
                self._locks.append(worker_lock(settings.offline_dir / f"_ingest-p{partition}.lock"))
        except BaseException:
            self.consumer.close()
            for lock in self._locks:
                lock.close()
            raise
        self.producer: KafkaProducer = make_producer(bootstrap, **settings.kafka.client_options())
        self._committed: dict[int, int] = {}  # what this worker committed, to notice a broker that forgot
        self._dirty_items: set[int] = set()
        self._dirty_users: set[int] = set()
        self._stats_pushed_at = 0.0

    def _new_consumer(self) -> PartitionConsumer:
        return self.backend.consumer(self)

    def close(self) -> None:
        closers = [self.producer.close, self.offline.close, *(lock.close for lock in self._locks)]
        if self.consumer is not None:
            closers.insert(0, self.consumer.close)
        for closer in closers:
            try:
                closer()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("close failed", exc_info=True)

    def __enter__(self) -> "Ingestor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        *,
        max_batches: int | None = None,
        idle_ms: int | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        stop: threading.Event | None = None,
    ) -> IngestReport:
        """Consume bounded batches until the topic is idle (or ``max_batches``, or until ``stop`` is set:
        with ``stop`` given, an idle topic does not end the run — the continuous mode of a worker)."""
        report = IngestReport()
        freshness: list[float] = []
        start = time.monotonic()
        idle_ms = idle_ms if idle_ms is not None else self.settings.ingest.poll_timeout_ms
        while (max_batches is None or report.batches < max_batches) and not (stop and stop.is_set()):
            if not self._ensure_consumer():
                continue
            messages = self.consumer.poll_batch(self.settings.ingest.batch_size, idle_ms,
                                                max_wait_ms=self.settings.ingest.max_batch_wait_ms)
            if self._broker_lost_state():
                report.broker_resets += 1
                continue  # re-read from the beginning; what is already stored is skipped as duplicates
            if not messages:
                self._flush_stats(force=True)
                if stop is None:
                    break
                continue
            batch = self.process(messages, report.dlq_reasons)
            report.batches += 1
            for name in ("consumed", "valid", "written", "duplicates", "dlq"):
                setattr(report, name, getattr(report, name) + getattr(batch, name))
            for m in messages:
                rng = report.offset_ranges.setdefault(m.partition, [m.offset, m.offset])
                rng[0], rng[1] = min(rng[0], m.offset), max(rng[1], m.offset)
            freshness.extend(batch.freshness_s)
            if on_batch:
                on_batch(batch)
        self._flush_stats(force=True)
        report.seconds = time.monotonic() - start
        if freshness:
            report.freshness_p50_s = float(np.percentile(freshness, 50))
            report.freshness_p99_s = float(np.percentile(freshness, 99))
        return report

    def process(self, messages: list[RawMessage], dlq_reasons: dict[str, int] | None = None) -> BatchReport:
        t0 = time.monotonic()
        rep = BatchReport(consumed=len(messages))
        rep.first_offset = min(m.offset for m in messages)
        rep.last_offset = max(m.offset for m in messages)
        staged: list[StagedEvent] = []
        now_ms = int(time.time() * 1000)
        for m in messages:
            parsed = parse_event(
                m.value,
                max_payload_bytes=self.settings.ingest.max_payload_bytes,
                max_future_skew_s=self.settings.ingest.max_future_skew_s,
                now_ms=now_ms,
            )
            if isinstance(parsed, InvalidEvent):
                self._dead_letter(m, parsed)
                rep.dlq += 1
                if dlq_reasons is not None:
                    dlq_reasons[parsed.error_type] = dlq_reasons.get(parsed.error_type, 0) + 1
            else:
                staged.append(StagedEvent(parsed, m.partition, m.offset))
        rep.valid = len(staged)
        t1 = time.monotonic()
        # Offline first: the system of record.
        result = self.backend.store(self, staged, messages)
        if staged:
            rep.written, rep.duplicates = result.written, result.duplicates
            by_offset = {(m.partition, m.offset): m for m in messages}
            for s, reason in result.rejected:  # passed validation, but the store cannot hold it
                self._dead_letter(by_offset[(s.partition, s.offset)],
                                  InvalidEvent(reason=reason, error_type="store_rejected"))
                rep.dlq += 1
                if dlq_reasons is not None:
                    dlq_reasons["store_rejected"] = dlq_reasons.get("store_rejected", 0) + 1
            t2 = time.monotonic()
            # Online next, from what the offline store holds for every id of the batch (duplicates
            # included: merging is idempotent, so a crash between the offline write and this push is
            # repaired by the redelivery; an event that reused a stored id never gets here).
            rep.users_updated, refused = self._push_online(list(result.accepted))
            if refused:
                first_delivery: dict[str, RawMessage] = {}
                for s in staged:
                    first_delivery.setdefault(s.event.event_id, by_offset[(s.partition, s.offset)])
                for e, reason in refused:
                    if e.event_id in first_delivery:
                        self._dead_letter(first_delivery[e.event_id], InvalidEvent(
                            reason=f"{reason} (kept in the offline store)", error_type="store_rejected"))
        else:
            t2 = time.monotonic()
        t3 = time.monotonic()
        self.producer.flush()  # DLQ records are durable before offsets move
        try:
            self._committed.update(self.consumer.commit(messages))
        except CommitFailed:
            # The group rebalanced while we worked: the batch is redelivered to the partition's new owner
            # (maybe us), and the stores above take it again without double counting.
            log.warning("offset commit failed; the batch will be redelivered and deduplicated")
            self.history_cache.clear()
        rep.stage_seconds = {"parse": round(t1 - t0, 3), "offline": round(t2 - t1, 3),
                             "online": round(t3 - t2, 3), "commit": round(time.monotonic() - t3, 3)}
        done_ms = time.time() * 1000
        rep.freshness_s = [(done_ms - m.timestamp_ms) / 1000 for m in messages if m.timestamp_ms and m.timestamp_ms > 0]
        rep.seconds = time.monotonic() - t0
        log.info(
            "batch offsets %s..%s: %d consumed, %d written, %d duplicate, %d to DLQ, %d users updated (%.2fs: %s)",
            rep.first_offset, rep.last_offset, rep.consumed, rep.written, rep.duplicates, rep.dlq,
            rep.users_updated, rep.seconds, rep.stage_seconds,
        )
        return rep

    def _broker_lost_state(self) -> bool:
        """Detect a broker that restarted without its log (tansu's memory storage) and start over.

        Offsets restart at 0 on such a broker, so our fetch position would silently skip new events. The
        sign: the group's committed offsets are gone (or went backwards). Then seek to the beginning; the
        offline store's event-id index makes the re-read free of duplicates.
        """
        if not self._committed or not self.backend.resumes_from_kafka:
            return False
        try:
            committed = self.consumer.committed()
            lost = any((committed.get(p) or 0) < o for p, o in self._committed.items())
        except Exception:  # noqa: BLE001 - broker unreachable: nothing to fetch either; check again later
            return False
        if lost:
            log.warning("the broker lost its committed offsets (restarted without storage?): "
                        "re-reading %s from the beginning; stored events are skipped", self.topic)
            # A fresh client: the old one's fetch positions and metadata describe a log that is gone.
            self.consumer.close()
            self.consumer = None  # type: ignore[assignment] - recreated by _ensure_consumer
            self._committed.clear()
        return lost

    def _ensure_consumer(self) -> bool:
        """(Re)create the consumer; False while the topic does not exist yet (a broker coming back up)."""
        if self.consumer is not None:
            return True
        try:
            self.consumer = self._new_consumer()
            return True
        except Exception as exc:  # noqa: BLE001 - broker or topic not back yet: wait and try again
            log.warning("waiting for %s to come back: %s", self.topic, exc)
            time.sleep(1.0)
            return False

    def _dead_letter(self, m: RawMessage, error: InvalidEvent) -> None:
        log.warning("DLQ partition %d offset %d: %s", m.partition, m.offset, error.reason)
        if self.offline.record_dlq(m.partition, m.offset, error.error_type, error.reason, m.value):
            self.producer.send(self.settings.topics.dlq, key=m.key, value=dlq_payload(m, self.topic, error))

    # ------------------------------------------------------------------ online store

    def _push_online(self, events: list[InteractionEvent]) -> tuple[int, list[tuple[InteractionEvent, str]]]:
        """Merge ``events`` into their users' online histories; returns the users updated and the events of
        users whose history the online store refused (with its reason), whom it leaves as they were."""
        if not events:
            return 0, []
        users = sorted({e.user_id for e in events})
        missing = [u for u in users if u not in self.history_cache]
        if missing:  # first touch since start or rebalance: read what the online store holds
            current = self.store.get_online_features(HISTORY_FEATURES, [{"user_id": u} for u in missing]).to_dict()
            for i, u in enumerate(missing):
                self.history_cache[u] = {k: current[k][i] or [] for k in HISTORY_COLUMNS}
        new_by_user: dict[int, list[InteractionEvent]] = {}
        for e in events:
            new_by_user.setdefault(e.user_id, []).append(e)
        rows = [self._history_row(u, new_by_user[u]) for u in users]
        refused: list[tuple[InteractionEvent, str]] = []
        try:
            write_online(self.store, "user_history", "user_id", rows, "event_timestamp")
        except DATA_ERRORS:
            # A value the online store cannot hold: write user by user so that only its user is left out.
            rows, refused = self._push_rows_one_by_one(rows, new_by_user)
        except BaseException:
            self.history_cache.clear()  # the store may hold either state now: re-read on next touch
            raise
        for row in rows:
            self.history_cache[row["user_id"]] = {k: row[k] for k in HISTORY_COLUMNS}
        self._dirty_users.update(row["user_id"] for row in rows)
        self._dirty_items.update(e.item_id for e in events)
        self._flush_stats()
        return len(rows), refused

    def _history_row(self, user: int, new: list[InteractionEvent]) -> dict:
        merged = _merge_history(self.history_cache[user], new, self.settings.ingest.history_length)
        return {"user_id": user, **merged, "length": len(merged["item_ids"]),
                "event_timestamp": datetime.fromtimestamp(merged["timestamps_ms"][-1] / 1000, timezone.utc)}

    def _push_rows_one_by_one(self, rows: list[dict], new_by_user: dict[int, list[InteractionEvent]],
                              ) -> tuple[list[dict], list[tuple[InteractionEvent, str]]]:
        written: list[dict] = []
        refused: list[tuple[InteractionEvent, str]] = []
        for row in rows:
            try:
                write_online(self.store, "user_history", "user_id", [row], "event_timestamp")
            except DATA_ERRORS as exc:
                user = row["user_id"]
                log.error("the online store refused the history of user %s: %s", user, exc)
                self.history_cache.pop(user, None)
                reason = f"the online store cannot hold this user's history: {type(exc).__name__}: {str(exc)[:300]}"
                refused.extend((e, reason) for e in new_by_user[user])
            else:
                written.append(row)
        return written, refused

    def _push_user_stats(self, users: list[int]) -> None:
        stats = self.offline.user_stats(users)
        if stats.empty:
            return
        df = with_rates(stats)
        # snapshot time = the latest event it counts: point-in-time joins never see the future
        df["event_timestamp"] = pd.to_datetime(df.pop("last_event_ms"), unit="ms", utc=True)
        write_snapshot(user_stats_dir(self.settings), df)
        self.store.push("user_stats_push", df)

    def _flush_stats(self, force: bool = False) -> None:
        """Aggregates change with every batch but nobody needs them per batch: push every few seconds.

        Histories are pushed per batch (serving reads them); user and item stats at most every
        ``item_stats_interval_s`` and at the end of a run, which halves the online writes per batch.
        """
        due = time.monotonic() - self._stats_pushed_at >= self.settings.ingest.item_stats_interval_s
        if not (self._dirty_items or self._dirty_users) or not (force or due):
            return
        # Under steady traffic push a bounded slice per batch, so no single batch pays for all of it
        # (that spike would show in freshness p99); at the end of a run push everything.
        limit = None if force else STATS_SLICE
        users = _take(self._dirty_users, limit)
        items = _take(self._dirty_items, limit)
        if users:
            self._push_user_stats(users)
        if items:
            stats = self.offline.item_stats(items)
            if not stats.empty:
                push_item_stats(self.store, stats)
        if not (self._dirty_items or self._dirty_users):
            self._stats_pushed_at = time.monotonic()


class ParquetBackend:
    """Where a batch is stored and where a partition resumes: Parquet files + the event-id index
    (``offline.backend: parquet``, the default). ``features/iceberg_ingest.py`` is the Iceberg one."""

    resumes_from_kafka = True  # the group's committed offsets are the resume point (see _broker_lost_state)

    def open(self, ingestor: Ingestor) -> OfflineStore:
        return OfflineStore(ingestor.settings.offline_dir)

    def consumer(self, ingestor: Ingestor) -> PartitionConsumer:
        """The worker's partitions, from the group's committed offsets (else the beginning)."""
        return PartitionConsumer(ingestor.bootstrap, ingestor.settings.ingest.group_id, ingestor.topic,
                                 ingestor._partitions, **ingestor.settings.kafka.client_options())

    def store(self, ingestor: Ingestor, staged: list[StagedEvent], messages: list[RawMessage]) -> WriteResult:
        """Store a batch's valid events (``messages``: the whole batch, invalid ones included)."""
        return ingestor.offline.write(staged) if staged else WriteResult(0, 0, frozenset(), ())


def offline_backend(settings: EncoreSettings):  # noqa: ANN201 - ParquetBackend or IcebergBackend
    if settings.offline.backend == "iceberg":
        from features.iceberg_ingest import IcebergBackend  # pyiceberg is imported only when it is used

        return IcebergBackend()
    return ParquetBackend()


HISTORY_COLUMNS = ("item_ids", "event_types", "timestamps_ms", "played_ratios")
STATS_SLICE = 1000  # users and items whose stats one batch pushes at most while traffic flows


def _take(dirty: set[int], limit: int | None) -> list[int]:
    taken = sorted(dirty) if limit is None else sorted(dirty)[:limit]
    dirty.difference_update(taken)
    return taken


def worker_lock(path: Path):  # noqa: ANN201 - an open file holding an exclusive flock
    """Refuse a second concurrent ingest on the same data dir instead of racing it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held for the worker's lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise RuntimeError(f"another ingest worker owns this partition on this data dir (lock {path})") from None
    return fh


def with_rates(stats: pd.DataFrame) -> pd.DataFrame:
    df = stats.copy()
    events = df["events"].clip(lower=1)
    df["like_rate"] = (df["likes"] / events).astype("float32")
    df["skip_rate"] = (df["skips"] / events).astype("float32")
    return df


def write_snapshot(folder: Path, df: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, folder / f"{time.time_ns()}.parquet")


def push_item_stats(store: FeatureStore, stats: pd.DataFrame) -> None:
    df = with_rates(stats)
    df["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    store.push("item_stats_push", df)


def _merge_history(current: dict[str, list], new: list[InteractionEvent], n: int) -> dict[str, list]:
    """Merge new events into a stored history by event time, idempotently, keeping the last ``n``.

    Histories hold no event ids (they would triple the online row size), so an event is identified by
    (timestamp_ms, item_id, event_type): redelivering it replaces rather than appends.
    """
    by_key: dict[tuple[int, int, str], float] = {}
    for it, ty, t, r in zip(current["item_ids"], current["event_types"], current["timestamps_ms"],
                            current["played_ratios"]):
        by_key[(int(t), int(it), str(ty))] = float(r)
    for e in new:
        by_key[(e.timestamp_ms, e.item_id, e.event_type)] = -1.0 if e.played_ratio is None else float(e.played_ratio)
    keys = sorted(by_key)[-n:]
    return {
        "item_ids": [k[1] for k in keys],
        "event_types": [k[2] for k in keys],
        "timestamps_ms": [k[0] for k in keys],
        # -1 marks "unknown" (Feast arrays hold no nulls)
        "played_ratios": [by_key[k] for k in keys],
    }


def ingest(settings: EncoreSettings, bootstrap: str, **run_kwargs: object) -> IngestReport:
    with Ingestor(settings, bootstrap) as ingestor:
        return ingestor.run(**run_kwargs)  # type: ignore[arg-type]
