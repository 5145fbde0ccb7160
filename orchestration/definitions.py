"""The Dagster code location of Encore (``dagster dev -m orchestration.definitions`` or ``encore ui``):
``Definitions`` composing the asset groups, their checks, jobs, sensors, schedules and resources."""

from __future__ import annotations

import dagster as dg

from orchestration.assets import attributes, experiments, ingest, maintenance, ranking, rollouts, studies, summaries, training
from orchestration.jobs import (
    ab_report_job,
    attributes_job,
    distributed_training_job,
    ingest_job,
    ranking_job,
    rollout_job,
    scaling_fit_job,
    scaling_plan_job,
    scaling_point_job,
    summaries_job,
    table_maintenance_job,
    training_job,
)
from orchestration.resources import EncoreResource, FeastResource, KafkaResource, MLflowResource
from orchestration.sensors import (
    ingest_on_lag,
    nightly_retrain,
    retrain_on_new_events,
    rollout_sensor,
    summaries_sensor,
    table_maintenance_schedule,
)

defs = dg.Definitions(
    assets=[
        ingest.interactions_topic, ingest.ingested_interactions, attributes.entity_attributes,
        training.training_dataset, training.trained_model, training.evaluation, training.registered_model,
        training.champion_model, training.distributed_trained_model,
        studies.scaling_corpus, studies.scaling_point, studies.scaling_laws,
        experiments.exposures_topic, experiments.ab_report,
        rollouts.experiment_store, rollouts.rollout_guard, rollouts.rollout_step,
        ranking.ranking_dataset, ranking.trained_ranker, ranking.ranker_evaluation, ranking.registered_ranker,
        ranking.champion_ranker,
        maintenance.compacted_interactions, maintenance.expired_snapshots, maintenance.removed_orphan_files,
        summaries.user_summaries,
    ],
    asset_checks=[ingest.offline_schema, ingest.freshness, training.promotion_gate, ranking.ranker_gate],
    jobs=[ingest_job, attributes_job, training_job, scaling_plan_job, scaling_point_job, scaling_fit_job, ab_report_job, distributed_training_job, rollout_job,
          ranking_job, table_maintenance_job, summaries_job],
    schedules=[nightly_retrain, table_maintenance_schedule],
    sensors=[retrain_on_new_events, ingest_on_lag, rollout_sensor, summaries_sensor],
    resources={
        "encore": EncoreResource(),
        "kafka": KafkaResource(),
        "feast": FeastResource(),
        "mlflow_server": MLflowResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    },
)
