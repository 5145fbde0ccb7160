"""Dagster assets: the road from the Kafka topic to a promoted model, and the A/B report.

    interactions_topic (Kafka, external)
        └─ ingested_interactions  (offline store + Feast online store)   [checks: reconciliation, DLQ rate]
             └─ training_dataset  (snapshot of the offline store)
                  └─ trained_model  (TorchRec model + evaluation)
                       └─ registered_model  (MLflow run + registry version, alias challenger)
                            └─ champion_model  (gate: promote to champion when better)
    exposures_topic (Kafka, external) + ingested_interactions
        └─ ab_report  (per-arm metrics with confidence intervals)

Values passed between assets are small dicts of paths and numbers; models travel as files and MLflow
artifacts, never as pickles.
"""


import dataclasses
import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from features.ingest import ingest
from features.offline_store import read_interactions
from orchestration.resources import EncoreResource, KafkaResource, MLflowResource

STREAMING = "streaming"
TRAINING = "training"
EXPERIMENTS = "experiments"

interactions_topic = dg.AssetSpec(
    "interactions_topic",
    description="Kafka topic of interaction events (JSON, schema v1, key = user_id)",
    kinds={"kafka"},
    group_name=STREAMING,
)
exposures_topic = dg.AssetSpec(
    "exposures_topic",
    description="Kafka topic of served recommendations (one record per response)",
    kinds={"kafka"},
    group_name=EXPERIMENTS,
)


@dg.asset(
    deps=[interactions_topic],
    kinds={"kafka", "feast", "parquet"},
    group_name=STREAMING,
    check_specs=[
        dg.AssetCheckSpec("reconciliation", asset="ingested_interactions", blocking=True,
                          description="messages consumed = stored + duplicates + sent to the DLQ"),
        dg.AssetCheckSpec("dlq_rate", asset="ingested_interactions",
                          description="share of consumed messages rejected to the DLQ stays under 5%"),
    ],
)
def ingested_interactions(context: dg.AssetExecutionContext, encore: EncoreResource, kafka: KafkaResource):
    """Consume the interactions topic in bounded batches into the offline store and the Feast online store."""
    settings = encore.settings()
    bootstrap = kafka.resolve(settings)
    report = ingest(settings, bootstrap, on_batch=lambda b: context.log.info(
        f"batch {b.first_offset}..{b.last_offset}: {b.written} written, {b.duplicates} duplicate, {b.dlq} DLQ"))
    context.log.info(f"ingested {report.written} new events from {report.consumed} messages in {report.batches} batches")
    yield dg.MaterializeResult(
        metadata={
            "consumed": report.consumed,
            "written": report.written,
            "duplicates": report.duplicates,
            "dlq": report.dlq,
            "dlq_reasons": dg.MetadataValue.json(report.dlq_reasons),
            "batches": report.batches,
            "offset_ranges": dg.MetadataValue.json({str(k): v for k, v in report.offset_ranges.items()}),
            "seconds": round(report.seconds, 3),
            "freshness_p99_s": report.freshness_p99_s if report.freshness_p99_s is not None else -1.0,
        }
    )
    accounted = report.written + report.duplicates + report.dlq
    yield dg.AssetCheckResult(
        check_name="reconciliation",
        passed=accounted == report.consumed,
        metadata={"consumed": report.consumed, "accounted": accounted},
    )
    rate = report.dlq / report.consumed if report.consumed else 0.0
    yield dg.AssetCheckResult(
        check_name="dlq_rate", passed=rate <= 0.05,
        severity=dg.AssetCheckSeverity.WARN, metadata={"dlq_rate": rate},
    )


@dg.asset(deps=[ingested_interactions], kinds={"duckdb", "parquet"}, group_name=TRAINING)
def training_dataset(context: dg.AssetExecutionContext, encore: EncoreResource) -> dict:
    """A content-addressed snapshot of the offline store, so every model names the exact data it saw."""
    settings = encore.settings()
    df = read_interactions(settings.offline_dir,
                           columns=["event_id", "user_id", "item_id", "event_type", "timestamp_ms", "played_ratio",
                                    "kafka_partition", "kafka_offset"])
    if df.empty:
        raise dg.Failure("the offline store holds no interactions yet: replay data and ingest first")
    digest = hashlib.sha256(pd.util.hash_pandas_object(df[["event_id"]], index=False).values.tobytes()).hexdigest()[:16]
    out = settings.root / "datasets" / f"interactions-{digest}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        df.to_parquet(out, index=False)
    offsets = {str(p): [int(g.kafka_offset.min()), int(g.kafka_offset.max())] for p, g in df.groupby("kafka_partition")}
    info = {"path": str(out), "snapshot": digest, "events": len(df), "users": int(df.user_id.nunique()),
            "items": int(df.item_id.nunique()), "offset_ranges": offsets}
    context.add_output_metadata({**{k: v for k, v in info.items() if k != "offset_ranges"},
                                 "offset_ranges": dg.MetadataValue.json(offsets),
                                 "path": dg.MetadataValue.path(str(out))})
    return info


@dg.asset(kinds={"torchrec", "pytorch"}, group_name=TRAINING)
def trained_model(context: dg.AssetExecutionContext, encore: EncoreResource, training_dataset: dict) -> dict:
    """Train the configured sequence model (TorchRec EmbeddingCollection) and evaluate it leave-one-out."""
    from models.train import train, TrainConfig

    settings = encore.settings()
    cfg = TrainConfig.from_settings(settings.train)
    df = pd.read_parquet(training_dataset["path"])
    context.log.info(f"training {cfg.model} on {len(df)} events, {training_dataset['users']} users")
    result = train(df, cfg, progress=False,
                   on_epoch=lambda epoch, row: context.log.info(f"epoch {epoch}: " + json.dumps(_round(row))))
    out = settings.root / "models" / f"{cfg.model}-{training_dataset['snapshot']}-{int(time.time())}"
    result.recommender().save(out)
    history = [_round(h) for h in result.history]
    test = _round(result.test_metrics)
    context.add_output_metadata({
        "model": cfg.model,
        "params": result.num_params,
        "wall_s": round(result.wall_s, 2),
        "test_metrics": dg.MetadataValue.json(test),
        "epochs": dg.MetadataValue.md(_history_table(history)),
        "dir": dg.MetadataValue.path(str(out)),
    })
    return {"dir": str(out), "config": dataclasses.asdict(cfg), "history": history, "test_metrics": test,
            "dataset": training_dataset}


@dg.asset(kinds={"mlflow"}, group_name=TRAINING)
def registered_model(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                     trained_model: dict) -> dict:
    """Log the run to MLflow and register a new version of ``encore-recommender`` (alias ``challenger``)."""
    from models.recommender import Recommender
    from models.registry import log_and_register

    settings = encore.settings()
    uri = mlflow_server.resolve(settings)
    rec = Recommender.load(Path(trained_model["dir"]))
    sample = [int(i) for i in rec.vocab.decode(list(range(1, min(len(rec.vocab), 5) + 1)))]
    example = pd.DataFrame({"item_ids": [sample], "event_types": [["listen"] * len(sample)],
                            "timestamps_ms": [[1_700_000_000_000 + 60_000 * i for i in range(len(sample))]]})
    ds = trained_model["dataset"]
    reg = log_and_register(
        rec, tracking_uri=uri, experiment=settings.mlflow_experiment,
        params=trained_model["config"], history=trained_model["history"], metrics=trained_model["test_metrics"],
        tags={"dataset_snapshot": ds["snapshot"], "offset_ranges": json.dumps(ds["offset_ranges"]),
              "events": str(ds["events"]), "feature_views": "user_history,item_stats"},
        input_example=example, run_name=f"{trained_model['config']['model']}-{ds['snapshot']}",
    )
    context.add_output_metadata({"version": reg.version, "run_id": reg.run_id,
                                 "mlflow": dg.MetadataValue.url(f"{uri}/#/models/{reg.name}/versions/{reg.version}")})
    return {"version": reg.version, "run_id": reg.run_id, "metrics": trained_model["test_metrics"]}


@dg.asset(kinds={"mlflow"}, group_name=TRAINING)
def champion_model(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                   registered_model: dict) -> dict:
    """The promotion gate: the challenger becomes ``champion`` when it beats the current one on NDCG@10."""
    from models.registry import promote_if_better

    settings = encore.settings()
    promoted, reason = promote_if_better(mlflow_server.resolve(settings), registered_model["version"])
    context.log.info(reason)
    context.add_output_metadata({"promoted": promoted, "reason": reason, "version": registered_model["version"]})
    return {"version": registered_model["version"], "promoted": promoted, "reason": reason}


@dg.asset(deps=[exposures_topic, ingested_interactions], kinds={"scipy"}, group_name=EXPERIMENTS)
def ab_report(context: dg.AssetExecutionContext, encore: EncoreResource, kafka: KafkaResource,
              mlflow_server: MLflowResource) -> dict:
    """Join exposures with the interactions they caused; per-arm metrics, Welch tests, SRM, HTML report."""
    from serving.report import build_ab_report

    settings = encore.settings()
    result = build_ab_report(settings, kafka.resolve(settings), mlflow_server.resolve(settings))
    context.add_output_metadata({
        "report": dg.MetadataValue.path(result["html"]),
        "summary": dg.MetadataValue.md(result["markdown"]),
        "exposures": result["exposures"],
    })
    return result


def _round(row: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}


def _history_table(history: list[dict]) -> str:
    if not history:
        return "(no epochs)"
    cols = list(history[0])
    lines = ["| epoch | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, row in enumerate(history, 1):
        lines.append(f"| {i} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
