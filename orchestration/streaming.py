"""Dagster definitions of the streaming side: the Kafka topic as an observable asset, a lag sensor, checks.

- ``interactions_topic`` is an *observable source asset*: observing it records end offsets, the ingest
  group's committed offsets and the lag, and its data version changes when new events arrive.
- ``ingest_on_lag`` watches that lag and launches ``ingest_job`` runs; its cursor (kept by Dagster) holds the
  end offsets it last launched for, so one backlog launches one run.
- Checks on ``ingested_interactions``: the stored Parquet matches the schema (blocking: training must not read
  a broken record), and the store is fresh (latest ingest recent, lag small).
"""

import json
import time

import dagster as dg
import pyarrow.parquet as pq

from features.kafka_io import committed_offsets, end_offsets
from features.offline_store import SCHEMA
from orchestration.resources import EncoreResource, KafkaResource

STREAMING = "streaming"


def topic_lag(bootstrap: str, topic: str, group_id: str, **options: object) -> dict:
    end = end_offsets(bootstrap, topic, **options)
    committed = committed_offsets(bootstrap, group_id, topic, **options)
    # tansu 0.6 under-reports end offsets by up to one producer batch; never report negative lag
    lag = {p: max(0, end[p] - committed.get(p, 0)) for p in end}
    return {"end_offsets": end, "committed": committed, "lag": lag, "total_lag": sum(lag.values())}


@dg.observable_source_asset(name="interactions_topic", group_name=STREAMING,
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


@dg.asset_check(asset="ingested_interactions", blocking=True,
                description="every stored Parquet file has the offline schema (names and types)")
def offline_schema(encore: EncoreResource) -> dg.AssetCheckResult:
    settings = encore.settings()
    bad = []
    files = sorted(settings.offline_dir.glob("date=*/*.parquet"))
    for f in files[-200:]:  # the newest files; older ones were checked when they were written
        schema = pq.read_schema(f)
        if not schema.remove_metadata().equals(SCHEMA):
            bad.append(f.name)
    return dg.AssetCheckResult(passed=not bad, metadata={"files_checked": min(len(files), 200),
                                                         "mismatched": dg.MetadataValue.json(bad[:20])})


@dg.asset_check(asset="ingested_interactions",
                description="the latest ingested event is recent and the consumer keeps up")
def freshness(encore: EncoreResource, kafka: KafkaResource) -> dg.AssetCheckResult:
    import duckdb

    settings = encore.settings()
    files = sorted(settings.offline_dir.glob("date=*/*.parquet"), key=lambda f: f.stat().st_mtime)
    if not files:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "nothing ingested yet"})
    with duckdb.connect() as con:
        last_ms = con.execute(f"SELECT max(ingested_at_ms) FROM read_parquet('{files[-1]}')").fetchone()[0]
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
