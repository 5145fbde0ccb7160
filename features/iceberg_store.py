"""The offline store as Apache Iceberg tables: ``interactions`` and the ``dlq`` ledger, behind a SQL catalog.

Why Iceberg next to the Parquet store (``features/offline_store.py``, still the default): that store keeps a
SQLite event-id index beside its files, so every writer must sit on one host. An Iceberg table needs no side
index: a commit is one atomic swap of the table's metadata pointer in the catalog (a row in SQLite locally, in
PostgreSQL in production), so writers on many hosts append to it, and DuckDB, Spark and Trino read it
without Encore.

Layout (``offline.warehouse``, a path or ``s3://...``)::

    <namespace>/interactions/data/event_day=2026-11-01/00000-0-<uuid>.parquet   # hidden partition: day(event_timestamp)
    <namespace>/interactions/metadata/*.metadata.json, snap-*.avro, *-m0.avro
    <namespace>/dlq/...

Exactly-once without a side index (the Iceberg Kafka sink's scheme): a worker appends a batch's rows and, in
the *same snapshot's summary*, the next Kafka offset of every partition the batch consumed
(``encore.kafka.offset.<group>.<topic>.<partition>``). A worker resumes each partition it owns from the newest
snapshot that carries that partition, never from Kafka's committed offset, so a crash between the table
commit and the Kafka commit re-reads nothing the table holds. Commits are optimistic (the catalog swaps the
pointer only if nobody committed since the writer's base snapshot); a conflict is retried on the refreshed
table, and the recorded offsets are checked again first (``append_batch``): a writer whose partition
another writer has moved is fenced, so even two owners of one partition cannot both store a batch.

Duplicate ``event_id``s from producers (the same event sent twice) are not caught at write time (that would
need the index this design removes); ``compact`` drops them within its window, and every reader here
deduplicates by ``event_id`` anyway, as the Parquet store's readers do.

What pyiceberg 0.12 does not do, and what this module does instead:
- no data-file rewrite (compaction) action: ``compact`` reads a day partition and overwrites it in one
  transaction (a copy-on-write rewrite; conflicting appends make it retry, they are never lost);
- snapshot expiry removes metadata only: ``expire_snapshots`` keeps the snapshots that carry a partition's
  newest offsets, and ``remove_orphan_files`` then deletes files no remaining snapshot references;
- no orphan-file action at all: ``remove_orphan_files`` lists the table location and deletes unreferenced
  files older than a grace period (in-flight writers create files before they commit them).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Sequence

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from sqlalchemy.exc import IntegrityError, OperationalError
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException, NamespaceAlreadyExistsError, TableAlreadyExistsError
from pyiceberg.expressions import And, GreaterThanOrEqual, In, LessThan
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import DayTransform
from pyiceberg.types import BinaryType, FloatType, IntegerType, LongType, NestedField, StringType, TimestamptzType

from features.events import POSITIVE_TYPES
from features.offline_store import DAY_MS, SCHEMA, StagedEvent, _table
from infra.settings import EncoreSettings, OfflineSettings

log = logging.getLogger("encore.iceberg")
logging.getLogger("pyiceberg.io").setLevel(logging.WARNING)  # "Loaded FileIO" on every table load

INTERACTIONS = "interactions"
DLQ = "dlq"
OFFSET_PREFIX = "encore.kafka.offset"
POSITIVE_TYPES_SQL = "(" + ", ".join(f"'{t}'" for t in sorted(POSITIVE_TYPES)) + ")"

# offline_store.SCHEMA with Iceberg field ids; timestamps are microseconds in Iceberg (Arrow ms is cast on write)
ICEBERG_SCHEMA = Schema(
    NestedField(1, "event_id", StringType()),
    NestedField(2, "user_id", LongType()),
    NestedField(3, "item_id", LongType()),
    NestedField(4, "event_type", StringType()),
    NestedField(5, "timestamp_ms", LongType()),
    NestedField(6, "event_timestamp", TimestamptzType()),
    NestedField(7, "played_ratio", FloatType()),
    NestedField(8, "source", StringType()),
    NestedField(9, "request_id", StringType()),
    NestedField(10, "variant", StringType()),
    NestedField(11, "kafka_partition", IntegerType()),
    NestedField(12, "kafka_offset", LongType()),
    NestedField(13, "ingested_at_ms", LongType()),
)
ARROW_SCHEMA = pa.schema([f.with_type(pa.timestamp("us", tz="UTC")) if f.name == "event_timestamp" else f
                          for f in SCHEMA])
# Hidden partitioning: readers filter on event_timestamp and Iceberg prunes days without a partition column.
SPEC = PartitionSpec(PartitionField(source_id=6, field_id=1000, transform=DayTransform(), name="event_day"))

DLQ_SCHEMA = Schema(
    NestedField(1, "kafka_partition", IntegerType()),
    NestedField(2, "kafka_offset", LongType()),
    NestedField(3, "error_type", StringType()),
    NestedField(4, "reason", StringType()),
    NestedField(5, "original", BinaryType()),
    NestedField(6, "recorded_at_ms", LongType()),
)
DLQ_ARROW = pa.schema([("kafka_partition", pa.int32()), ("kafka_offset", pa.int64()), ("error_type", pa.string()),
                       ("reason", pa.string()), ("original", pa.binary()), ("recorded_at_ms", pa.int64())])


def _table_properties(cfg: OfflineSettings) -> dict[str, str]:
    return {
        "format-version": "2",
        "write.target-file-size-bytes": str(cfg.target_file_mb * 1024 * 1024),
        # one manifest per append would make every commit (and planning) O(commits): merge them as we go
        "commit.manifest-merge.enabled": "true",
        # each commit writes a new metadata.json; keep a few, not all
        "write.metadata.delete-after-commit.enabled": "true",
        "write.metadata.previous-versions-max": "20",
        # pyiceberg would retry a conflicting append itself, re-basing it on the other writer's snapshot
        # without looking at the offsets that snapshot recorded: that would let a fenced writer store its
        # batch. Conflicts come back to ``append_batch``, which checks the offsets again before retrying.
        COMMIT_RETRIES: "0",
    }


COMMIT_RETRIES = "commit.retry.num-retries"


class Fenced(RuntimeError):
    """Another writer recorded offsets for a partition this batch covers: the batch is not stored.

    ``recorded`` is the table's next offset for each partition of the batch, to seek to."""

    def __init__(self, recorded: dict[int, int | None]) -> None:
        super().__init__(f"the table's offsets moved under this writer: {recorded}")
        self.recorded = recorded


@dataclass
class CommitStats:
    commits: int = 0
    conflicts: int = 0  # CommitFailedException, retried
    fenced: int = 0


# ---------------------------------------------------------------------------------------------- the catalog


def open_catalog(settings: EncoreSettings) -> SqlCatalog:
    """The SQL catalog of ``settings.offline`` (SQLite under data_dir unless ``catalog_url`` is set)."""
    cfg = settings.offline
    uri = cfg.catalog_uri(settings.root)
    warehouse = cfg.warehouse_uri(settings.root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in warehouse:
        Path(warehouse).mkdir(parents=True, exist_ok=True)
    # Several workers may start at once: creating the catalog's own tables can race; the loser retries.
    for attempt in range(5):
        try:
            return SqlCatalog("encore", uri=uri, warehouse=warehouse, **{"py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"})
        except Exception:  # noqa: BLE001 - e.g. "table iceberg_tables already exists" from a concurrent create
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _ensure_table(catalog: SqlCatalog, namespace: str, name: str, schema: Schema, spec: PartitionSpec | None,
                  properties: dict[str, str]) -> Table:
    try:
        catalog.create_namespace(namespace)
    except (NamespaceAlreadyExistsError, IntegrityError):  # the SQL catalog raises the latter on a race
        pass
    ident = f"{namespace}.{name}"
    if catalog.table_exists(ident):
        table = catalog.load_table(ident)
        if table.properties.get(COMMIT_RETRIES) != properties[COMMIT_RETRIES]:  # a table made elsewhere
            _commit_with_retry(table, lambda t: t.transaction().set_properties(
                **{COMMIT_RETRIES: properties[COMMIT_RETRIES]}).commit_transaction(), 10)
        return table
    try:
        kwargs = {"partition_spec": spec} if spec is not None else {}
        return catalog.create_table(ident, schema=schema, properties=properties, **kwargs)
    except (TableAlreadyExistsError, IntegrityError):  # another worker created it after our check
        return catalog.load_table(ident)


class IcebergStore:
    """The two tables of one platform, opened from its settings."""

    def __init__(self, settings: EncoreSettings) -> None:
        self.cfg = settings.offline
        self.catalog = open_catalog(settings)
        props = _table_properties(self.cfg)
        self.table = _ensure_table(self.catalog, self.cfg.namespace, INTERACTIONS, ICEBERG_SCHEMA, SPEC, props)
        self.dlq = _ensure_table(self.catalog, self.cfg.namespace, DLQ, DLQ_SCHEMA, None, props)
        self.stats = CommitStats()

    # ------------------------------------------------------------------ offsets

    def recorded_offsets(self, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        """Next offset to read per partition, from the newest snapshot that carries it (None: none does)."""
        self.table.refresh()
        return recorded_offsets(self.table, group, topic, partitions)

    # ------------------------------------------------------------------ writes

    def append_batch(self, staged: Sequence[StagedEvent], consumed: dict[int, int], *, group: str, topic: str,
                     expected: dict[int, int | None], now_ms: int | None = None) -> pa.Table:
        """Append a batch's events and its consumed offsets in one snapshot; returns the rows stored.

        ``consumed``: partition -> next offset after this batch (every message counts, valid or not);
        ``expected``: partition -> the next offset this writer believes the table holds (where it started
        reading). A commit conflict is retried on the refreshed table; if the table's offsets no longer
        match ``expected`` another writer stored these messages, and ``Fenced`` is raised instead.
        """
        rows = _arrow(staged, now_ms)
        props = {offset_key(group, topic, p): str(o) for p, o in consumed.items()}
        for attempt in range(self.cfg.commit_retries + 1):
            recorded = self.recorded_offsets(group, topic, consumed)
            if attempt and recorded == consumed:
                return rows  # an earlier attempt committed after all (its catalog call failed afterwards)
            if any(recorded[p] != expected.get(p) for p in consumed):
                self.stats.fenced += 1
                raise Fenced(recorded)
            try:
                # the commit asserts the branch still points at the snapshot read above, so the check and the
                # append are one atomic step against every other writer
                self.table.append(rows, snapshot_properties=props)
                self.stats.commits += 1
                return rows
            except (CommitFailedException, OperationalError):  # a conflict, or the catalog's database was busy
                self.stats.conflicts += 1
                if attempt == self.cfg.commit_retries:
                    raise
                time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 8))  # de-synchronise the writers
        raise AssertionError("unreachable")

    def append_dlq(self, records: list[dict]) -> None:
        """Append DLQ ledger rows (deduplicated on read by partition and offset; see ``dlq_records``)."""
        if not records:
            return
        _commit_with_retry(self.dlq, lambda t: t.append(pa.Table.from_pylist(records, schema=DLQ_ARROW)),
                           self.cfg.commit_retries)

    # ------------------------------------------------------------------ reads

    def read(self, columns: Sequence[str] | None = None, where: str | None = None) -> pd.DataFrame:
        return read_interactions(self.table, columns=columns, where=where)

    def dlq_records(self) -> pd.DataFrame:
        return dlq_records(self.dlq)

    def counts(self) -> dict[str, int]:
        with duckdb.connect() as con:
            con.register("events", _scan(self.table, ["event_id"]))
            n = con.execute("SELECT count(DISTINCT event_id) FROM events").fetchone()[0]
            con.register("dlq", _scan(self.dlq, ["kafka_partition", "kafka_offset"]))
            m = con.execute("SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM dlq)").fetchone()[0]
        return {"events": int(n), "dlq": int(m)}

    def item_stats(self, item_ids: Iterable[int] | None = None, *, window_days: int = 7,
                   now_ms: int | None = None) -> pd.DataFrame:
        return item_stats(self.table, item_ids, window_days=window_days, now_ms=now_ms)

    def user_stats(self, user_ids: Iterable[int] | None = None) -> pd.DataFrame:
        return user_stats(self.table, user_ids)

    def close(self) -> None:
        self.catalog.engine.dispose()


def offset_key(group: str, topic: str, partition: int) -> str:
    return f"{OFFSET_PREFIX}.{group}.{topic}.{partition}"


def recorded_offsets(table: Table, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
    """Walk the snapshots newest first (metadata in memory, no file reads) until every partition is found."""
    wanted = {offset_key(group, topic, p): p for p in partitions}
    found: dict[int, int | None] = {p: None for p in wanted.values()}
    left = set(wanted)
    for snap in sorted(table.metadata.snapshots, key=lambda s: s.sequence_number or 0, reverse=True):
        if not left:
            break
        props = snap.summary.additional_properties if snap.summary is not None else {}
        for key in [k for k in left if k in props]:
            found[wanted[key]] = int(props[key])
            left.discard(key)
    return found


def _commit_with_retry(table: Table, commit, retries: int) -> None:  # noqa: ANN001 - commit(Table) -> None
    for attempt in range(retries + 1):
        try:
            commit(table)
            return
        except CommitFailedException:
            if attempt == retries:
                raise
            time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 8))
            table.refresh()


def _arrow(staged: Sequence[StagedEvent], now_ms: int | None = None) -> pa.Table:
    """The Parquet store's table of these events, with event_timestamp in Iceberg's microseconds."""
    return _table(list(staged), now_ms or int(time.time() * 1000)).cast(ARROW_SCHEMA)


# ---------------------------------------------------------------------------------------------- reads


def _scan(table: Table, columns: Sequence[str] | None = None, row_filter=None,  # noqa: ANN001
          snapshot_id: int | None = None) -> pa.Table:
    """One snapshot of the table as Arrow (through pyiceberg, so any warehouse pyiceberg reads works): the
    current one after a refresh, or ``snapshot_id`` (a pinned read: what a training set names)."""
    if snapshot_id is None:
        table.refresh()
    kwargs = {"row_filter": row_filter} if row_filter is not None else {}
    if snapshot_id is not None:
        kwargs["snapshot_id"] = snapshot_id
    return table.scan(selected_fields=tuple(columns) if columns else ("*",), **kwargs).to_arrow()


# Which copy of a duplicated event_id readers keep: the first stored, by Kafka partition and offset (the
# Spark builder, features/spark_training.py, orders the same way so both keep the same row).
DEDUP_ORDER = ("kafka_partition", "kafka_offset")


def read_interactions(table: Table, columns: Sequence[str] | None = None, where: str | None = None,
                      snapshot_id: int | None = None) -> pd.DataFrame:
    """All stored events, deduplicated by event_id (first by Kafka offset), ordered by user and time: the
    same frame as ``offline_store.read_interactions``. ``where`` is a DuckDB predicate on the columns;
    ``snapshot_id`` reads that snapshot instead of the current one."""
    cols = list(columns) if columns else [f.name for f in SCHEMA]
    select = ", ".join(cols)
    sql = (f"SELECT {select} FROM events {'WHERE ' + where if where else ''} "
           f"QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY {', '.join(DEDUP_ORDER)}) = 1 "
           "ORDER BY user_id, timestamp_ms, event_id")
    with duckdb.connect() as con:  # the same engine and query as the Parquet store's reader: the same dtypes
        con.register("events", _scan(table, snapshot_id=snapshot_id))
        return con.execute(sql).df()


def load_table(settings: EncoreSettings, name: str = INTERACTIONS) -> Table | None:
    """The table for reading, or None before any worker created it (a reader never creates or alters it,
    unlike ``IcebergStore``)."""
    catalog = open_catalog(settings)
    ident = f"{settings.offline.namespace}.{name}"
    try:
        return catalog.load_table(ident) if catalog.table_exists(ident) else None
    finally:
        catalog.engine.dispose()  # the table keeps its own FileIO; no catalog connection stays open


def snapshot_offsets(table: Table, snapshot_id: int, group: str, topic: str) -> dict[int, int]:
    """Next Kafka offset per partition as of ``snapshot_id``: the newest value each partition's key has in
    that snapshot or an older one (offsets only ever move forward, so this is what the snapshot holds)."""
    target = table.metadata.snapshot_by_id(snapshot_id)
    if target is None:
        raise KeyError(f"snapshot {snapshot_id} is not in the table (expired?)")
    prefix = f"{OFFSET_PREFIX}.{group}.{topic}."
    found: dict[int, int] = {}
    older = [s for s in table.metadata.snapshots if (s.sequence_number or 0) <= (target.sequence_number or 0)]
    for snap in sorted(older, key=lambda s: s.sequence_number or 0, reverse=True):
        props = snap.summary.additional_properties if snap.summary is not None else {}
        for key, value in props.items():
            if key.startswith(prefix):
                found.setdefault(int(key.removeprefix(prefix)), int(value))
    return dict(sorted(found.items()))


def data_files(table: Table, snapshot_id: int) -> list[str]:
    """The data files of one snapshot, as scan planning lists them (what an engine without the Iceberg
    runtime, e.g. Spark's plain Parquet reader, must read to see exactly that snapshot). Refuses a
    snapshot with delete files: a plain Parquet reader would not apply them (our writers never make any:
    appends and whole-file overwrites only)."""
    out = []
    for task in table.scan(snapshot_id=snapshot_id).plan_files():
        if task.delete_files:
            raise NotImplementedError(f"{task.file.file_path} has delete files; read it with an Iceberg engine")
        out.append(task.file.file_path)
    return sorted(out)


def dlq_records(table: Table) -> pd.DataFrame:
    with duckdb.connect() as con:
        con.register("dlq", _scan(table))
        return con.execute("SELECT * FROM dlq QUALIFY row_number() OVER (PARTITION BY kafka_partition, kafka_offset "
                           "ORDER BY recorded_at_ms) = 1 ORDER BY kafka_partition, kafka_offset").df()


def _ids_filter(column: str, ids: Iterable[int] | None):  # noqa: ANN202 - a pyiceberg expression or None
    return None if ids is None else In(column, [int(i) for i in ids])


def item_stats(table: Table, item_ids: Iterable[int] | None = None, *, window_days: int = 7,
               now_ms: int | None = None) -> pd.DataFrame:
    """What ``OfflineStore.item_stats`` counts, computed from the table (no counters kept beside it)."""
    item_ids = None if item_ids is None else list(item_ids)
    if item_ids is not None and not item_ids:
        return pd.DataFrame(columns=["item_id", "events", "positives", "likes", "skips", "events_7d", "positives_7d"])
    events = _scan(table, ["event_id", "item_id", "event_type", "timestamp_ms", "kafka_partition", "kafka_offset"],
                   _ids_filter("item_id", item_ids))
    since_ms = ((now_ms or int(time.time() * 1000)) // DAY_MS - window_days + 1) * DAY_MS
    sql = f"""
        WITH e AS (SELECT * FROM events QUALIFY row_number() OVER (PARTITION BY event_id
                   ORDER BY kafka_partition, kafka_offset) = 1)
        SELECT item_id, count(*) AS events, count(*) FILTER (WHERE event_type IN {POSITIVE_TYPES_SQL}) AS positives,
               count(*) FILTER (WHERE event_type = 'like') AS likes, count(*) FILTER (WHERE event_type = 'skip') AS skips,
               count(*) FILTER (WHERE timestamp_ms >= {since_ms}) AS events_7d,
               count(*) FILTER (WHERE timestamp_ms >= {since_ms} AND event_type IN {POSITIVE_TYPES_SQL}) AS positives_7d
        FROM e GROUP BY item_id ORDER BY item_id"""
    with duckdb.connect() as con:
        con.register("events", events)
        return con.execute(sql).df()


def user_stats(table: Table, user_ids: Iterable[int] | None = None) -> pd.DataFrame:
    user_ids = None if user_ids is None else list(user_ids)
    if user_ids is not None and not user_ids:
        return pd.DataFrame(columns=["user_id", "events", "positives", "likes", "skips", "last_event_ms"])
    events = _scan(table, ["event_id", "user_id", "event_type", "timestamp_ms", "kafka_partition", "kafka_offset"],
                   _ids_filter("user_id", user_ids))
    sql = f"""
        WITH e AS (SELECT * FROM events QUALIFY row_number() OVER (PARTITION BY event_id
                   ORDER BY kafka_partition, kafka_offset) = 1)
        SELECT user_id, count(*) AS events, count(*) FILTER (WHERE event_type IN {POSITIVE_TYPES_SQL}) AS positives,
               count(*) FILTER (WHERE event_type = 'like') AS likes, count(*) FILTER (WHERE event_type = 'skip') AS skips,
               max(timestamp_ms) AS last_event_ms
        FROM e GROUP BY user_id ORDER BY user_id"""
    with duckdb.connect() as con:
        con.register("events", events)
        return con.execute(sql).df()


# ---------------------------------------------------------------------------------------------- maintenance


@dataclass
class CompactReport:
    days: list[str] = field(default_factory=list)
    rows_read: int = 0
    duplicates_dropped: int = 0
    files_before: int = 0
    files_after: int = 0
    conflicts: int = 0


def _day_filter(day: date):  # noqa: ANN202 - a pyiceberg expression
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    end = start + timedelta(days=1)
    # on the partition's source column: whole files of that day match, so the overwrite drops files, not rows
    return And(GreaterThanOrEqual("event_timestamp", start.isoformat()), LessThan("event_timestamp", end.isoformat()))


def partition_days(table: Table) -> dict[date, int]:
    """Data files per event day in the current snapshot."""
    table.refresh()
    out: dict[date, int] = {}
    for task in table.scan().plan_files():
        day = date(1970, 1, 1) + timedelta(days=int(task.file.partition[0]))
        out[day] = out.get(day, 0) + 1
    return out


def compact(table: Table, *, days: Sequence[date] | None = None, window_days: int = 2, retries: int = 10,
            today: date | None = None) -> CompactReport:
    """Rewrite day partitions: keep the first stored copy of each event_id (by Kafka partition and offset),
    write the rest as few large files, in one overwrite per day.

    The dedup window: ``days`` (default the last ``window_days`` event days up to ``today``). Copies of one
    event carry one timestamp, so they share a day partition and a per-day rewrite finds them all; an id
    reused by a *different* event on another day is left to the readers, which deduplicate by event_id.
    A writer appending to the same day meanwhile makes the overwrite conflict: it is re-read and retried,
    and the writer's rows are never dropped (the commit asserts the snapshot it read).
    """
    today = today or datetime.now(timezone.utc).date()
    days = list(days) if days is not None else [today - timedelta(days=i) for i in range(window_days)]
    files = partition_days(table)
    report = CompactReport()
    for day in sorted(days):
        if day not in files:
            continue
        for attempt in range(retries + 1):
            table.refresh()
            rows = table.scan(row_filter=_day_filter(day)).to_arrow()
            kept = _first_per_event_id(rows)
            n_files = sum(1 for _ in table.scan(row_filter=_day_filter(day)).plan_files())
            if n_files <= 1 and kept.num_rows == rows.num_rows:
                break  # already one file without duplicates
            try:
                table.overwrite(kept, overwrite_filter=_day_filter(day),
                                snapshot_properties={"encore.maintenance": "compact", "encore.day": day.isoformat()})
            except CommitFailedException:
                report.conflicts += 1
                if attempt == retries:
                    raise
                time.sleep(random.uniform(0.05, 0.2))
                continue
            report.days.append(day.isoformat())
            report.rows_read += rows.num_rows
            report.duplicates_dropped += rows.num_rows - kept.num_rows
            report.files_before += n_files
            table.refresh()
            report.files_after += sum(1 for _ in table.scan(row_filter=_day_filter(day)).plan_files())
            break
    return report


def _first_per_event_id(rows: pa.Table) -> pa.Table:
    if rows.num_rows == 0:
        return rows
    order = pc.sort_indices(rows, [("event_id", "ascending"), ("kafka_partition", "ascending"),
                                   ("kafka_offset", "ascending"), ("ingested_at_ms", "ascending")])
    rows = rows.take(order)
    ids = rows["event_id"]
    # a row is the first of its id when it differs from the previous row's id (rows sorted by id)
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    mask = pa.concat_arrays([pa.array([True])] + [c.fill_null(True) for c in first.chunks]) if len(ids) > 1 \
        else pa.array([True])
    return rows.filter(mask).sort_by([("timestamp_ms", "ascending")]).cast(ARROW_SCHEMA)


def offset_snapshots(table: Table) -> set[int]:
    """Snapshot ids that carry the newest recorded offset of some (group, topic, partition)."""
    newest: dict[str, int] = {}
    for snap in sorted(table.metadata.snapshots, key=lambda s: s.sequence_number or 0, reverse=True):
        props = snap.summary.additional_properties if snap.summary is not None else {}
        for key in props:
            if key.startswith(OFFSET_PREFIX + ".") and key not in newest:
                newest[key] = snap.snapshot_id
    return set(newest.values())


def expire_snapshots(table: Table, *, older_than_s: float, retries: int = 10,
                     keep_ids: Iterable[int] = ()) -> int:
    """Expire snapshots older than ``older_than_s``, except the current one, those carrying a partition's
    newest offsets (the resume point of its worker) and ``keep_ids`` (the snapshots registered models were
    trained on: ``Registry.pinned_snapshot_ids``). Returns how many were expired. Data files stay until
    ``remove_orphan_files``: pyiceberg's expiry rewrites metadata only."""
    for attempt in range(retries + 1):
        table.refresh()
        cutoff_ms = int((time.time() - older_than_s) * 1000)
        keep = offset_snapshots(table) | {int(i) for i in keep_ids}
        current = table.current_snapshot()
        if current is not None:
            keep.add(current.snapshot_id)
        ids = [s.snapshot_id for s in table.metadata.snapshots if s.timestamp_ms < cutoff_ms and s.snapshot_id not in keep]
        if not ids:
            return 0
        try:
            table.maintenance.expire_snapshots().by_ids(ids).commit()
            return len(ids)
        except CommitFailedException:
            if attempt == retries:
                raise
            time.sleep(random.uniform(0.05, 0.2))
    return 0


def referenced_files(table: Table) -> set[str]:
    """Every file a remaining snapshot or the metadata log reaches: metadata, manifest lists, manifests, data."""
    table.refresh()
    io = table.io
    refs = {table.metadata_location, *(entry.metadata_file for entry in table.metadata.metadata_log)}
    for snap in table.metadata.snapshots:
        refs.add(snap.manifest_list)
        for manifest in snap.manifests(io):
            refs.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(io, discard_deleted=False):
                refs.add(entry.data_file.file_path)
    return {_plain(r) for r in refs}


def _plain(uri: str) -> str:
    return uri.removeprefix("file://")


@dataclass
class OrphanReport:
    listed: int = 0
    referenced: int = 0
    deleted: list[str] = field(default_factory=list)
    kept_young: int = 0


def remove_orphan_files(table: Table, *, grace_s: float, dry_run: bool = False) -> OrphanReport:
    """Delete files under the table location that no snapshot references and that are older than
    ``grace_s`` (younger ones may belong to a commit in flight). Local and S3 warehouses (pyarrow's file
    systems)."""
    refs = referenced_files(table)
    fs, root = pafs.FileSystem.from_uri(table.location() if "://" in table.location() else
                                        Path(table.location()).resolve().as_uri())
    cutoff = time.time() - grace_s
    report = OrphanReport(referenced=len(refs))
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        report.listed += 1
        path = info.path if isinstance(fs, pafs.LocalFileSystem) else f"{table.location().split('://')[0]}://{info.path}"
        if _plain(path) in refs:
            continue
        if info.mtime is not None and info.mtime.timestamp() > cutoff:
            report.kept_young += 1
            continue
        if not dry_run:
            fs.delete_file(info.path)
        report.deleted.append(path)
    return report


def expire_store_snapshots(store: IcebergStore, *, older_than_s: float, keep_ids: Iterable[int] = ()) -> int:
    """``expire_snapshots`` on both tables of a store (interactions and the DLQ ledger); ``keep_ids``: the
    interactions snapshots that must stay."""
    keep = set(keep_ids)
    return (expire_snapshots(store.table, older_than_s=older_than_s, retries=store.cfg.commit_retries, keep_ids=keep)
            + expire_snapshots(store.dlq, older_than_s=older_than_s, retries=store.cfg.commit_retries))


def remove_store_orphans(store: IcebergStore, *, grace_s: float, dry_run: bool = False) -> OrphanReport:
    """``remove_orphan_files`` on both tables of a store, one report."""
    total = OrphanReport()
    for table in (store.table, store.dlq):
        r = remove_orphan_files(table, grace_s=grace_s, dry_run=dry_run)
        total.listed += r.listed
        total.referenced += r.referenced
        total.deleted += r.deleted
        total.kept_young += r.kept_young
    return total


# ---------------------------------------------------------------------------------------------- migration


@dataclass
class MigrationReport:
    files: int = 0
    rows_read: int = 0
    duplicates_dropped: int = 0  # extra copies of an event_id inside the Parquet store
    already_in_table: int = 0  # ids the table held before (a re-run, or events ingested since)
    written: int = 0
    dlq_read: int = 0
    dlq_written: int = 0
    offsets: dict[int, int] = field(default_factory=dict)


def migrate_parquet(offline_dir: Path, store: IcebergStore, *, group: str, topic: str,
                    record_offsets: bool = True) -> MigrationReport:
    """Move a Parquet offline store (files + SQLite DLQ ledger) into the tables without loss.

    Idempotent: rows whose event_id the table already holds are skipped, so a re-run writes nothing. Counts:
    ``rows_read = written + duplicates_dropped + already_in_table``. With ``record_offsets`` the snapshot
    also records, per Kafka partition, one past the highest offset the Parquet store holds (stored events
    or DLQ records): Iceberg workers resume there instead of re-reading what was migrated. Run it with the
    Parquet workers stopped.
    """
    import sqlite3

    report = MigrationReport()
    files = sorted(Path(offline_dir).glob("date=*/*.parquet"))
    report.files = len(files)
    tables = [pq.read_table(f, schema=SCHEMA) for f in files]
    rows = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    report.rows_read = rows.num_rows
    rows = _first_per_event_id(rows.cast(ARROW_SCHEMA))
    report.duplicates_dropped = report.rows_read - rows.num_rows
    have = set(_scan(store.table, ["event_id"])["event_id"].to_pylist())
    if have:
        rows = rows.filter(pc.invert(pc.is_in(rows["event_id"], pa.array(sorted(have), pa.string()))))
    report.already_in_table = report.rows_read - report.duplicates_dropped - rows.num_rows

    dlq_rows: list[dict] = []
    index = Path(offline_dir) / "_index.sqlite"
    if index.exists():
        con = sqlite3.connect(index)
        try:
            dlq_rows = [dict(zip(("kafka_partition", "kafka_offset", "error_type", "reason", "original",
                                  "recorded_at_ms"), r)) for r in con.execute("SELECT * FROM dlq")]
        finally:
            con.close()
    report.dlq_read = len(dlq_rows)
    seen = set(map(tuple, _scan(store.dlq, ["kafka_partition", "kafka_offset"]).to_pandas().itertuples(index=False)))
    new_dlq = [r for r in dlq_rows if (r["kafka_partition"], r["kafka_offset"]) not in seen]
    store.append_dlq(new_dlq)
    report.dlq_written = len(new_dlq)

    offsets: dict[int, int] = {}
    for p, o in zip(rows["kafka_partition"].to_pylist(), rows["kafka_offset"].to_pylist()):
        offsets[p] = max(offsets.get(p, 0), o + 1)
    for r in dlq_rows:
        offsets[r["kafka_partition"]] = max(offsets.get(r["kafka_partition"], 0), r["kafka_offset"] + 1)
    props = {"encore.migration": str(offline_dir)}
    if record_offsets:
        current = store.recorded_offsets(group, topic, offsets)
        # never move a partition's resume point backwards (a re-run after workers have ingested)
        offsets = {p: o for p, o in offsets.items() if current[p] is None or current[p] < o}
        props.update({offset_key(group, topic, p): str(o) for p, o in offsets.items()})
        report.offsets = offsets
    if rows.num_rows or (record_offsets and offsets):
        _commit_with_retry(store.table, lambda t: t.append(rows, snapshot_properties=props), store.cfg.commit_retries)
    report.written = rows.num_rows
    return report
