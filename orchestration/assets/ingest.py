"""The ingest group: the Kafka topic as an observable asset, the consumed events in the offline store and the
Feast online store, and the checks on them.

- ``interactions_topic`` is an *observable source asset*: observing it records end offsets, the ingest
  group's committed offsets and the lag, and its data version changes when new events arrive.
- ``ingested_interactions`` consumes the topic in bounded batches (``features.ingest``).
- Checks on ``ingested_interactions``: messages reconcile, the DLQ rate stays low, the stored Parquet matches
  the schema (blocking: training must not read a broken record), and the store is fresh (latest ingest
  recent, lag small). The lag sensor that launches ``ingest_job`` lives in ``orchestration.sensors``.
"""

import json
import time

import dagster as dg

from features.ingest import ingest
from features.kafka_io import committed_offsets, end_offsets
from orchestration.resources import EncoreResource, KafkaResource

INGEST = "ingest"


def topic_lag(bootstrap: str, topic: str, group_id: str, **options: object) -> dict:
    end = end_offsets(bootstrap, topic, **options)
    committed = committed_offsets(bootstrap, group_id, topic, **options)
    # tansu 0.6 under-reports end offsets by up to one producer batch; never report negative lag
    lag = {p: max(0, end[p] - committed.get(p, 0)) for p in end}
    return {"end_offsets": end, "committed": committed, "lag": lag, "total_lag": sum(lag.values())}


@dg.observable_source_asset(name="interactions_topic", group_name=INGEST,
                            description="Kafka topic of interaction events (JSON schema v1, key = user_id)")
def interactions_topic(encore: EncoreResource, kafka: KafkaResource) -> dg.ObserveResult:
    settings = encore.settings()
    return observe_topic(kafka.resolve(settings), settings.topics.interactions, settings.ingest.group_id,
                         **settings.kafka.client_options())


def observe_topic(bootstrap: str, topic: str, group_id: str, **options: object) -> dg.ObserveResult:
    state = topic_lag(bootstrap, topic, group_id, **options)
    return dg.ObserveResult(
        data_version=dg.DataVersion(json.dumps(state["end_offsets"], sort_keys=True)),
        metadata={
            "total_lag": state["total_lag"],
            "end_offsets": dg.MetadataValue.json({str(k): v for k, v in state["end_offsets"].items()}),
            "committed_offsets": dg.MetadataValue.json({str(k): v for k, v in state["committed"].items()}),
        },
    )


@dg.asset(
    deps=[interactions_topic],
    kinds={"kafka", "feast", "parquet"},
    group_name=INGEST,
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


@dg.asset_check(asset="ingested_interactions", blocking=True,
                description="every stored Parquet file (or the Iceberg table) has the offline schema")
def offline_schema(encore: EncoreResource) -> dg.AssetCheckResult:
    from features.offline_read import schema_mismatches

    checked, bad = schema_mismatches(encore.settings())  # the newest files; older ones were checked when written
    return dg.AssetCheckResult(passed=not bad, metadata={"files_checked": checked,
                                                         "mismatched": dg.MetadataValue.json(bad[:20])})


@dg.asset_check(asset="ingested_interactions",
                description="the latest ingested event is recent and the consumer keeps up")
def freshness(encore: EncoreResource, kafka: KafkaResource) -> dg.AssetCheckResult:
    from features.offline_read import last_ingested_ms

    settings = encore.settings()
    last_ms = last_ingested_ms(settings)
    if last_ms is None:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "nothing ingested yet"})
    age_s = time.time() - last_ms / 1000
    try:
        lag = topic_lag(kafka.resolve(settings), settings.topics.interactions, settings.ingest.group_id,
                        **settings.kafka.client_options())["total_lag"]
    except Exception:  # noqa: BLE001
        lag = -1
    max_age = settings.ingest.freshness_max_age_s
    passed = age_s <= max_age or lag == 0
    return dg.AssetCheckResult(
        passed=passed, severity=dg.AssetCheckSeverity.WARN,
        metadata={"last_ingest_age_s": round(age_s, 1), "lag": lag, "max_age_s": max_age},
    )
