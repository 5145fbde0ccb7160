"""Sensors and schedules: what launches jobs without a person.

- ``ingest_on_lag`` watches the interactions topic's consumer lag and launches ``ingest_job``; its cursor (kept
  by Dagster) holds the end offsets it last launched for, so one backlog launches one run.
- ``retrain_on_new_events`` launches ``training_job`` once ``promotion.retrain_after_events`` new events
  reached the offline store; ``nightly_retrain`` does it on a clock. All start stopped: an operator turns
  them on in the UI.
"""

import json

import dagster as dg

from orchestration.assets.ingest import topic_lag
from orchestration.jobs import training_job
from orchestration.resources import EncoreResource, KafkaResource


@dg.sensor(job_name="ingest_job", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED,
           description="launch an ingest run when the interactions topic has unconsumed events")
def ingest_on_lag(context: dg.SensorEvaluationContext, encore: EncoreResource, kafka: KafkaResource):
    settings = encore.settings()
    try:
        bootstrap = kafka.resolve(settings)
        state = topic_lag(bootstrap, settings.topics.interactions, settings.ingest.group_id,
                          **settings.kafka.client_options())
    except Exception as exc:  # noqa: BLE001 - a broker that is down is a reason to skip, not to crash
        return dg.SkipReason(f"Kafka not reachable: {exc}")
    if state["total_lag"] == 0:
        return dg.SkipReason("no lag: every event is ingested")
    key = json.dumps(state["end_offsets"], sort_keys=True)
    if context.cursor == key:
        return dg.SkipReason(f"a run was already launched for end offsets {key}")
    context.update_cursor(key)
    return dg.RunRequest(run_key=f"lag-{key}", tags={"encore/lag": str(state["total_lag"])})


nightly_retrain = dg.ScheduleDefinition(job=training_job, cron_schedule="0 3 * * *",
                                        default_status=dg.DefaultScheduleStatus.STOPPED)


@dg.sensor(job=training_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
           description="retrain once promotion.retrain_after_events new events reached the offline store")
def retrain_on_new_events(context: dg.SensorEvaluationContext, encore: EncoreResource):
    from features.offline_store import OfflineStore

    settings = encore.settings()
    if not settings.offline_dir.exists():
        return dg.SkipReason("no offline store yet")
    store = OfflineStore(settings.offline_dir)
    try:
        events = store.counts()["events"]
    finally:
        store.close()
    last = int(context.cursor) if context.cursor else 0
    new = events - last
    if new < settings.promotion.retrain_after_events:
        return dg.SkipReason(f"{new} new events since the last retrain (< {settings.promotion.retrain_after_events})")
    context.update_cursor(str(events))
    return dg.RunRequest(run_key=f"events-{events}", tags={"encore/trigger": f"{new} new events"})
