"""The jobs of the code location: which assets run together."""

import dagster as dg

from orchestration.assets.attributes import entity_attributes
from orchestration.assets.experiments import ab_report
from orchestration.assets.ingest import ingested_interactions
from orchestration.assets.maintenance import compacted_interactions, expired_snapshots, removed_orphan_files
from orchestration.assets.ranking import (
    champion_ranker,
    ranker_evaluation,
    ranking_dataset,
    registered_ranker,
    trained_ranker,
)
from orchestration.assets.rollouts import rollout_guard, rollout_step
from orchestration.assets.studies import scaling_corpus, scaling_laws, scaling_point
from orchestration.assets.summaries import user_summaries
from orchestration.assets.training import (
    champion_model,
    distributed_trained_model,
    evaluation,
    registered_model,
    trained_model,
    training_dataset,
)


ingest_job = dg.define_asset_job("ingest_job", selection=[ingested_interactions],
                                 description="consume the interactions topic into Feast")


attributes_job = dg.define_asset_job("attributes_job", selection=[entity_attributes],
                                     description="load user and item attributes into Feast (ranker features)")


training_job = dg.define_asset_job(
    "training_job",
    selection=[training_dataset, trained_model, evaluation, registered_model, champion_model],
    description="snapshot → train → evaluate → register (@challenger) → promotion gate → @champion",
)


# The scaling study in three jobs: a run of the partitioned one trains one point (encore study scaling, or
# "materialise all partitions" in the UI, runs them all; points already trained are kept).
scaling_plan_job = dg.define_asset_job("scaling_plan_job", selection=[scaling_corpus],
                                       description="scaling study: freeze its events and add the grid's points "
                                                   "as scaling_point partitions")
scaling_point_job = dg.define_asset_job("scaling_point_job", selection=[scaling_point],
                                        description="scaling study: train and measure one point (partition)")
scaling_fit_job = dg.define_asset_job("scaling_fit_job", selection=[scaling_laws],
                                      description="scaling study: fit the trained points' laws, plots to MLflow")


ab_report_job = dg.define_asset_job("ab_report_job", selection=[ab_report], description="analyse the A/B test")


distributed_training_job = dg.define_asset_job(
    "distributed_training_job", selection=[training_dataset, distributed_trained_model],
    description="snapshot → torchrun (DistributedModelParallel), launched through Dagster Pipes",
)


rollout_job = dg.define_asset_job(
    "rollout_job", selection=[rollout_guard, rollout_step],  # partitioned as they are: one experiment a run
    description="one tick of an experiment's guarded rollout (partition: the experiment): guard (rolls back on "
                "SRM or a harmed guardrail; blocking checks srm, guardrails) → step (advance / decide)",
)


ranking_job = dg.define_asset_job(
    "ranking_job",
    selection=[ranking_dataset, trained_ranker, ranker_evaluation, registered_ranker, champion_ranker],
    description="served slates + reactions → fine-tune the champion's ARGUS head → evaluate → register "
                "(encore-ranker @challenger) → ranker gate → @champion",
)


table_maintenance_job = dg.define_asset_job(
    "table_maintenance_job", selection=[compacted_interactions, expired_snapshots, removed_orphan_files],
    description="Iceberg offline store upkeep: compact recent days (dropping duplicate event ids) → expire old "
                "snapshots → delete orphan files",
)


summaries_job = dg.define_asset_job(
    "summaries_job", selection=[user_summaries],  # partitioned as it is: one summariser version a run
    description="refresh one summariser version's cached user summaries (partition: the version): a backfill "
                "the first time, incremental afterwards (blocking check summary_states)",
)
