"""The Spark-built training set equals the in-process one, row for row, on the same Iceberg snapshot (and on
the Parquet store), in Spark's local mode on a real JVM."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from features.events import InteractionEvent
from features.iceberg_store import IcebergStore, compact
from features.offline_read import training_events
from features.offline_store import OfflineStore, StagedEvent
from infra.settings import EncoreSettings
from tests.test_iceberg_store import DAY0, GROUP, TOPIC, iceberg_settings

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        message = "no Java runtime for Spark (apt-get install openjdk-17-jre-headless; .ci/run does this)"
        if os.environ.get("REQUIRE_PRODUCTION_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from features.spark_training import spark_session

    # C1-only JIT and the serial GC start the JVM in about half the time; tiny data never needs C2
    session = spark_session("local[1]", "encore-test", {
        "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC",
        "spark.sql.shuffle.partitions": "1"})
    yield session
    session.stop()


def stream(n: int, partition: int, first_offset: int) -> list[StagedEvent]:
    """Events over three days, out of time order, with nulls where the schema allows them."""
    out = []
    for k in range(n):
        i = first_offset + k
        out.append(StagedEvent(InteractionEvent(
            event_id=f"p{partition}-{i}", user_id=(i * 7) % 11, item_id=(i * 13) % 17,
            event_type=("like", "listen", "skip")[i % 3], timestamp_ms=DAY0 + (i * 7919) % (3 * DAY_MS),
            played_ratio=None if i % 5 == 0 else (i % 10) / 10, variant=None if i % 2 else "b"), partition, i))
    return out


def append(store: IcebergStore, staged: list[StagedEvent], partition: int) -> None:
    before = store.recorded_offsets(GROUP, TOPIC, [partition])[partition]
    store.append_batch(staged, {partition: staged[-1].offset + 1}, group=GROUP, topic=TOPIC,
                       expected={partition: before})


def test_spark_builds_the_in_process_training_set_from_the_same_snapshot(tmp_path, spark):
    from features.spark_training import spark_training_events

    settings = iceberg_settings(tmp_path)
    store = IcebergStore(settings)
    append(store, stream(120, 0, 0), 0)
    append(store, stream(80, 1, 0), 1)
    append(store, stream(60, 0, 120), 0)
    # producer duplicates: copies of stored events at later offsets of another partition (Spark must keep
    # the same copy as DuckDB: the lowest partition, then offset)
    dupes = [StagedEvent(s.event, 1, 80 + k) for k, s in enumerate(stream(120, 0, 0)[::10])]
    append(store, dupes, 1)
    snapshot = store.table.current_snapshot().snapshot_id
    append(store, stream(40, 1, 200), 1)  # after the snapshot: neither builder may see it
    cutoff = DAY0 + DAY_MS + DAY_MS // 2

    for cut in (cutoff, None):
        inprocess = training_events(settings, snapshot, cutoff_ms=cut)
        built = spark_training_events(settings, snapshot, cutoff_ms=cut, spark=spark)
        assert len(inprocess) == (len(inprocess[inprocess.timestamp_ms <= cut]) if cut else 260)
        pd.testing.assert_frame_equal(built, inprocess)  # values, dtypes, order: row for row
    assert len(training_events(settings)) == 300

    # after compaction (a new snapshot with rewritten files and the duplicates gone) they still agree
    compact(store.table, days=sorted({pd.Timestamp(DAY0 + d * DAY_MS, unit="ms").date() for d in range(3)}))
    compacted = store.table.current_snapshot().snapshot_id
    store.close()
    pd.testing.assert_frame_equal(spark_training_events(settings, compacted, cutoff_ms=cutoff, spark=spark),
                                  training_events(settings, compacted, cutoff_ms=cutoff))


def test_spark_reads_the_parquet_store_the_same_way(tmp_path, spark):
    from features.spark_training import spark_training_events

    settings = EncoreSettings(data_dir=tmp_path / "p")
    store = OfflineStore(settings.offline_dir)
    store.write(stream(150, 0, 0))
    store.write(stream(50, 1, 0))
    store.close()
    pd.testing.assert_frame_equal(spark_training_events(settings, cutoff_ms=DAY0 + DAY_MS, spark=spark),
                                  training_events(settings, cutoff_ms=DAY0 + DAY_MS))


def test_the_training_set_is_built_by_the_engine_the_settings_choose(tmp_path, spark):
    from features.training_set import build_training_set  # what the training_dataset asset calls

    base = iceberg_settings(tmp_path)
    store = IcebergStore(base)
    append(store, stream(90, 0, 0), 0)
    sid = store.table.current_snapshot().snapshot_id
    store.close()
    built = {}
    for engine in ("inprocess", "spark"):
        settings = base.model_copy(update={"offline": base.offline.model_copy(update={"training_engine": engine})})
        built[engine] = build_training_set(settings, sid)
    pd.testing.assert_frame_equal(built["spark"], built["inprocess"])
    assert len(built["spark"]) == 90
    assert spark.sparkContext._jsc is not None  # the builder used the running session and left it running
