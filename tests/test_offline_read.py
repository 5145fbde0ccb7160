"""The one reader of the offline store (features/offline_read.py) on both backends, the training snapshot's
lineage, Feast's interactions source under Iceberg, and the table maintenance job in Dagster."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features import offline_read
from features.events import InteractionEvent
from features.iceberg_store import IcebergStore, partition_days, recorded_offsets
from features.offline_store import SCHEMA, OfflineStore, StagedEvent
from infra.settings import EncoreSettings
from orchestration.resources import FeastResource, encore_resource
from tests.test_iceberg_store import GROUP, TOPIC, iceberg_settings

TODAY_MS = (int(time.time() * 1000) // 86_400_000) * 86_400_000
# the columns that do not depend on the store's own representation (event_timestamp is ms in Parquet and
# us in Iceberg; ingested_at_ms is each write's clock)
SAME = [f.name for f in SCHEMA if f.name not in ("event_timestamp", "ingested_at_ms")]


def events(ids: range, partition: int, *, day_ms: int = TODAY_MS) -> list[StagedEvent]:
    return [StagedEvent(InteractionEvent(event_id=f"e{i}", user_id=i % 7, item_id=i % 5,
                                         event_type="like" if i % 3 == 0 else "listen", timestamp_ms=day_ms + 1000 * i,
                                         played_ratio=None if i % 4 == 0 else 0.25 * (i % 4), variant="a"),
                        partition, i) for i in ids]


def batches(store: IcebergStore, *parts: tuple[range, int]) -> None:
    """Append batches as an ingest worker does: each batch's next offset recorded with it."""
    for ids, partition in parts:
        before = store.recorded_offsets(GROUP, TOPIC, [partition])[partition]
        store.append_batch(events(ids, partition), {partition: ids.stop}, group=GROUP, topic=TOPIC,
                           expected={partition: before})


def parquet_settings(tmp_path: Path) -> EncoreSettings:
    return EncoreSettings(data_dir=tmp_path / "parquet")


def test_both_backends_read_the_same_events_through_one_seam(tmp_path):
    parquet, iceberg = parquet_settings(tmp_path), iceberg_settings(tmp_path)
    assert offline_read.count_events(parquet) is None and offline_read.count_events(iceberg) is None
    assert offline_read.read_interactions(iceberg).empty
    pstore = OfflineStore(parquet.offline_dir)
    pstore.write(events(range(0, 30), 0) + events(range(30, 50), 1))
    pstore.close()
    store = IcebergStore(iceberg)
    batches(store, (range(0, 30), 0), (range(30, 50), 1))
    # a producer sent e3 twice: Iceberg stores both copies (no index at write time), every reader keeps one
    store.append_batch([StagedEvent(events(range(3, 4), 0)[0].event, 1, 50)], {1: 51}, group=GROUP, topic=TOPIC,
                       expected={1: 50})
    store.close()

    p, i = offline_read.read_interactions(parquet), offline_read.read_interactions(iceberg)
    assert len(p) == 50 and p["event_id"].is_unique
    pd.testing.assert_frame_equal(p[SAME], i[SAME])
    # the copy kept is the first stored (partition 0, offset 3), not the later duplicate
    assert i.loc[i.event_id == "e3", ["kafka_partition", "kafka_offset"]].values.tolist() == [[0, 3]]
    where = "event_type = 'like'"
    pd.testing.assert_frame_equal(offline_read.read_interactions(parquet, ["user_id", "item_id"], where),
                                  offline_read.read_interactions(iceberg, ["user_id", "item_id"], where))
    pd.testing.assert_frame_equal(offline_read.training_events(parquet, cutoff_ms=TODAY_MS + 20_000),
                                  offline_read.training_events(iceberg, cutoff_ms=TODAY_MS + 20_000))
    cols = ["item_id", "events", "positives", "likes", "skips", "events_7d", "positives_7d"]
    ps, is_ = offline_read.item_stats(parquet, now_ms=TODAY_MS), offline_read.item_stats(iceberg, now_ms=TODAY_MS)
    assert ps[cols].astype("int64").values.tolist() == is_[cols].astype("int64").values.tolist()
    assert offline_read.count_events(parquet) == offline_read.count_events(iceberg) == 50
    assert offline_read.last_ingested_ms(iceberg) >= offline_read.last_ingested_ms(parquet) - 60_000
    assert offline_read.schema_mismatches(iceberg) == (1, [])
    assert offline_read.schema_mismatches(parquet) == (len(list(parquet.offline_dir.glob("date=*/*.parquet"))), [])


def test_a_read_pinned_to_a_snapshot_ignores_later_commits_and_names_its_offsets(tmp_path):
    settings = iceberg_settings(tmp_path)
    store = IcebergStore(settings)
    batches(store, (range(0, 10), 0), (range(10, 14), 1))
    first = offline_read.describe_snapshot(settings)
    assert first["backend"] == "iceberg" and first["kafka_offsets"] == {"0": 10, "1": 14}
    assert len(first["files"]) == 2 and all(not f.startswith("/") for f in first["files"])
    batches(store, (range(20, 25), 0))
    store.close()
    now = offline_read.describe_snapshot(settings)
    assert now["snapshot_id"] != first["snapshot_id"] and now["kafka_offsets"] == {"0": 25, "1": 14}
    pinned = offline_read.read_interactions(settings, snapshot_id=first["snapshot_id"])
    assert sorted(pinned.event_id) == sorted(f"e{i}" for i in range(14))
    assert len(offline_read.read_interactions(settings)) == 19
    with pytest.raises(ValueError, match="no snapshots"):
        offline_read.read_interactions(parquet_settings(tmp_path), snapshot_id=first["snapshot_id"])
    assert offline_read.describe_snapshot(parquet_settings(tmp_path))["backend"] == "parquet"


def test_feast_reads_the_exported_snapshot_as_its_interactions_source(tmp_path):
    from feast.infra.offline_stores.dask import DaskOfflineStore

    from features.feature_repo import feature_store, interactions_source

    settings = iceberg_settings(tmp_path)
    store = IcebergStore(settings)
    batches(store, (range(0, 12), 0))
    old = store.table.current_snapshot().snapshot_id
    offline_read.export_snapshot(settings, old)
    batches(store, (range(12, 20), 0))
    new = store.table.current_snapshot().snapshot_id
    store.close()
    folder = offline_read.export_snapshot(settings, new)
    assert Path(interactions_source(settings).path) == folder != settings.offline_dir
    files = sorted(folder.glob("date=*/*.parquet"))
    assert files and all(f.name == f"snapshot-{new}.parquet" for f in files)  # the older export is gone
    assert all(pq.read_schema(f).remove_metadata().equals(SCHEMA) for f in files)

    fs = feature_store(settings)
    job = DaskOfflineStore.pull_all_from_table_or_query(
        config=fs.config, data_source=fs.get_data_source("interactions"), join_key_columns=["user_id"],
        feature_name_columns=["item_id", "event_type"], timestamp_field="event_timestamp",
        start_date=datetime(2000, 1, 1, tzinfo=timezone.utc), end_date=datetime(2100, 1, 1, tzinfo=timezone.utc))
    seen = job.to_df()
    expected = offline_read.read_interactions(settings, snapshot_id=new)
    assert len(seen) == len(expected) == 20
    assert sorted(zip(seen.user_id, seen.item_id)) == sorted(zip(expected.user_id, expected.item_id))


@pytest.mark.parametrize("backend", ["parquet", "iceberg"])
def test_the_training_snapshot_records_its_lineage(tmp_path, backend):
    from orchestration.assets.training import training_dataset

    settings = iceberg_settings(tmp_path) if backend == "iceberg" else parquet_settings(tmp_path)
    if backend == "iceberg":
        store = IcebergStore(settings)
        batches(store, (range(0, 40), 0), (range(40, 60), 1))
        sid = store.table.current_snapshot().snapshot_id
        store.close()
    else:
        pstore = OfflineStore(settings.offline_dir)
        pstore.write(events(range(0, 40), 0) + events(range(40, 60), 1))
        pstore.close()
    result = dg.materialize([training_dataset], resources={"encore": encore_resource(settings),
                                                           "feast": FeastResource()})
    info = result.output_for_node("training_dataset")
    manifest = json.loads(Path(info["path"]).with_suffix(".manifest.json").read_text())
    base = {"snapshot", "source", "files", "offset_ranges", "feature_views", "events"}
    assert manifest["events"] == info["events"] == 60 and manifest["offset_ranges"] == {"0": [0, 39], "1": [40, 59]}
    trained_on = pd.read_parquet(info["path"])
    if backend == "parquet":  # the default profile's manifest is what it always was
        assert set(manifest) == base and manifest["source"] == str(settings.offline_dir)
        assert manifest["files"] == offline_read.describe_snapshot(settings)["files"]
        pd.testing.assert_frame_equal(trained_on, offline_read.training_events(settings))
        return
    assert set(manifest) == base | {"backend", "snapshot_id", "location", "committed_at_ms", "kafka_offsets", "engine"}
    assert manifest["snapshot_id"] == info["snapshot_id"] == sid and manifest["engine"] == "inprocess"
    assert manifest["kafka_offsets"] == {"0": 40, "1": 60} and len(manifest["files"]) == 2
    pd.testing.assert_frame_equal(trained_on, offline_read.training_events(settings, sid))
    assert any(offline_read.feast_source_dir(settings).glob(f"date=*/snapshot-{sid}.parquet"))


def _register_champion(settings: EncoreSettings, snapshot_id: int) -> None:
    """A registered model in the data dir's own registry file, its champion tagged with the Iceberg snapshot it
    was trained on (as ``registered_model`` tags it)."""
    from mlflow import MlflowClient

    settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}")
    client.create_registered_model(settings.registry.model_name)
    mv = client.create_model_version(settings.registry.model_name, "file:///nowhere/model",
                                     tags={"snapshot_id": str(snapshot_id)})
    client.set_registered_model_alias(settings.registry.model_name, settings.registry.champion_alias, mv.version)


def test_the_maintenance_job_compacts_expires_and_cleans_a_real_table(tmp_path):
    from orchestration.assets.maintenance import compacted_interactions, expired_snapshots, removed_orphan_files
    from orchestration.sensors import table_maintenance_schedule

    settings = EncoreSettings(**{**iceberg_settings(tmp_path).model_dump(),
                                 "offline": {**iceberg_settings(tmp_path).offline.model_dump(),
                                             "snapshot_retention_s": 0, "orphan_grace_s": 60}})
    store = IcebergStore(settings)
    batches(store, (range(0, 10), 0), (range(10, 20), 0), (range(20, 30), 1), (range(30, 35), 1))
    store.append_batch([StagedEvent(events(range(5, 6), 0)[0].event, 1, 35)], {1: 36}, group=GROUP, topic=TOPIC,
                       expected={1: 35})  # a producer duplicate of e5
    # the champion was trained on the first snapshot (no resume point: expiry would drop it otherwise)
    trained_on = min(store.table.metadata.snapshots, key=lambda s: s.sequence_number).snapshot_id
    _register_champion(settings, trained_on)
    before = offline_read.read_interactions(settings)
    assert partition_days(store.table)[datetime.fromtimestamp(TODAY_MS / 1000, timezone.utc).date()] == 5
    store.close()
    # a file no snapshot references (a crashed writer's), old enough for cleanup
    orphan = Path(settings.offline.warehouse) / "encore" / "interactions" / "data" / "crashed-writer.parquet"
    orphan.write_bytes(b"PAR1")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    time.sleep(0.05)  # every snapshot so far is older than the retention (0 s)

    resources = {"encore": encore_resource(settings)}
    result = dg.materialize([compacted_interactions, expired_snapshots, removed_orphan_files], resources=resources)
    compacted = result.output_for_node("compacted_interactions")
    assert compacted["duplicates_dropped"] == 1 and compacted["files_before"] == 5 and compacted["files_after"] == 1
    assert result.output_for_node("expired_snapshots")["expired"] >= 2
    cleaned = result.output_for_node("removed_orphan_files")
    assert cleaned["deleted"] == 1 and not orphan.exists()

    after = offline_read.read_interactions(settings)
    pd.testing.assert_frame_equal(before[SAME], after[SAME])
    store = IcebergStore(settings)
    assert recorded_offsets(store.table, GROUP, TOPIC, [0, 1]) == {0: 20, 1: 36}  # resume points survive
    assert trained_on in {s.snapshot_id for s in store.table.metadata.snapshots}  # and the champion's data
    assert len(offline_read.training_events(settings, trained_on)) == 10
    assert len(store.read()) == len(store.table.scan().to_arrow()) == 35  # the duplicate is gone from the table
    store.close()

    # the hourly schedule launches the job under Iceberg and says why it skips under Parquet
    when = datetime(2026, 12, 7, 10, 17, tzinfo=timezone.utc)
    with dg.build_schedule_context(resources=resources, scheduled_execution_time=when) as ctx:
        request = table_maintenance_schedule.evaluate_tick(ctx).run_requests
    assert [r.run_key for r in request] == ["maintenance-2026-12-07T10"]
    parquet = {"encore": encore_resource(parquet_settings(tmp_path))}
    with dg.build_schedule_context(resources=parquet, scheduled_execution_time=when) as ctx:
        tick = table_maintenance_schedule.evaluate_tick(ctx)
    assert not tick.run_requests and "parquet" in tick.skip_message
