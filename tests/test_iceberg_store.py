"""The Iceberg offline store: offsets in snapshots, fencing, conflicts, maintenance, migration, and the
three-worker kill drill on the real broker."""

from __future__ import annotations

import os
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from features.events import InteractionEvent
from features.iceberg_store import (
    Fenced,
    IcebergStore,
    _scan,
    compact,
    expire_snapshots,
    migrate_parquet,
    offset_snapshots,
    partition_days,
    referenced_files,
    remove_orphan_files,
)
from features.offline_store import OfflineStore, StagedEvent, read_interactions
from infra.settings import EncoreSettings, OfflineSettings

GROUP, TOPIC = "encore-ingest", "interactions"
DAY0 = int(datetime(2026, 11, 2, tzinfo=timezone.utc).timestamp() * 1000)


def iceberg_settings(tmp_path: Path, host: str = "a") -> EncoreSettings:
    """Settings of one 'host': its own data dir, the shared catalog and warehouse."""
    shared = tmp_path / "shared"
    return EncoreSettings(data_dir=tmp_path / host, offline={
        "backend": "iceberg", "catalog_url": f"sqlite:///{shared / 'catalog.sqlite'}",
        "warehouse": str(shared / "warehouse"), "commit_retries": 5})


def staged(ids: range, partition: int, *, day_ms: int = DAY0, prefix: str = "e") -> list[StagedEvent]:
    return [StagedEvent(InteractionEvent(event_id=f"{prefix}{i}", user_id=i % 7, item_id=i % 5,
                                         event_type="like" if i % 3 == 0 else "listen", timestamp_ms=day_ms + i,
                                         played_ratio=0.5), partition, i) for i in ids]


def raw_ids(store: IcebergStore) -> list[str]:
    return _scan(store.table, ["event_id"])["event_id"].to_pylist()


def test_a_batch_and_its_offsets_commit_in_one_snapshot_and_a_stale_writer_is_fenced(tmp_path):
    a, b = IcebergStore(iceberg_settings(tmp_path, "a")), IcebergStore(iceberg_settings(tmp_path, "b"))
    assert a.recorded_offsets(GROUP, TOPIC, [0, 1]) == {0: None, 1: None}
    a.append_batch(staged(range(0, 10), 0), {0: 10}, group=GROUP, topic=TOPIC, expected={0: None})
    b.append_batch(staged(range(100, 105), 1), {1: 105}, group=GROUP, topic=TOPIC, expected={1: None})
    # an invalid-only batch still moves its partition (an empty snapshot that carries the offsets)
    a.append_batch([], {0: 12}, group=GROUP, topic=TOPIC, expected={0: 10})
    snap = a.table.current_snapshot()
    assert snap.summary.additional_properties[f"encore.kafka.offset.{GROUP}.{TOPIC}.0"] == "12"
    # each partition resumes from the newest snapshot that carries it, whoever wrote the later ones
    assert b.recorded_offsets(GROUP, TOPIC, [0, 1, 2]) == {0: 12, 1: 105, 2: None}

    # a second writer of partition 0 that started at offset 10 (a zombie after a failover) must not store
    with pytest.raises(Fenced) as fenced:
        b.append_batch(staged(range(10, 14), 0), {0: 14}, group=GROUP, topic=TOPIC, expected={0: 10})
    assert fenced.value.recorded == {0: 12}
    assert sorted(raw_ids(a)) == sorted([f"e{i}" for i in range(10)] + [f"e{i}" for i in range(100, 105)])
    assert len(a.table.metadata.snapshots) == 3


class CommitsFirst:
    """The real table of one writer, with another writer's real commit landing between this writer's
    offset check and its append (the race optimistic concurrency exists for), the first time only."""

    def __init__(self, table, other) -> None:  # noqa: ANN001 - a pyiceberg Table, a callable
        self._table, self._other = table, other

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._table, name)

    def append(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if self._other is not None:
            other, self._other = self._other, None
            other()
        self._table.append(*args, **kwargs)


def test_a_commit_conflict_is_retried_on_the_refreshed_table_and_fencing_is_checked_again(tmp_path):
    a, b = IcebergStore(iceberg_settings(tmp_path, "a")), IcebergStore(iceberg_settings(tmp_path, "b"))
    a.append_batch(staged(range(0, 5), 0), {0: 5}, group=GROUP, topic=TOPIC, expected={0: None})
    b.table = CommitsFirst(b.table, lambda: a.append_batch(staged(range(5, 10), 0), {0: 10}, group=GROUP,
                                                           topic=TOPIC, expected={0: 5}))
    b.append_batch(staged(range(50, 55), 1), {1: 55}, group=GROUP, topic=TOPIC, expected={1: None})
    assert (b.stats.conflicts, b.stats.commits) == (1, 1)  # CommitFailedException, then re-appended
    assert len(raw_ids(a)) == 15 and a.recorded_offsets(GROUP, TOPIC, [0, 1]) == {0: 10, 1: 55}

    # the same race on one partition (a zombie and the new owner, whose batch reached further): the retry
    # sees the moved offset and stores nothing, where a blind re-append would duplicate e10..e14
    b.table = CommitsFirst(b.table._table, lambda: a.append_batch(staged(range(10, 17), 0), {0: 17}, group=GROUP,
                                                                  topic=TOPIC, expected={0: 10}))
    with pytest.raises(Fenced):
        b.append_batch(staged(range(10, 15), 0), {0: 15}, group=GROUP, topic=TOPIC, expected={0: 10})
    ids = raw_ids(a)
    assert len(ids) == len(set(ids)) == 22


def test_compaction_drops_producer_duplicates_and_merges_small_files(tmp_path):
    store = IcebergStore(iceberg_settings(tmp_path))
    day = date(2026, 11, 2)
    store.append_batch(staged(range(0, 20), 0), {0: 20}, group=GROUP, topic=TOPIC, expected={0: None})
    # the producer re-sent e5..e9 (new offsets, same ids and times) and another day has one file
    resent = [StagedEvent(s.event, 0, 20 + k) for k, s in enumerate(staged(range(5, 10), 0))]
    store.append_batch(resent, {0: 25}, group=GROUP, topic=TOPIC, expected={0: 20})
    store.append_batch(staged(range(30, 33), 0, day_ms=DAY0 + 86_400_000), {0: 28}, group=GROUP, topic=TOPIC,
                       expected={0: 25})
    assert partition_days(store.table) == {day: 2, day + timedelta(days=1): 1}
    assert len(raw_ids(store)) == 28

    report = compact(store.table, window_days=2, today=day + timedelta(days=1))
    assert (report.days, report.duplicates_dropped, report.files_before, report.files_after) == ([day.isoformat()], 5, 2, 1)
    ids = raw_ids(store)
    assert len(ids) == len(set(ids)) == 23
    kept = store.read(where="event_id = 'e5'")
    assert kept["kafka_offset"].tolist() == [5]  # the first stored copy
    # the compaction snapshot carries no offsets; the workers' resume points are unchanged
    assert store.recorded_offsets(GROUP, TOPIC, [0]) == {0: 28}
    assert compact(store.table, window_days=2, today=day + timedelta(days=1)).days == []  # nothing left to do


def test_expiry_keeps_every_partitions_resume_point_and_orphans_are_removed(tmp_path):
    store = IcebergStore(iceberg_settings(tmp_path))
    store.append_batch(staged(range(0, 3), 1), {1: 3}, group=GROUP, topic=TOPIC, expected={1: None})
    for k in range(4):
        store.append_batch(staged(range(10 * k + 100, 10 * k + 105), 0), {0: 10 * k + 105}, group=GROUP,
                           topic=TOPIC, expected={0: None if k == 0 else 10 * k + 95})
    # a data file a crashed writer left behind (written, never committed), old enough to be an orphan
    first_data = next(Path(store.table.location()).rglob("*.parquet"))
    orphan = first_data.with_name("00000-0-crashed-writer.parquet")
    orphan.write_bytes(first_data.read_bytes())
    old = time.time() - 7200
    os.utime(orphan, (old, old))

    keep = offset_snapshots(store.table)
    assert len(keep) == 2  # partition 1's only snapshot, partition 0's newest
    pinned = sorted(s.snapshot_id for s in store.table.metadata.snapshots if s.snapshot_id not in keep)[0]
    assert expire_snapshots(store.table, older_than_s=0, keep_ids={pinned}) == 2  # a model's snapshot stays
    assert {s.snapshot_id for s in store.table.metadata.snapshots} == keep | {pinned}
    expired = expire_snapshots(store.table, older_than_s=0)
    assert expired == 1
    assert {s.snapshot_id for s in store.table.metadata.snapshots} == keep
    assert store.recorded_offsets(GROUP, TOPIC, [0, 1]) == {0: 135, 1: 3}

    dry = remove_orphan_files(store.table, grace_s=3600, dry_run=True)
    assert str(orphan) in dry.deleted and orphan.exists()
    report = remove_orphan_files(store.table, grace_s=3600)
    assert str(orphan) in report.deleted and not orphan.exists()
    assert all(Path(p).exists() for p in referenced_files(store.table))
    assert len(raw_ids(store)) == 23  # nothing the table holds was touched


def test_migration_moves_a_parquet_store_counted_and_a_rerun_writes_nothing(tmp_path):
    settings = iceberg_settings(tmp_path)
    parquet = OfflineStore(settings.offline_dir)
    parquet.write(staged(range(0, 40), 0) + staged(range(40, 50), 1))
    parquet.record_dlq(0, 40, "not_json", "bad", b"{x")
    parquet.close()
    # a file copied in by hand: 10 events the store already holds (the readers deduplicate them)
    first = sorted(settings.offline_dir.glob("date=*/*.parquet"))[0]
    import pyarrow.parquet as pq

    copy = pq.read_table(first).slice(0, 10)
    pq.write_table(copy, first.with_name("copied-by-hand.parquet"))

    store = IcebergStore(settings)
    report = migrate_parquet(settings.offline_dir, store, group=GROUP, topic=TOPIC)
    assert (report.rows_read, report.duplicates_dropped, report.written, report.already_in_table) == (60, 10, 50, 0)
    assert (report.dlq_read, report.dlq_written) == (1, 1)
    assert report.offsets == {0: 41, 1: 50}  # one past the highest stored or dead-lettered offset
    assert store.recorded_offsets(GROUP, TOPIC, [0, 1]) == {0: 41, 1: 50}
    # the same frame as the Parquet store's reader
    expected = read_interactions(settings.offline_dir).drop(columns=["ingested_at_ms"])
    got = store.read().drop(columns=["ingested_at_ms"])
    pd.testing.assert_frame_equal(got, expected)
    assert store.dlq_records()["kafka_offset"].tolist() == [40]
    # the stats ingest pushes, aggregated from the table, equal the Parquet store's counters
    parquet = OfflineStore(settings.offline_dir)
    now_ms = DAY0 + 3 * 86_400_000
    for mine, theirs in ((store.user_stats(), parquet.user_stats()),
                         (store.item_stats(now_ms=now_ms), parquet.item_stats(now_ms=now_ms)),
                         (store.user_stats([1, 2]), parquet.user_stats([1, 2]))):
        pd.testing.assert_frame_equal(mine.reset_index(drop=True), theirs.sort_values(theirs.columns[0])
                                      .reset_index(drop=True), check_dtype=False)
    parquet.close()

    again = migrate_parquet(settings.offline_dir, store, group=GROUP, topic=TOPIC)
    assert (again.written, again.already_in_table, again.dlq_written, again.offsets) == (0, 50, 0, {})
    assert len(raw_ids(store)) == 50 and len(store.dlq_records()) == 1


def test_the_offline_group_is_typed_and_set_from_the_environment(monkeypatch):
    monkeypatch.setenv("ENCORE_OFFLINE__BACKEND", "iceberg")
    monkeypatch.setenv("ENCORE_OFFLINE__WAREHOUSE", "s3://bucket/encore")
    settings = EncoreSettings()
    assert settings.offline.backend == "iceberg" and settings.offline.warehouse_uri(settings.root) == "s3://bucket/encore"
    assert settings.offline.catalog_uri(Path("/data")) == "sqlite:////data/offline/iceberg/catalog.sqlite"
    assert EncoreSettings().model_dump()["offline"]["backend"] == "iceberg"
    with pytest.raises(ValueError, match="backend"):
        EncoreSettings(offline={"backend": "delta"})
    # production with the Iceberg backend needs a shared catalog (a SQLite file is one host's)
    prod = {"profile": "production", "kafka_bootstrap": "k:9092", "mlflow_tracking_uri": "http://m",
            "feast": {"redis": "r:6379", "registry": "postgresql://f"}, "dagster": {"postgres_url": "postgresql://d"}}
    with pytest.raises(ValueError, match="ENCORE_OFFLINE__CATALOG_URL"):
        EncoreSettings(**prod)
    monkeypatch.setenv("ENCORE_OFFLINE__CATALOG_URL", "postgresql+psycopg://u:p@h/iceberg")
    assert EncoreSettings(**prod).offline.catalog_uri(Path("/x")).startswith("postgresql+psycopg://")


@pytest.mark.integration
def test_the_ingestor_on_the_iceberg_backend_stores_dead_letters_and_resumes_from_the_table(broker):
    from features.feature_repo import feature_store
    from features.ingest import HISTORY_FEATURES, Ingestor
    from features.kafka_io import make_producer

    settings, bootstrap = broker
    shared = settings.root / "shared"
    settings = settings.model_copy(update={"offline": OfflineSettings(
        backend="iceberg", catalog_url=f"sqlite:///{shared / 'catalog.sqlite'}", warehouse=str(shared / "warehouse"))})
    now = int(time.time() * 1000) - 60_000
    events = [InteractionEvent(event_id=f"i{i}", user_id=i % 9, item_id=i % 13, event_type="listen",
                               timestamp_ms=now + i, played_ratio=0.5) for i in range(200)]
    producer = make_producer(bootstrap)
    for k, e in enumerate(events):
        producer.send(settings.topics.interactions, key=b"k", value=e.to_json_bytes())
        if k in (10, 100, 150):
            producer.send(settings.topics.interactions, key=b"k", value=b"{not json")
    producer.send(settings.topics.interactions, key=b"k", value=events[3].to_json_bytes())  # a producer retry
    producer.flush()
    producer.close()

    with Ingestor(settings, bootstrap) as worker:
        report = worker.run(idle_ms=1000)
    # the re-sent event is in the same batch: the batch keeps its first delivery
    assert (report.consumed, report.written, report.duplicates, report.dlq) == (204, 200, 1, 3)
    store = IcebergStore(settings)
    assert store.recorded_offsets(settings.ingest.group_id, settings.topics.interactions, [0]) == {0: 204}
    assert store.dlq_records()["error_type"].tolist() == ["not_json"] * 3
    assert len(raw_ids(store)) == len(store.read()) == 200
    online = feature_store(settings, apply=False).get_online_features(HISTORY_FEATURES, [{"user_id": 7}]).to_dict()
    assert online["item_ids"][0] == [e.item_id for e in events if e.user_id == 7]
    # a second worker resumes at the table's offset: nothing is read twice
    with Ingestor(settings, bootstrap) as worker:
        assert worker.run(idle_ms=1000).consumed == 0
        # and messages below the table's offset are dropped even when a consumer reads them again
        from confluent_kafka import TopicPartition

        worker.consumer._consumer.assign([TopicPartition(settings.topics.interactions, 0, 0)])
        again = worker.run(idle_ms=1000)
    assert (again.consumed, again.written, again.duplicates) == (204, 0, 201)
    assert len(raw_ids(store)) == 200 and _scan(store.dlq).num_rows == 3


@pytest.mark.integration
def test_group_assignment_moves_partitions_between_workers_exactly_once(tmp_path):
    """Consumer-group assignment: a second worker joins (rebalance), then the first leaves (rebalance
    again); every new owner resumes from the table's offsets, so nothing is lost or stored twice."""
    import threading

    from features.ingest import Ingestor
    from features.kafka_io import make_producer
    from infra.services import EmbeddedServices

    shared = tmp_path / "shared"
    offline = OfflineSettings(backend="iceberg", catalog_url=f"sqlite:///{shared / 'catalog.sqlite'}",
                              warehouse=str(shared / "warehouse"), worker_assignment="group")
    base = EncoreSettings(data_dir=tmp_path / "broker", topics={"partitions": 2}, offline=offline,
                          ingest={"batch_size": 500, "max_batch_wait_ms": 200, "poll_timeout_ms": 300})
    now = int(time.time() * 1000) - 60_000
    with EmbeddedServices(base, with_mlflow=False) as svc:
        def produce(lo: int, hi: int) -> None:
            producer = make_producer(svc.kafka_bootstrap)
            for i in range(lo, hi):
                e = InteractionEvent(event_id=f"g{i}", user_id=i % 40, item_id=i % 11, event_type="listen",
                                     timestamp_ms=now + i)
                producer.send(base.topics.interactions, key=str(e.user_id).encode(), value=e.to_json_bytes())
            producer.flush()
            producer.close()

        def start(name: str):  # noqa: ANN202 - (Ingestor, stop event, thread)
            settings = base.model_copy(update={"data_dir": tmp_path / name, "kafka_bootstrap": svc.kafka_bootstrap})
            worker, stop = Ingestor(settings, svc.kafka_bootstrap), threading.Event()
            thread = threading.Thread(target=worker.run, kwargs={"stop": stop, "idle_ms": 300})
            thread.start()
            return worker, stop, thread

        store = IcebergStore(base)

        def stored(n: int) -> bool:
            return len(raw_ids(store)) >= n

        def wait(cond, what: str, timeout_s: float = 60) -> None:  # noqa: ANN001
            deadline = time.monotonic() + timeout_s
            while not cond():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.2)

        produce(0, 300)
        a, stop_a, thread_a = start("a")
        wait(lambda: stored(300), "the first worker")
        assert a.consumer.partitions == [0, 1]
        b, stop_b, thread_b = start("b")
        wait(lambda: len(a.consumer.partitions) == 1 and len(b.consumer.partitions) == 1, "a rebalance")
        produce(300, 600)
        wait(lambda: stored(600), "both workers")
        stop_a.set()
        thread_a.join()
        a.close()  # leaves the group: its partition moves to b
        produce(600, 900)
        wait(lambda: stored(900) and b.consumer.partitions == [0, 1], "the second worker to take over")
        stop_b.set()
        thread_b.join()
        b.close()
        ids = raw_ids(store)
        assert len(ids) == len(set(ids)) == 900
        assert set(ids) == {f"g{i}" for i in range(900)}


@pytest.mark.integration
def test_three_workers_each_killed_twice_lose_and_duplicate_nothing(tmp_path):
    """The bar of the scale-out ingest: three worker processes (own data dirs, one shared catalog and
    warehouse) on a three-partition topic, each SIGKILLed twice while events keep arriving, restarted."""
    from bench.iceberg_ingest import drill

    result = drill(tmp_path, workers=3, kills=2, rate=400, batch_size=300, catch_up_s=40, fork=True)
    assert result["kills"] == 6
    assert (result["lost"], result["duplicated"], result["unexpected"], result["stalled"]) == (0, 0, 0, 0), result
    assert result["rows"] == result["produced"] > 0
    # at least one kill landed in the window the design exists for: after the table commit, before Kafka's
    assert result["kills_after_table_commit"] >= 1, result


def test_encore_offline_migrate_to_iceberg_then_maintain(tmp_path):
    import json

    from click.testing import CliRunner

    from cli.main import main

    data_dir = tmp_path / "encore"
    parquet = OfflineStore(EncoreSettings(data_dir=data_dir).offline_dir)
    parquet.write(staged(range(0, 30), 0))
    parquet.close()
    runner = CliRunner()
    first = runner.invoke(main, ["offline", "migrate-to-iceberg", "--data-dir", str(data_dir)])
    assert first.exit_code == 0, first.output
    report = json.loads(first.output.strip().splitlines()[-1])
    assert (report["rows_read"], report["written"], report["duplicates_dropped"]) == (30, 30, 0)
    again = json.loads(runner.invoke(main, ["offline", "migrate-to-iceberg", "--data-dir", str(data_dir)])
                       .output.strip().splitlines()[-1])
    assert (again["written"], again["already_in_table"]) == (0, 30)
    done = runner.invoke(main, ["offline", "maintain", "--data-dir", str(data_dir), "--dry-run"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1])["dry_run"] is True
