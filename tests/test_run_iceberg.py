"""``encore run``'s road under ``offline.backend: iceberg``, the parts that differ from the Parquet profile, on a
real broker: the ingest job and its checks, the retrain sensor, serving's popularity fallback, the A/B
report's read and table maintenance, all on the table. (Training on it: tests/test_offline_read.py and
tests/test_spark_training.py; the whole road in the Parquet profile: tests/test_end_to_end.py.)"""

from __future__ import annotations

import dagster as dg
import pytest

from cli.jobs import dagster_instance, run_job
from features import offline_read
from features.events import POSITIVE_TYPES
from orchestration.resources import encore_resource
from orchestration.sensors import retrain_on_new_events
from tests.test_ingest import events, send

pytestmark = pytest.mark.integration


def test_the_run_road_reads_and_maintains_the_iceberg_table(broker):
    from serving.app import Recommendations

    base, bootstrap = broker
    settings = base.model_copy(update={
        "kafka_bootstrap": bootstrap,
        "offline": base.offline.model_copy(update={"backend": "iceberg"}),
        "promotion": base.promotion.model_copy(update={"retrain_after_events": 250})})
    assert offline_read.count_events(settings) is None  # no table yet
    evs = events(300)
    send(bootstrap, settings.topics.interactions, evs, [b"{not json"])
    instance = dagster_instance(settings)

    ingest = run_job(settings, "ingest_job", instance)
    checks = {e.check_name: e.passed for e in ingest.get_asset_check_evaluations()}
    assert checks == {"reconciliation": True, "dlq_rate": True, "offline_schema": True, "freshness": True}
    assert not list(settings.offline_dir.glob("date=*/*.parquet"))  # nothing went to the Parquet store
    assert offline_read.count_events(settings) == 300
    stored = offline_read.read_interactions(settings)
    assert sorted(stored.event_id) == sorted(e.event_id for e in evs)

    with dg.build_sensor_context(resources={"encore": encore_resource(settings)}) as ctx:
        request = retrain_on_new_events(ctx)
    assert isinstance(request, dg.RunRequest) and request.run_key == "events-300"

    service = Recommendations(settings, bootstrap, f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}")
    try:
        service.refresh_popularity()
    finally:
        service.close()
    # most positives first, then most events, then the lower id: counted here from the stored rows
    counts = stored.assign(pos=stored.event_type.isin(POSITIVE_TYPES)).groupby("item_id").agg(
        positives=("pos", "sum"), events=("pos", "size")).reset_index()
    ranked = counts.sort_values(["positives", "events", "item_id"], ascending=[False, False, True])
    assert [i for i, _ in service.popular] == ranked.item_id.tolist()
    assert sum(p for _, p in service.popular) == pytest.approx(1.0)

    maintained = run_job(settings, "table_maintenance_job", instance)
    assert maintained.success
    assert maintained.output_for_node("compacted_interactions")["duplicates_dropped"] == 0
    assert offline_read.count_events(settings) == 300
