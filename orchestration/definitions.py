"""The Dagster code location of Encore (``dagster dev -m orchestration.definitions`` or ``encore ui``)."""

from __future__ import annotations

import dagster as dg

from orchestration.assets import (
    ab_report,
    champion_model,
    evaluation,
    exposures_topic,
    ingested_interactions,
    promotion_gate,
    registered_model,
    scaling_study,
    trained_model,
    training_dataset,
)
from orchestration.distributed_training import distributed_trained_model
from orchestration.resources import EncoreResource, FeastResource, KafkaResource, MLflowResource
from orchestration.streaming import freshness, ingest_on_lag, interactions_topic, offline_schema

ingest_job = dg.define_asset_job("ingest_job", selection=[ingested_interactions],
                                 description="consume the interactions topic into Feast")
training_job = dg.define_asset_job(
    "training_job",
    selection=[training_dataset, trained_model, evaluation, registered_model, champion_model],
    description="snapshot → train → evaluate → register (@challenger) → promotion gate → @champion",
)
scaling_job = dg.define_asset_job("scaling_job", selection=[training_dataset, scaling_study],
                                  description="scaling study: sweep of model sizes and data fractions, power-law fits")
ab_report_job = dg.define_asset_job("ab_report_job", selection=[ab_report], description="analyse the A/B test")
distributed_training_job = dg.define_asset_job(
    "distributed_training_job", selection=[training_dataset, distributed_trained_model],
    description="snapshot → torchrun (DistributedModelParallel), launched through Dagster Pipes",
)

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


defs = dg.Definitions(
    assets=[interactions_topic, exposures_topic, ingested_interactions, training_dataset, trained_model,
            evaluation, registered_model, champion_model, scaling_study, ab_report, distributed_trained_model],
    asset_checks=[promotion_gate, offline_schema, freshness],
    jobs=[ingest_job, training_job, scaling_job, ab_report_job, distributed_training_job],
    schedules=[nightly_retrain],
    sensors=[retrain_on_new_events, ingest_on_lag],
    resources={
        "encore": EncoreResource(),
        "kafka": KafkaResource(),
        "feast": FeastResource(),
        "mlflow_server": MLflowResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    },
)
