"""The maintenance group: upkeep of the Iceberg offline store (``offline.backend: iceberg``).

    compacted_interactions  (recent day partitions rewritten: duplicate event_ids dropped, small files merged)
        └─ expired_snapshots  (old snapshots forgotten, except each partition's resume point and the
                               snapshots serving models were trained on)
             └─ removed_orphan_files  (files no snapshot references, older than the grace period, deleted)

Why in this order: compaction leaves the replaced files referenced by older snapshots; expiry drops those
snapshots; only then are the files orphans that cleanup may delete. Each step is one plain function of
``features/iceberg_store.py`` (the same ones ``encore offline maintain`` runs); these assets only carry the
settings in and the counts out. ``table_maintenance_job`` runs them; ``table_maintenance_schedule``
(orchestration/sensors.py) launches it hourly, and skips with the reason under the Parquet backend, which
has no snapshots to expire and compacts nothing.
"""


import dataclasses

import dagster as dg

from orchestration.resources import EncoreResource

MAINTENANCE = "maintenance"


def _store(encore: EncoreResource):  # noqa: ANN202 - (settings, IcebergStore)
    settings = encore.settings()
    if settings.offline.backend != "iceberg":
        raise dg.Failure("table maintenance is for offline.backend: iceberg (the Parquet store has no snapshots "
                         "or small files to merge); set ENCORE_OFFLINE__BACKEND=iceberg")
    from features.iceberg_store import IcebergStore

    return settings, IcebergStore(settings)


@dg.asset(kinds={"iceberg"}, group_name=MAINTENANCE)
def compacted_interactions(context: dg.AssetExecutionContext, encore: EncoreResource) -> dict:
    """Rewrite the last ``offline.compaction_days`` event days of the interactions table: the first stored copy
    of each event_id is kept (the producer-duplicate window), the rest merged into few large files."""
    from features.iceberg_store import compact

    settings, store = _store(encore)
    try:
        report = compact(store.table, window_days=settings.offline.compaction_days,
                         retries=settings.offline.commit_retries)
    finally:
        store.close()
    out = dataclasses.asdict(report)
    context.add_output_metadata({**{k: v for k, v in out.items() if k != "days"},
                                 "days": dg.MetadataValue.json(out["days"]),
                                 "window_days": settings.offline.compaction_days})
    return out


@dg.asset(deps=[compacted_interactions], kinds={"iceberg"}, group_name=MAINTENANCE)
def expired_snapshots(context: dg.AssetExecutionContext, encore: EncoreResource) -> dict:
    """Expire snapshots older than ``offline.snapshot_retention_s`` on both tables; the snapshots that carry a
    partition's newest Kafka offsets (where its worker resumes), the current one, and those the registry's
    serving versions were trained on (aliases and the champion stack: ``Registry.pinned_snapshot_ids``) stay."""
    from features.iceberg_store import expire_store_snapshots
    from models.lifecycle.registry import pinned_snapshot_ids

    settings, store = _store(encore)
    try:
        pinned = pinned_snapshot_ids(settings)  # the snapshots serving models were trained on
        expired = expire_store_snapshots(store, older_than_s=settings.offline.snapshot_retention_s, keep_ids=pinned)
        left = len(store.table.metadata.snapshots) + len(store.dlq.metadata.snapshots)
    finally:
        store.close()
    context.add_output_metadata({"expired": expired, "snapshots_left": left, "pinned_by_models": len(pinned),
                                 "retention_s": settings.offline.snapshot_retention_s})
    return {"expired": expired, "snapshots_left": left}


@dg.asset(deps=[expired_snapshots], kinds={"iceberg"}, group_name=MAINTENANCE)
def removed_orphan_files(context: dg.AssetExecutionContext, encore: EncoreResource) -> dict:
    """Delete files under both tables' locations that no remaining snapshot references and that are older than
    ``offline.orphan_grace_s`` (a younger one may belong to a commit in flight)."""
    from features.iceberg_store import remove_store_orphans

    settings, store = _store(encore)
    try:
        report = remove_store_orphans(store, grace_s=settings.offline.orphan_grace_s)
    finally:
        store.close()
    out = {"deleted": len(report.deleted), "kept_young": report.kept_young, "listed": report.listed,
           "referenced": report.referenced}
    context.add_output_metadata({**out, "deleted_files": dg.MetadataValue.json(report.deleted[:50])})
    return out
