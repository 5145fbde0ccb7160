"""Dagster assets, one module per asset group:

    ingest       interactions_topic (Kafka, observable) └─ ingested_interactions (offline store + Feast online)
    training     training_dataset ─ trained_model ─ evaluation ─ registered_model ─ champion_model;
                 distributed_trained_model (torchrun through Dagster Pipes)
    studies      scaling_corpus ─ scaling_point (a partition per backbone x size x data x seed) ─ scaling_laws
                 (saturating power-law fits with intervals, compute-optimal frontier, plots)
    experiments  exposures_topic (Kafka) + ingested_interactions └─ ab_report
    rollouts     experiment_store + exposures_topic + ingested_interactions └─ rollout_guard ─ rollout_step
                 (partitioned by experiment; blocking checks srm, guardrails on rollout_guard)
    summaries    ingested_interactions └─ user_summaries (a VISTA summariser's cached states, a partition per
                 summariser version; blocking check summary_states)

Each asset is a thin wrapper: the business logic is in plain functions of ``features``, ``models`` and
``experiments`` that the assets call.
"""
