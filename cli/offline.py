"""``encore offline ...``: the offline store's format and upkeep. ``migrate-to-iceberg`` moves a Parquet offline
store into the Iceberg tables (counted, idempotent); ``maintain`` compacts, expires snapshots and removes
orphan files of the Iceberg table (features/iceberg_store.py says what each step does and why)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from cli.common import data_dir_option, settings_for


@click.group("offline")
def offline_group() -> None:
    """The offline store (system of record): Parquet or Apache Iceberg."""


@offline_group.command("migrate-to-iceberg")
@data_dir_option
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="the Parquet store to read (default: the data dir's offline/interactions)")
@click.option("--no-offsets", is_flag=True, help="record no Kafka offsets (workers then resume from the "
              "group's committed offsets)")
def migrate_to_iceberg(data_dir: str | None, source: Path | None, no_offsets: bool) -> None:
    """Copy the Parquet offline store into the Iceberg tables; print the counts as JSON.

    Run it with the Parquet ingest workers stopped, then set ENCORE_OFFLINE__BACKEND=iceberg. Running it
    again writes nothing that is already there."""
    from features.iceberg_store import IcebergStore, migrate_parquet

    settings = settings_for(data_dir)
    source = source or settings.offline_dir
    store = IcebergStore(settings)
    try:
        report = migrate_parquet(source, store, group=settings.ingest.group_id, topic=settings.topics.interactions,
                                 record_offsets=not no_offsets)
    finally:
        store.close()
    click.echo(json.dumps(dataclasses.asdict(report)))


@offline_group.command("maintain")
@data_dir_option
@click.option("--days", type=int, default=None, help="compaction window in event days (default: settings)")
@click.option("--dry-run", is_flag=True, help="list orphan files without deleting them")
def maintain(data_dir: str | None, days: int | None, dry_run: bool) -> None:
    """Compact recent day partitions (dropping duplicate event ids), expire old snapshots, remove orphans."""
    from features.iceberg_store import IcebergStore, compact, expire_store_snapshots, remove_store_orphans
    from models.lifecycle.registry import pinned_snapshot_ids

    settings = settings_for(data_dir)
    cfg = settings.offline
    store = IcebergStore(settings)
    try:
        compacted = compact(store.table, window_days=days or cfg.compaction_days, retries=cfg.commit_retries)
        expired = expire_store_snapshots(store, older_than_s=cfg.snapshot_retention_s,
                                         keep_ids=pinned_snapshot_ids(settings))
        orphans = remove_store_orphans(store, grace_s=cfg.orphan_grace_s, dry_run=dry_run)
    finally:
        store.close()
    click.echo(json.dumps({"compaction": dataclasses.asdict(compacted), "snapshots_expired": expired,
                           "orphans_deleted": len(orphans.deleted), "orphans_kept_young": orphans.kept_young,
                           "files_listed": orphans.listed, "dry_run": dry_run}))
