"""The Dagster code location of Encore (``dagster dev -m orchestration.definitions`` or ``encore ui``)."""

from __future__ import annotations

import dagster as dg

from orchestration.assets import (
    ab_report,
    champion_model,
    exposures_topic,
    ingested_interactions,
    interactions_topic,
    registered_model,
    trained_model,
    training_dataset,
)
from orchestration.resources import EncoreResource, FeastResource, KafkaResource, MLflowResource

ingest_job = dg.define_asset_job("ingest_job", selection=[ingested_interactions],
                                 description="consume the interactions topic into Feast")
training_job = dg.define_asset_job(
    "training_job",
    selection=[training_dataset, trained_model, registered_model, champion_model],
    description="snapshot → train → register → promotion gate",
)
ab_report_job = dg.define_asset_job("ab_report_job", selection=[ab_report], description="analyse the A/B test")

nightly_retrain = dg.ScheduleDefinition(job=training_job, cron_schedule="0 3 * * *",
                                        default_status=dg.DefaultScheduleStatus.STOPPED)

defs = dg.Definitions(
    assets=[interactions_topic, exposures_topic, ingested_interactions, training_dataset, trained_model,
            registered_model, champion_model, ab_report],
    jobs=[ingest_job, training_job, ab_report_job],
    schedules=[nightly_retrain],
    resources={
        "encore": EncoreResource(),
        "kafka": KafkaResource(),
        "feast": FeastResource(),
        "mlflow_server": MLflowResource(),
    },
)
