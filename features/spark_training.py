"""The training set built by Spark: the same rows as ``features.offline_read.training_events``, from the same
snapshot, for when the offline store outgrows one process.

What is built: every stored event up to a cut-off (event time, inclusive), one row per ``event_id`` (the
first stored copy: the lowest Kafka partition and offset, as the in-process readers keep), the columns the
trainer reads (``TRAINING_COLUMNS``), ordered by user, time and id: per user, the sequence as of the cut-off.

How the snapshot is read: the Iceberg Spark runtime (``iceberg-spark-runtime``, a Maven jar) is what lets
Spark read a table by name (``spark.read.table("encore.interactions")`` with ``snapshot-id``). Without it
(no Maven access here), pyiceberg plans the scan of the snapshot, which lists exactly its data files, and
Spark reads those with its plain Parquet reader. That is the same set of files the runtime would read as
long as the snapshot has no delete files (our writers make none; ``iceberg_store.data_files`` refuses them)
and the schema was never renamed (Parquet columns are matched by name here, by field id in Iceberg). On a
cluster with the runtime jar, ``spark.read.option("snapshot-id", id).table(...)`` replaces ``_read``.

The Parquet backend works too: its files are listed as the in-process reader lists them.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from features.offline_read import TRAINING_COLUMNS
from infra.settings import EncoreSettings


def snapshot_files(settings: EncoreSettings, snapshot_id: int | None) -> tuple[list[str], tuple[str, ...], int | None]:
    """(data files, the order that picks the kept copy of an event_id, the snapshot read) of the store."""
    if settings.offline.backend == "iceberg":
        from features.iceberg_store import DEDUP_ORDER, data_files, load_table

        table = load_table(settings)
        if table is None:
            return [], DEDUP_ORDER, None
        if snapshot_id is None:
            snap = table.current_snapshot()
            snapshot_id = snap.snapshot_id if snap is not None else None
        return (data_files(table, snapshot_id) if snapshot_id is not None else []), DEDUP_ORDER, snapshot_id
    if snapshot_id is not None:
        raise ValueError("the Parquet offline store has no snapshots (snapshot_id needs offline.backend: iceberg)")
    # offline_store.read_interactions keeps the lowest kafka_offset of an event_id
    return [str(f) for f in sorted(settings.offline_dir.glob("date=*/*.parquet"))], ("kafka_offset",), None


def spark_session(master: str, app_name: str = "encore-training-set",
                  extra_conf: dict[str, str] | None = None):  # noqa: ANN201 - a SparkSession
    """A Spark session for small driver-side results: Arrow for toPandas, few shuffle partitions, no UI.
    ``extra_conf``: more Spark settings (tests pass JVM flags that start faster on tiny data)."""
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(master).appName(app_name)
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")  # progress bars garble Dagster's step logs
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.shuffle.partitions", "4"))  # the defaults' 200 cost seconds on small sets
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _read(spark, files: Sequence[str]):  # noqa: ANN001, ANN202 - SparkSession -> DataFrame
    return spark.read.parquet(*files)


def spark_training_events(settings: EncoreSettings, snapshot_id: int | None = None, cutoff_ms: int | None = None,
                          spark=None) -> pd.DataFrame:  # noqa: ANN001 - an optional SparkSession
    """``offline_read.training_events`` computed by Spark (``spark``, else the process's active session, else a
    new one on ``offline.spark_master``, stopped afterwards): the same rows, columns, order and dtypes."""
    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    files, order, _ = snapshot_files(settings, snapshot_id)
    if not files:
        from features.offline_read import empty_frame

        return empty_frame(TRAINING_COLUMNS)
    spark = spark or SparkSession.getActiveSession()
    own = spark is None  # a session somebody else started is theirs to stop
    spark = spark or spark_session(settings.offline.spark_master)
    try:
        events = _read(spark, files).select(*TRAINING_COLUMNS)
        if cutoff_ms is not None:
            events = events.where(F.col("timestamp_ms") <= int(cutoff_ms))  # before dedup, as the SQL readers
        first = Window.partitionBy("event_id").orderBy(*[F.col(c).asc() for c in order])
        events = events.withColumn("_copy", F.row_number().over(first)).where(F.col("_copy") == 1).drop("_copy")
        return events.orderBy("user_id", "timestamp_ms", "event_id").toPandas()
    finally:
        if own:
            spark.stop()
