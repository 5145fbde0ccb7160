"""The summaries job and its sensor (issue #36): keep the cached VISTA summaries of the champion's and the
challenger's summariser versions refreshed.

``summaries_sensor`` reads the ``summariser_version`` tags of the champion and challenger versions. A version
without a partition yet gets one (``summariser_versions``) and a run: the backfill the promotion gate waits
for. Every version gets a run again when the offline store has new files (run key: version + the newest
file), each an incremental refresh. Stopped by default, like the other sensors.
"""

from pathlib import Path

import dagster as dg

from orchestration.assets.summaries import summariser_partitions, user_summaries
from orchestration.resources import EncoreResource, MLflowResource

summaries_job = dg.define_asset_job(
    "summaries_job", selection=[user_summaries],  # partitioned as it is: one summariser version a run
    description="refresh one summariser version's cached user summaries (partition: the version): a backfill "
                "the first time, incremental afterwards (blocking check summary_states)",
)


def served_summarisers(registry) -> list[str]:  # noqa: ANN001 - models.lifecycle.registry.Registry
    """The summariser versions of the champion and the challenger (VISTA models only), sorted."""
    versions = set()
    for alias in (registry.names.champion_alias, registry.names.challenger_alias):
        number = registry.alias_version(alias)
        if number is not None and registry.tags(number).get("summariser_version"):
            versions.add(registry.tags(number)["summariser_version"])
    return sorted(versions)


def offline_marker(offline_dir: Path) -> str:
    """Changes when the offline store gains a file: its newest file's name and the number of files."""
    files = sorted(Path(offline_dir).glob("date=*/*.parquet"), key=lambda f: f.stat().st_mtime_ns)
    return f"{len(files)}:{files[-1].name}" if files else "empty"


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
    marker = offline_marker(settings.offline_dir)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"{v}:{marker}", partition_key=v) for v in versions],
        dynamic_partitions_requests=[summariser_partitions.build_add_request(new)] if new else [])
