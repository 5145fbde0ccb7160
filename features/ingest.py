"""Ingest: Kafka ``interactions`` → validation → offline store → Feast online store → commit offsets.

Feast does not consume Kafka itself (its KafkaSource needs a Spark processor), so Encore owns this path.
Per bounded batch, in this order (each step idempotent, so a crash anywhere is repaired by a retry):

1. validate every message; rejects go to the DLQ ledger and the ``interactions.dlq`` topic with the reason
   and the original bytes (the run goes on);
2. write valid events to the offline store (system of record; deduplicated by ``event_id``);
3. push the affected users' ``user_history`` and items' ``item_stats`` to the Feast online store;
4. only then commit the Kafka offsets.

A crash before step 4 redelivers the batch; step 2 skips what it already holds and step 3 merges by a
natural key, so nothing is lost and nothing counts twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
from feast import FeatureStore
from kafka import KafkaConsumer, KafkaProducer

from features.events import InteractionEvent, InvalidEvent, parse_event
from features.feature_repo import feature_store
from features.kafka_io import RawMessage, commit_batch, dlq_payload, make_consumer, make_producer, poll_batch
from features.offline_store import OfflineStore, StagedEvent
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

    def as_metadata(self) -> dict:
        return asdict(self)


class Ingestor:
    """Owns one consumer, producer, offline store and Feast store for the life of an ingest run."""

    def __init__(self, settings: EncoreSettings, bootstrap: str, *, store: FeatureStore | None = None) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.topic = settings.topics.interactions
        self.offline = OfflineStore(settings.offline_dir)
        self.store = store or feature_store(settings)
        self.consumer: KafkaConsumer = make_consumer(
            bootstrap, settings.ingest.group_id, self.topic, max_poll_records=settings.ingest.batch_size
        )
        self.producer: KafkaProducer = make_producer(bootstrap)

    def close(self) -> None:
        for closer in (self.consumer.close, self.producer.close, self.offline.close):
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
    ) -> IngestReport:
        """Consume bounded batches until the topic is idle (or ``max_batches``)."""
        report = IngestReport()
        freshness: list[float] = []
        start = time.monotonic()
        idle_ms = idle_ms if idle_ms is not None else self.settings.ingest.poll_timeout_ms
        while max_batches is None or report.batches < max_batches:
            messages = poll_batch(self.consumer, self.settings.ingest.batch_size, idle_ms)
            if not messages:
                break
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
        # Offline first: the system of record.
        if staged:
            result = self.offline.write(staged)
            rep.written, rep.duplicates = result.written, result.duplicates
            # Online next: always merge the whole batch (idempotent), so a crash between the offline
            # write and this push is repaired by the redelivery.
            rep.users_updated = self._push_online([s.event for s in staged])
        self.producer.flush()  # DLQ records are durable before offsets move
        commit_batch(self.consumer, self.topic, messages)
        done_ms = time.time() * 1000
        rep.freshness_s = [(done_ms - m.timestamp_ms) / 1000 for m in messages if m.timestamp_ms and m.timestamp_ms > 0]
        rep.seconds = time.monotonic() - t0
        log.info(
            "batch offsets %s..%s: %d consumed, %d written, %d duplicate, %d to DLQ, %d users updated (%.2fs)",
            rep.first_offset, rep.last_offset, rep.consumed, rep.written, rep.duplicates, rep.dlq,
            rep.users_updated, rep.seconds,
        )
        return rep

    def _dead_letter(self, m: RawMessage, error: InvalidEvent) -> None:
        log.warning("DLQ partition %d offset %d: %s", m.partition, m.offset, error.reason)
        if self.offline.record_dlq(m.partition, m.offset, error.error_type, error.reason, m.value):
            self.producer.send(self.settings.topics.dlq, key=m.key, value=dlq_payload(m, self.topic, error))

    # ------------------------------------------------------------------ online store

    def _push_online(self, events: list[InteractionEvent]) -> int:
        users = sorted({e.user_id for e in events})
        current = self.store.get_online_features(HISTORY_FEATURES, [{"user_id": u} for u in users]).to_dict()
        new_by_user: dict[int, list[InteractionEvent]] = {}
        for e in events:
            new_by_user.setdefault(e.user_id, []).append(e)
        n = self.settings.ingest.history_length
        rows = []
        for i, u in enumerate(users):
            merged = _merge_history(
                current["item_ids"][i] or [],
                current["event_types"][i] or [],
                current["timestamps_ms"][i] or [],
                current["played_ratios"][i] or [],
                new_by_user[u],
                n,
            )
            rows.append({"user_id": u, **merged, "length": len(merged["item_ids"]),
                         "event_timestamp": pd.Timestamp(max(merged["timestamps_ms"]), unit="ms", tz="UTC")})
        self.store.push("user_history_push", pd.DataFrame(rows))
        self._push_item_stats(sorted({e.item_id for e in events}))
        return len(users)

    def _push_item_stats(self, items: list[int]) -> None:
        stats = self.offline.item_stats(items)
        if stats.empty:
            return
        push_item_stats(self.store, stats)


def push_item_stats(store: FeatureStore, stats: pd.DataFrame) -> None:
    df = stats.copy()
    events = df["events"].clip(lower=1)
    df["like_rate"] = (df["likes"] / events).astype("float32")
    df["skip_rate"] = (df["skips"] / events).astype("float32")
    df["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    store.push("item_stats_push", df)


def _merge_history(
    items: list[int], types: list[str], ts: list[int], ratios: list[float], new: list[InteractionEvent], n: int
) -> dict[str, list]:
    """Merge new events into a stored history by event time, idempotently, keeping the last ``n``.

    Histories hold no event ids (they would triple the online row size), so an event is identified by
    (timestamp_ms, item_id, event_type): redelivering it replaces rather than appends.
    """
    by_key: dict[tuple[int, int, str], float] = {}
    for it, ty, t, r in zip(items, types, ts, ratios):
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
