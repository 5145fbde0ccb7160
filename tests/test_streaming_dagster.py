"""The streaming side in Dagster: lag sensor, the ingest job with its checks, point-in-time features."""

from __future__ import annotations

import time

import dagster as dg
import pandas as pd
import pytest
from pydantic import SecretStr

from features.feature_repo import feature_store
from cli.jobs import dagster_instance, run_job
from orchestration.resources import KafkaResource, encore_resource
from orchestration.assets.ingest import observe_topic
from orchestration.sensors import ingest_on_lag
from tests.test_ingest import events, send

pytestmark = pytest.mark.integration


def test_lag_sensor_launches_one_run_per_backlog_and_the_job_passes_its_checks(broker):
    settings, bootstrap = broker
    resources = {"encore": encore_resource(settings),
                 "kafka": KafkaResource(bootstrap=bootstrap)}
    with dg.build_sensor_context(resources=resources) as ctx:
        assert isinstance(ingest_on_lag(ctx), dg.SkipReason)  # empty topic: nothing to do
    send(bootstrap, settings.topics.interactions, events(500), [b"{broken"])
    with dg.build_sensor_context(resources=resources) as ctx:
        request = ingest_on_lag(ctx)
        assert isinstance(request, dg.RunRequest) and int(request.tags["encore/lag"]) > 0
        cursor = ctx.cursor
    with dg.build_sensor_context(resources=resources, cursor=cursor) as ctx:
        assert isinstance(ingest_on_lag(ctx), dg.SkipReason)  # same backlog: no second run

    instance = dagster_instance(settings)
    secret = "never-in-dagster-storage-0123456789"
    run_settings = settings.model_copy(update={"kafka_bootstrap": bootstrap,
                                               "serve": settings.serve.model_copy(update={"admin_token": SecretStr(secret)})})
    result = run_job(run_settings, "ingest_job", instance)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"reconciliation": True, "dlq_rate": True, "offline_schema": True, "freshness": True}
    # Dagster keeps each run's resource config: the settings (passwords included) must not be in it
    stored = b"".join(p.read_bytes() for p in settings.dagster_home.rglob("*") if p.is_file())
    assert len(stored) > 10_000 and secret.encode() not in stored
    with dg.build_sensor_context(resources=resources, cursor=cursor) as ctx:
        assert isinstance(ingest_on_lag(ctx), dg.SkipReason)  # caught up


def test_topic_observation_reports_offsets(broker):
    settings, bootstrap = broker
    send(bootstrap, settings.topics.interactions, events(50))
    result = observe_topic(bootstrap, settings.topics.interactions, settings.ingest.group_id)
    assert result.metadata["total_lag"] > 0
    assert result.data_version is not None
    # after ingest the group's committed offsets are read back (the workers commit without joining the group)
    from features.ingest import ingest

    assert ingest(settings, bootstrap).written == 50
    result = observe_topic(bootstrap, settings.topics.interactions, settings.ingest.group_id)
    assert sum(result.metadata["committed_offsets"].data.values()) == 50
    assert result.metadata["total_lag"] == 0


def test_user_stats_are_point_in_time_correct(broker):
    from features.ingest import ingest

    settings, bootstrap = broker
    t1 = int(time.time() * 1000) - 10 * 3_600_000
    t2 = t1 + 5 * 3_600_000
    send(bootstrap, settings.topics.interactions, events(30, users=1, start=t1, prefix="early"))
    ingest(settings, bootstrap)
    send(bootstrap, settings.topics.interactions, events(20, users=1, start=t2, prefix="late"))
    ingest(settings, bootstrap)
    store = feature_store(settings, apply=False)
    rows = pd.DataFrame({"user_id": [0, 0, 0],
                         "event_timestamp": pd.to_datetime([t1 - 60_000, t1 + 3_600_000, t2 + 3_600_000],
                                                           unit="ms", utc=True)})
    hist = store.get_historical_features(entity_df=rows, features=["user_stats:events"]).to_df()
    by_time = {int(ts.value // 1_000_000): v for ts, v in zip(hist["event_timestamp"], hist["events"])}
    # before the first event there is no value (Feast's file store drops such rows, or leaves them null)
    assert pd.isna(by_time.get(t1 - 60_000, float("nan")))
    assert by_time[t1 + 3_600_000] == 30  # only the early events existed then
    assert by_time[t2 + 3_600_000] == 50
    online = store.get_online_features(["user_stats:events"], [{"user_id": 0}]).to_dict()
    assert online["events"] == [50]
