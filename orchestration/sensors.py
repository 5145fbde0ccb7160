"""Sensors and schedules: what launches jobs without a person.

- ``ingest_on_lag`` watches the interactions topic's consumer lag and launches ``ingest_job``; its cursor (kept
  by Dagster) holds the end offsets it last launched for, so one backlog launches one run.
- ``retrain_on_new_events`` launches ``training_job`` once ``promotion.retrain_after_events`` new events
  reached the offline store; ``nightly_retrain`` does it on a clock.
- ``rollout_sensor`` watches the experiment store: for each running experiment with a ``rollout:`` policy it
  keeps a partition of ``rollout_job`` and launches a run when the rollout's next action is not a hold. The
  run key names the state the action was computed on, so one state launches one run.

- ``summaries_sensor`` reads the ``summariser_version`` tags of the champion and challenger versions (VISTA). A
  version without a partition yet gets one (``summariser_versions``) and a run: the backfill the promotion gate
  waits for. Every version gets a run again when ingest has stored a new batch (run key: version + the time of
  the newest stored batch), each an incremental refresh.

- ``table_maintenance_schedule`` runs ``table_maintenance_job`` hourly on the Iceberg offline store.

All but the maintenance schedule start stopped: an operator turns them on in the UI. Maintenance starts running
because an Iceberg table that nobody compacts grows a file per batch and a snapshot per commit, and under
the Parquet backend every tick is a skip that says why.
"""

import json
from datetime import datetime, timezone

import dagster as dg

from orchestration.assets.ingest import topic_lag
from orchestration.assets.rollouts import rollout_partitions
from orchestration.assets.summaries import summariser_partitions
from orchestration.jobs import rollout_job, summaries_job, table_maintenance_job, training_job
from orchestration.resources import EncoreResource, KafkaResource, MLflowResource


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
    from features.offline_read import count_events

    settings = encore.settings()
    events = count_events(settings)
    if events is None:
        return dg.SkipReason("no offline store yet")
    last = int(context.cursor) if context.cursor else 0
    new = events - last
    if new < settings.promotion.retrain_after_events:
        return dg.SkipReason(f"{new} new events since the last retrain (< {settings.promotion.retrain_after_events})")
    context.update_cursor(str(events))
    return dg.RunRequest(run_key=f"events-{events}", tags={"encore/trigger": f"{new} new events"})


@dg.schedule(job=table_maintenance_job, cron_schedule="17 * * * *",
             default_status=dg.DefaultScheduleStatus.RUNNING,
             description="hourly: compact, expire snapshots, remove orphans (offline.backend: iceberg only)")
def table_maintenance_schedule(context: dg.ScheduleEvaluationContext, encore: EncoreResource):
    settings = encore.settings()
    if settings.offline.backend != "iceberg":
        return dg.SkipReason(f"offline.backend is {settings.offline.backend}: no Iceberg table to maintain")
    return dg.RunRequest(run_key=f"maintenance-{context.scheduled_execution_time:%Y-%m-%dT%H}")


def rollout_run_key(name: str, phase: int, version: int, kind: str, from_traffic: float,
                    now: datetime | None = None) -> str:
    """The run key of a rollout action: the experiment's phase, its store version, the action and the traffic it
    was computed at, and the UTC hour: a run that changed nothing (a treatment awaiting approval or a passing
    gate; a run that failed, e.g. with MLflow unreachable) is retried once an hour rather than never, and one
    state launches at most one run an hour."""
    hour = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H")
    return f"{name}:p{phase}:v{version}:{kind}:{from_traffic:g}:{hour}"


@dg.sensor(job=rollout_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="a sensor on experiment state: one rollout_job run per experiment whose rollout "
                       "should act (advance, roll back, decide); holds are skipped with their reason")
def rollout_sensor(context: dg.SensorEvaluationContext, encore: EncoreResource, kafka: KafkaResource):
    from experiments.readout import observe_rollout
    from experiments.store import ExperimentStore

    settings = encore.settings()
    store = ExperimentStore(settings.experiments_dir)
    snapshot = store.snapshot()
    names = [e.name for e in snapshot.experiments if e.rollout is not None and e.status == "running"]
    if not names:
        return dg.SkipReason("no running experiment has a rollout policy")
    try:
        bootstrap = kafka.resolve(settings)
    except Exception as exc:  # noqa: BLE001 - a broker that is down is a reason to skip, not to crash
        return dg.SkipReason(f"Kafka not reachable: {exc}")
    known = set(context.instance.get_dynamic_partitions(rollout_partitions.name))
    new = [n for n in names if n not in known]
    partitions = [rollout_partitions.build_add_request(new)] if new else []
    requests, waits = [], []
    for name in names:
        try:
            _, _, action = observe_rollout(settings, bootstrap, name, store=store)
        except Exception as exc:  # noqa: BLE001 - one experiment's unreadable evidence must not stop the others
            context.log.warning(f"{name}: cannot observe the rollout: {exc}")
            waits.append(f"{name}: cannot observe the rollout: {exc}")
            continue
        if action.kind == "hold":
            waits.append(f"{name}: {action.reason}")
            continue
        requests.append(dg.RunRequest(
            run_key=rollout_run_key(name, action.phase, snapshot.versions.get(name, 0), action.kind,
                                    action.from_traffic, action.at),
            partition_key=name,
            tags={"encore/rollout-action": action.kind, "encore/experiment": name}))
    if requests:
        for wait in waits:
            context.log.info(wait)
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partitions)
    return dg.SensorResult(skip_reason=dg.SkipReason("; ".join(waits)), dynamic_partitions_requests=partitions)


def served_summarisers(registry) -> list[str]:  # noqa: ANN001 - models.lifecycle.registry.Registry
    """The summariser versions of the champion and the challenger (VISTA models only), sorted."""
    versions = set()
    for alias in (registry.names.champion_alias, registry.names.challenger_alias):
        number = registry.alias_version(alias)
        if number is not None and registry.tags(number).get("summariser_version"):
            versions.add(registry.tags(number)["summariser_version"])
    return sorted(versions)


def offline_marker(settings) -> str:  # noqa: ANN001 - infra.settings.EncoreSettings
    """Changes when ingest stores a new batch (either offline backend): the time of the newest stored batch."""
    from features.offline_read import last_ingested_ms

    newest = last_ingested_ms(settings)
    return "empty" if newest is None else str(newest)


@dg.sensor(job=summaries_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
           description="a partition and a backfill for every new summariser version of the champion or the "
                       "challenger; an incremental refresh of each when the offline store has new events")
def summaries_sensor(context: dg.SensorEvaluationContext, encore: EncoreResource, mlflow_server: MLflowResource):
    from models.lifecycle.registry import Registry

    settings = encore.settings()
    try:
        versions = served_summarisers(Registry(mlflow_server.resolve(settings), settings.registry))
    except Exception as exc:  # noqa: BLE001 - a registry that is away is a reason to skip, not to crash
        return dg.SkipReason(f"registry not readable: {exc}")
    if not versions:
        return dg.SkipReason("neither the champion nor the challenger is a vista model")
    known = set(context.instance.get_dynamic_partitions(summariser_partitions.name))
    new = [v for v in versions if v not in known]
    marker = offline_marker(settings)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"{v}:{marker}", partition_key=v) for v in versions],
        dynamic_partitions_requests=[summariser_partitions.build_add_request(new)] if new else [])
