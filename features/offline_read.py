"""The one reader of the offline store (the system of record), whichever backend holds it.

Every component that reads stored interactions (the training snapshot, the ranking dataset, the A/B report,
serving's popularity fallback, the retrain sensor, the ingest checks) calls these functions with the settings
and never asks which backend is configured: ``offline.backend`` is decided here, once.

- parquet (the default): ``features/offline_store.py``'s files and SQLite index, read exactly as before.
- iceberg: the ``interactions`` table of ``features/iceberg_store.py``. A read can be pinned to a snapshot
  (``snapshot_id``), so a training set names the exact table state it saw and can be rebuilt from it
  (by DuckDB here, or by Spark: ``features/spark_training.py``).

Both return the same frame: events deduplicated by ``event_id``, ordered by user, time and id, with the
offline schema's dtypes.

Feast's ``interactions`` source is a ``FileSource`` (Feast has no Iceberg offline store). With the Iceberg
backend it points at ``feast_source_dir``: a Parquet copy of one table snapshot in the Parquet store's layout
(``date=YYYY-MM-DD/*.parquet``), written by ``export_snapshot`` when a training snapshot is taken. Feast (and
any reader of that layout) sees the snapshot the latest model was trained on, never a half-written state.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features import offline_store
from features.offline_store import SCHEMA
from infra.settings import EncoreSettings

# The frame the training asset hands to training (models.train reads these columns; the Kafka columns name
# the data's lineage): what both training-set builders produce.
TRAINING_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "timestamp_ms", "played_ratio",
                    "kafka_partition", "kafka_offset")


def _iceberg(settings: EncoreSettings) -> bool:
    return settings.offline.backend == "iceberg"


def read_interactions(settings: EncoreSettings, columns: Sequence[str] | None = None, where: str | None = None,
                      snapshot_id: int | None = None) -> pd.DataFrame:
    """Stored events, deduplicated by event_id, ordered by user_id, timestamp_ms, event_id.

    ``where``: a DuckDB predicate on the stored columns (applied before deduplication, as in both stores);
    ``snapshot_id``: an Iceberg snapshot to read instead of the current state (Parquet has none)."""
    if _iceberg(settings):
        from features.iceberg_store import load_table
        from features.iceberg_store import read_interactions as read_table

        table = load_table(settings)
        if table is None:
            return empty_frame(columns)
        return read_table(table, columns=columns, where=where, snapshot_id=snapshot_id)
    if snapshot_id is not None:
        raise ValueError("the Parquet offline store has no snapshots (snapshot_id needs offline.backend: iceberg)")
    return offline_store.read_interactions(settings.offline_dir, columns=columns, where=where)


def training_events(settings: EncoreSettings, snapshot_id: int | None = None,
                    cutoff_ms: int | None = None) -> pd.DataFrame:
    """The training set built in process: ``TRAINING_COLUMNS`` of every event up to ``cutoff_ms`` (event time,
    inclusive; None: all) in the snapshot. ``features.spark_training.spark_training_events`` builds the same
    rows with Spark; ``features.training_set.build_training_set`` picks one of the two."""
    where = f"timestamp_ms <= {int(cutoff_ms)}" if cutoff_ms is not None else None
    return read_interactions(settings, columns=TRAINING_COLUMNS, where=where, snapshot_id=snapshot_id)


def describe_snapshot(settings: EncoreSettings) -> dict:
    """What the store holds now, for lineage: the backend, its location, and

    - parquet: ``files`` (relative paths of the data files);
    - iceberg: ``snapshot_id`` (None while the table is empty), ``committed_at_ms``, ``kafka_offsets`` (the
      next offset per partition of the ingest group, as recorded in the snapshot summaries up to this
      snapshot) and ``files`` (the snapshot's data files, relative to the table location).

    Read with ``snapshot_id`` from here, a training set is exactly this state even while workers append."""
    if not _iceberg(settings):
        root = settings.offline_dir
        return {"backend": "parquet", "source": str(root),
                "files": sorted(str(f.relative_to(root)) for f in root.glob("date=*/*.parquet"))}
    from features.iceberg_store import data_files, load_table, snapshot_offsets

    cfg = settings.offline
    out: dict = {"backend": "iceberg", "source": f"{cfg.namespace}.interactions", "location": None,
                 "snapshot_id": None, "committed_at_ms": None, "kafka_offsets": {}, "files": []}
    table = load_table(settings)
    snap = table.current_snapshot() if table is not None else None
    if snap is None:
        return out
    location = table.location().rstrip("/") + "/"
    out.update(location=table.location(), snapshot_id=snap.snapshot_id, committed_at_ms=snap.timestamp_ms,
               kafka_offsets={str(p): o for p, o in snapshot_offsets(
                   table, snap.snapshot_id, settings.ingest.group_id, settings.topics.interactions).items()},
               files=[f.removeprefix("file://").removeprefix(location.removeprefix("file://"))
                      for f in data_files(table, snap.snapshot_id)])
    return out


def item_stats(settings: EncoreSettings, item_ids: Sequence[int] | None = None, *, window_days: int = 7,
               now_ms: int | None = None) -> pd.DataFrame:
    """Per-item counts (all time and the last ``window_days``): serving's popularity fallback reads these."""
    if _iceberg(settings):
        from features.iceberg_store import item_stats as table_item_stats
        from features.iceberg_store import load_table

        table = load_table(settings)
        if table is None:
            return pd.DataFrame(columns=["item_id", "events", "positives", "likes", "skips", "events_7d",
                                         "positives_7d"])
        return table_item_stats(table, item_ids, window_days=window_days, now_ms=now_ms)
    store = offline_store.OfflineStore(settings.offline_dir)
    try:
        return store.item_stats(item_ids, window_days=window_days, now_ms=now_ms)
    finally:
        store.close()


def count_events(settings: EncoreSettings) -> int | None:
    """Distinct stored events; None when there is no store yet (nothing ingested)."""
    if _iceberg(settings):
        from features.iceberg_store import _scan, load_table

        table = load_table(settings)
        if table is None:
            return None
        return int(pc.count_distinct(_scan(table, ["event_id"])["event_id"]).as_py())
    if not settings.offline_dir.exists():
        return None
    store = offline_store.OfflineStore(settings.offline_dir)
    try:
        return store.counts()["events"]
    finally:
        store.close()


def last_ingested_ms(settings: EncoreSettings) -> int | None:
    """When the newest stored batch was written (ingest's clock, ms); None when nothing is stored."""
    if _iceberg(settings):
        from features.iceberg_store import load_table

        table = load_table(settings)
        if table is None:
            return None
        # the newest snapshot that added rows: maintenance rewrites (overwrites) are not ingest
        appends = [s.timestamp_ms for s in table.metadata.snapshots
                   if s.summary is not None and s.summary.operation.value == "append"
                   and int(s.summary.additional_properties.get("added-records", "0")) > 0]
        return max(appends) if appends else None
    import duckdb

    files = sorted(settings.offline_dir.glob("date=*/*.parquet"), key=lambda f: f.stat().st_mtime)
    if not files:
        return None
    with duckdb.connect() as con:
        return con.execute(f"SELECT max(ingested_at_ms) FROM read_parquet('{files[-1]}')").fetchone()[0]


def schema_mismatches(settings: EncoreSettings, newest: int = 200) -> tuple[int, list[str]]:
    """(items checked, those whose schema differs from the offline schema): the newest ``newest`` Parquet
    files, or the Iceberg table's schema (one item: the table enforces it on every write)."""
    if _iceberg(settings):
        from features.iceberg_store import ARROW_SCHEMA, load_table

        table = load_table(settings)
        if table is None:
            return 0, []
        names = [f.name for f in table.schema().fields]
        return 1, ([] if names == ARROW_SCHEMA.names else [f"{table.name()}: {names}"])
    files = sorted(settings.offline_dir.glob("date=*/*.parquet"))[-newest:]
    bad = [f.name for f in files if not pq.read_schema(f).remove_metadata().equals(SCHEMA)]
    return len(files), bad


# ---------------------------------------------------------------------------------------------- Feast


def feast_source_dir(settings: EncoreSettings) -> Path:
    """The folder behind Feast's ``interactions`` FileSource: the Parquet store itself, or with Iceberg the
    Parquet copy of the latest exported snapshot."""
    if _iceberg(settings):
        return settings.root / "offline" / "feast_interactions"
    return settings.offline_dir


def export_snapshot(settings: EncoreSettings, snapshot_id: int) -> Path:
    """Write one Iceberg snapshot (deduplicated, the offline schema) as ``date=YYYY-MM-DD/snapshot-<id>.parquet``
    files under ``feast_source_dir``, then remove other snapshots' files. Idempotent per snapshot.

    Why a copy: Feast's file offline store reads Parquet paths, not Iceberg metadata; pointing it at the
    table's data folder would also show files no snapshot references (compacted away, not yet cleaned) and
    duplicates compaction has not reached. A reader between the write and the cleanup sees two copies of
    each event, which every reader removes by event_id."""
    folder = feast_source_dir(settings)
    name = f"snapshot-{snapshot_id}.parquet"
    df = read_interactions(settings, snapshot_id=snapshot_id)
    if not any(folder.glob(f"date=*/{name}")):
        table = pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)
        days = pd.to_datetime(df["timestamp_ms"], unit="ms", utc=True).dt.strftime("%Y-%m-%d").to_numpy()
        for day in sorted(set(days)):
            path = folder / f"date={day}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
            pq.write_table(table.filter(pa.array(days == day)), tmp)
            os.replace(tmp, path)  # a file is there whole or not at all
    for old in folder.glob("date=*/snapshot-*.parquet"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder


def empty_frame(columns: Sequence[str] | None) -> pd.DataFrame:
    """The Parquet reader's frame for a store without files (typed, no rows)."""
    cols = list(columns) if columns else SCHEMA.names
    return pd.DataFrame({c: pd.Series(dtype=offline_store._pandas_dtype(c)) for c in cols})
