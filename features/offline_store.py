"""The offline store: the system of record of validated interactions.

Layout under ``settings.offline_dir``::

    date=2026-11-01/p0-o1200-6199-1a2b3c4d.parquet   # that event date, from partition 0, offsets 1200..6199
    _index.sqlite                            # event_id -> file, per-item counters, DLQ ledger

Why this shape:
- Parquet partitioned by *event* date, so out-of-order events land where their time says and readers
  (DuckDB, Feast's file offline store, pandas) prune by date.
- Files are written to a temporary name and renamed: a file either exists whole or not at all.
- Exactly-once effect without transactions across systems: the index maps every stored ``event_id`` to the
  file that holds it, and an event counts as stored only when that file exists. A retry after a crash
  (same Kafka messages, possibly different batch boundaries) rewrites exactly the events whose file never
  landed, and skips the rest. Per-item counters move only when an ``event_id`` is new to the index, inside
  the same SQLite transaction, so they never count a replay twice.
- Readers still deduplicate by ``event_id`` (cheap, and a safety net for files copied in by hand).
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.events import InteractionEvent

DAY_MS = 86_400_000

SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event_type", pa.string()),
        ("timestamp_ms", pa.int64()),
        ("event_timestamp", pa.timestamp("ms", tz="UTC")),
        ("played_ratio", pa.float32()),
        ("source", pa.string()),
        ("request_id", pa.string()),
        ("variant", pa.string()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        ("ingested_at_ms", pa.int64()),
    ]
)

_INDEX_DDL = """
CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, file TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS item_counts (
    item_id INTEGER PRIMARY KEY, events INTEGER NOT NULL DEFAULT 0, positives INTEGER NOT NULL DEFAULT 0,
    likes INTEGER NOT NULL DEFAULT 0, skips INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS item_daily (
    item_id INTEGER NOT NULL, day INTEGER NOT NULL, events INTEGER NOT NULL DEFAULT 0,
    positives INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (item_id, day));
CREATE TABLE IF NOT EXISTS user_counts (
    user_id INTEGER PRIMARY KEY, events INTEGER NOT NULL DEFAULT 0, positives INTEGER NOT NULL DEFAULT 0,
    likes INTEGER NOT NULL DEFAULT 0, skips INTEGER NOT NULL DEFAULT 0, last_event_ms INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS dlq (
    kafka_partition INTEGER NOT NULL, kafka_offset INTEGER NOT NULL, error_type TEXT NOT NULL,
    reason TEXT NOT NULL, original BLOB, recorded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (kafka_partition, kafka_offset));
"""


@dataclass(frozen=True)
class StagedEvent:
    event: InteractionEvent
    partition: int
    offset: int


# What a store raises for a value it cannot hold (an id beyond int64, text it cannot encode...), as opposed
# to the store itself failing (a locked database, a full disk): those errors propagate and the batch is
# retried, these reject the one event that caused them.
DATA_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, OverflowError, sqlite3.DataError,
                                             sqlite3.IntegrityError, sqlite3.InterfaceError)


@dataclass(frozen=True)
class WriteResult:
    written: int  # events now stored that were not before (new, or recovered after a crash)
    duplicates: int  # events already stored (a replay or a duplicate delivery)
    new_event_ids: frozenset[str]  # ids first seen by this write (counters moved for these)
    files: tuple[str, ...]
    # One event per event_id of the batch, as the store holds it: the delivered event where this write
    # stored it, the stored one where the id was already there (a redelivery, or another event that
    # reused the id). The online store is fed from these and nothing else.
    accepted: tuple[InteractionEvent, ...] = ()
    # Events the store could not hold, with its reason: nothing of them was stored (see ``write``).
    rejected: tuple[tuple[StagedEvent, str], ...] = ()

    def __add__(self, other: "WriteResult") -> "WriteResult":
        return WriteResult(self.written + other.written, self.duplicates + other.duplicates,
                           self.new_event_ids | other.new_event_ids, self.files + other.files,
                           self.accepted + other.accepted, self.rejected + other.rejected)


class OfflineStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # one Ingestor uses its store from one thread at a time, not always the thread that opened it
        self._db = sqlite3.connect(self.root / "_index.sqlite", timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_INDEX_DDL)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writes

    def write(self, staged: Sequence[StagedEvent]) -> WriteResult:
        """Store a batch idempotently (see the module docstring for why this is exact).

        An event the store cannot hold does not fail the batch: a write is all or nothing for such errors
        (``DATA_ERRORS``), so the batch is split in halves until the events that fail are alone; they come
        back in ``rejected`` and everything else is stored. The normal case pays nothing for this.
        """
        return self._isolate(staged)

    def _isolate(self, staged: Sequence[StagedEvent]) -> WriteResult:
        try:
            return self._write(staged)
        except DATA_ERRORS as exc:
            if len(staged) == 1:
                reason = f"the offline store cannot hold this event: {type(exc).__name__}: {str(exc)[:300]}"
                return WriteResult(0, 0, frozenset(), (), (), ((staged[0], reason),))
        mid = len(staged) // 2
        return self._isolate(staged[:mid]) + self._isolate(staged[mid:])

    def _write(self, staged: Sequence[StagedEvent]) -> WriteResult:
        # 1. keep the first delivery of each event_id inside the batch
        unique: dict[str, StagedEvent] = {}
        for s in staged:
            unique.setdefault(s.event.event_id, s)
        in_batch_dupes = len(staged) - len(unique)
        if not unique:
            return WriteResult(0, in_batch_dupes, frozenset(), ())

        # 2. decide which events must be written: those not stored yet, or whose file never landed
        ids = list(unique)
        known = self._known_files(ids)
        to_write: dict[str, list[StagedEvent]] = defaultdict(list)
        stored_elsewhere: dict[str, list[str]] = defaultdict(list)  # file -> ids it already holds
        for event_id, s in unique.items():
            existing = known.get(event_id)
            if existing is not None and (self.root / existing).exists():
                stored_elsewhere[existing].append(event_id)
            else:
                to_write[_date_of(s.event.timestamp_ms)].append(s)
        duplicates = in_batch_dupes + sum(len(v) for v in stored_elsewhere.values())

        # 3. plan one file per (event date) for this batch, named by its Kafka offsets, and build its
        #    table now: a value Parquet cannot hold fails here, before anything has changed
        first = min(s.offset for s in staged)
        last = max(s.offset for s in staged)
        part = staged[0].partition
        # Offsets make names readable; the random suffix keeps them unique, because offsets repeat when a
        # memory-only broker restarts (a name reused for other events would overwrite stored data).
        tag = uuid.uuid4().hex[:8]
        planned = {d: f"date={d}/p{part}-o{first}-{last}-{tag}.parquet" for d in to_write}
        now_ms = int(time.time() * 1000)
        tables = {d: _table(rows, now_ms) for d, rows in to_write.items()}

        # 4. in one transaction, index the events to write and move the counters for new ones (a value
        #    SQLite cannot hold rolls all of it back)
        new_ids: set[str] = set()
        if to_write:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for date, rows in to_write.items():
                    for s in rows:
                        event_id = s.event.event_id
                        if event_id not in known:
                            new_ids.add(event_id)
                            _bump(cur, s.event)
                        cur.execute(
                            "INSERT INTO events(event_id, file) VALUES (?, ?) "
                            "ON CONFLICT(event_id) DO UPDATE SET file = excluded.file",
                            (event_id, planned[date]),
                        )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

        # 5. write the files (atomic rename); a crash here leaves index rows whose file is missing,
        #    which the retry of the same messages rewrites without moving counters again
        files = []
        for date, table in tables.items():
            _write_table(self.root / planned[date], table)
            files.append(planned[date])
        written = sum(len(r) for r in to_write.values())

        # 6. what the store now holds for each id of the batch: the stored copy of the ids it had already
        if stored_elsewhere:
            already = {i for ids in stored_elsewhere.values() for i in ids}
            stored = self._stored_events(stored_elsewhere)
            accepted = tuple(stored[i] if i in already else s.event for i, s in unique.items()
                             if i not in already or i in stored)
        else:
            accepted = tuple(s.event for s in unique.values())
        return WriteResult(written, duplicates, frozenset(new_ids), tuple(files), accepted)

    def _stored_events(self, ids_by_file: dict[str, list[str]]) -> dict[str, InteractionEvent]:
        """The stored copies of these events (read back only for duplicates, never in the normal case)."""
        out: dict[str, InteractionEvent] = {}
        for file, ids in ids_by_file.items():
            table = pq.read_table(self.root / file, columns=list(_EVENT_COLUMNS), filters=[("event_id", "in", ids)])
            for row in table.to_pylist():
                out[row["event_id"]] = InteractionEvent.model_construct(**row)  # validated when stored
        return out

    def _known_files(self, ids: list[str]) -> dict[str, str]:
        known: dict[str, str] = {}
        for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[i : i + 900]
            q = f"SELECT event_id, file FROM events WHERE event_id IN ({','.join('?' * len(chunk))})"
            known.update(dict(self._db.execute(q, chunk).fetchall()))
        return known

    def record_dlq(self, partition: int, offset: int, error_type: str, reason: str, original: bytes | None) -> bool:
        """Remember a rejected message; returns False when this (partition, offset) was recorded before."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO dlq VALUES (?, ?, ?, ?, ?, ?)",
            (partition, offset, error_type, reason, original, int(time.time() * 1000)),
        )
        return cur.rowcount == 1

    # ------------------------------------------------------------------ reads

    def item_stats(self, item_ids: Iterable[int] | None = None, *, window_days: int = 7,
                   now_ms: int | None = None) -> pd.DataFrame:
        """All-time counts per item plus events/positives over the last ``window_days`` (by event time)."""
        since_day = ((now_ms or int(time.time() * 1000)) // DAY_MS) - window_days + 1
        q = (
            "SELECT c.item_id, c.events, c.positives, c.likes, c.skips, "
            "COALESCE(w.events, 0) AS events_7d, COALESCE(w.positives, 0) AS positives_7d "
            "FROM item_counts c LEFT JOIN (SELECT item_id, sum(events) AS events, sum(positives) AS positives "
            "FROM item_daily WHERE day >= ? GROUP BY item_id) w ON w.item_id = c.item_id WHERE 1=1"
        )
        return self._select(q, [since_day], "c.item_id", item_ids)

    def user_stats(self, user_ids: Iterable[int] | None = None) -> pd.DataFrame:
        q = "SELECT user_id, events, positives, likes, skips, last_event_ms FROM user_counts WHERE 1=1"
        return self._select(q, [], "user_id", user_ids)

    def _select(self, q: str, params: list, key: str, ids: Iterable[int] | None) -> pd.DataFrame:
        """``q`` ends in a WHERE clause; restrict it to ``ids`` in chunks (SQLite's parameter limit)."""
        if ids is None:
            return pd.read_sql_query(q, self._db, params=params)
        ids = list(ids)
        frames = []
        for i in range(0, max(len(ids), 1), 900):
            chunk = ids[i : i + 900]
            sql = q + (f" AND {key} IN ({','.join('?' * len(chunk))})" if chunk else " AND 0")
            frames.append(pd.read_sql_query(sql, self._db, params=params + chunk))
        return pd.concat(frames, ignore_index=True)

    def counts(self) -> dict[str, int]:
        events = self._db.execute("SELECT count(*) FROM events").fetchone()[0]
        dlq = self._db.execute("SELECT count(*) FROM dlq").fetchone()[0]
        return {"events": int(events), "dlq": int(dlq)}

    def dlq_records(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM dlq ORDER BY kafka_partition, kafka_offset", self._db)

    def files(self) -> list[Path]:
        return sorted(self.root.glob("date=*/*.parquet"))

    def read(self, columns: Sequence[str] | None = None, where: str | None = None) -> pd.DataFrame:
        """All stored events (deduplicated by event_id), ordered by user and time."""
        return read_interactions(self.root, columns=columns, where=where)


def read_interactions(root: Path, columns: Sequence[str] | None = None, where: str | None = None) -> pd.DataFrame:
    files = sorted(Path(root).glob("date=*/*.parquet"))
    cols = list(columns) if columns else [f.name for f in SCHEMA]
    if not files:
        return pd.DataFrame({c: pd.Series(dtype=_pandas_dtype(c)) for c in cols})
    glob = str(Path(root) / "date=*" / "*.parquet")
    select = ", ".join(cols)
    sql = (
        f"SELECT {select} FROM read_parquet('{glob}', hive_partitioning=false, union_by_name=true) "
        f"{'WHERE ' + where if where else ''} "
        "QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY kafka_offset) = 1 "
        "ORDER BY user_id, timestamp_ms, event_id"
    )
    with duckdb.connect() as con:
        return con.execute(sql).df()


def _pandas_dtype(col: str) -> str:
    field = SCHEMA.field(col)
    if pa.types.is_integer(field.type):
        return "int64"
    if pa.types.is_floating(field.type):
        return "float32"
    if pa.types.is_timestamp(field.type):
        return "datetime64[ms, UTC]"
    return "object"


def _bump(cur: sqlite3.Cursor, e: InteractionEvent) -> None:
    pos, like, skip = int(e.is_positive), int(e.event_type == "like"), int(e.event_type == "skip")
    cur.execute(
        "INSERT INTO item_counts(item_id, events, positives, likes, skips) VALUES (?, 1, ?, ?, ?) "
        "ON CONFLICT(item_id) DO UPDATE SET events = events + 1, positives = positives + excluded.positives, "
        "likes = likes + excluded.likes, skips = skips + excluded.skips",
        (e.item_id, pos, like, skip),
    )
    cur.execute(
        "INSERT INTO item_daily(item_id, day, events, positives) VALUES (?, ?, 1, ?) "
        "ON CONFLICT(item_id, day) DO UPDATE SET events = events + 1, positives = positives + excluded.positives",
        (e.item_id, e.timestamp_ms // DAY_MS, pos),
    )
    cur.execute(
        "INSERT INTO user_counts(user_id, events, positives, likes, skips, last_event_ms) VALUES (?, 1, ?, ?, ?, ?) "
        "ON CONFLICT(user_id) DO UPDATE SET events = events + 1, positives = positives + excluded.positives, "
        "likes = likes + excluded.likes, skips = skips + excluded.skips, "
        "last_event_ms = max(last_event_ms, excluded.last_event_ms)",
        (e.user_id, pos, like, skip, e.timestamp_ms),
    )


def _date_of(timestamp_ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp_ms / 1000))


_EVENT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "timestamp_ms", "played_ratio", "source",
                  "request_id", "variant")


def _table(rows: list[StagedEvent], now_ms: int) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    for s in rows:
        e = s.event
        cols["event_id"].append(e.event_id)
        cols["user_id"].append(e.user_id)
        cols["item_id"].append(e.item_id)
        cols["event_type"].append(e.event_type)
        cols["timestamp_ms"].append(e.timestamp_ms)
        cols["event_timestamp"].append(e.timestamp_ms)
        cols["played_ratio"].append(e.played_ratio)
        cols["source"].append(e.source)
        cols["request_id"].append(e.request_id)
        cols["variant"].append(e.variant)
        cols["kafka_partition"].append(s.partition)
        cols["kafka_offset"].append(s.offset)
        cols["ingested_at_ms"].append(now_ms)
    return pa.table(cols, schema=SCHEMA)


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
