"""The summaries group (issue #36): a VISTA model's cached user summaries, refreshed from the offline store.

    ingested_interactions
        └─ user_summaries  (a partition per summariser version)  [check: summary_states]

One partition per summariser version (``DynamicPartitionsDefinition("summariser_versions")``): a new
summariser is a new partition, whose first materialisation is a backfill from scratch; later
materialisations of a partition are incremental from the states it stored (``models.summaries``). A
partition stores its whole state table under the data dir (``summaries/<version>.parquet``), appends the rows
it changed to the ``user_summary`` view's snapshot folder (offline, point-in-time) and writes them to the
online store. Once stored, the backfill is recorded on the registered model (``summaries.<version>`` tag,
``Registry.record_summaries``): the promotion gate refuses a VISTA version until its summariser's is there.

Whose summariser: the champion's or the challenger's whose ``summariser_version`` tag is the partition. With
neither a VISTA model (or neither of that version) the asset says so and writes nothing. The online store
keeps one row per user, so only the champion's version goes online (a challenger's backfill would overwrite
the summaries the champion is serving from); with a champion that reads no summaries, the challenger's does.
"""


import os
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from features.offline_read import read_interactions
from orchestration.assets.ingest import ingested_interactions
from orchestration.resources import EncoreResource, FeastResource, MLflowResource

SUMMARIES = "summaries"

summariser_partitions = dg.DynamicPartitionsDefinition(name="summariser_versions")


def summaries_path(root: Path, version: str) -> Path:
    """The state table of one summariser version under the data dir."""
    return root / "summaries" / f"{version}.parquet"


def summariser_model(registry: Any, version: str) -> tuple[Any, int, str] | str:
    """(recommender, registry version, alias) of the champion or challenger whose summariser is ``version``;
    else why there is none (a string)."""
    names = registry.names
    found: dict[str, str | None] = {}
    for alias in (names.champion_alias, names.challenger_alias):
        number = registry.alias_version(alias)
        if number is None:
            continue
        tag = registry.tags(number).get("summariser_version")
        found[alias] = tag
        if tag == version:
            rec, number = registry.load(version=number)
            if rec.summariser_version != version:  # the tag and the weights disagree: not this summariser
                raise dg.Failure(f"version {number} is tagged summariser {version} but its weights are "
                                 f"summariser {rec.summariser_version}")
            return rec, number, alias
    if not any(found.values()):
        return "neither the champion nor the challenger is a vista model: there is nothing to summarise"
    return (f"no champion or challenger has summariser {version} (they have "
            f"{ {a: v for a, v in found.items() if v} }): nothing to refresh")


def serves_online(registry: Any, alias: str) -> bool:
    """Whether this alias's summaries go to the online store: the champion's, or any while the champion is not
    a VISTA model (module docstring)."""
    if alias == registry.names.champion_alias:
        return True
    champion = registry.champion_version()
    return champion is None or not registry.tags(champion).get("summariser_version")


def changed_rows(table: pd.DataFrame, previous: pd.DataFrame | None) -> pd.DataFrame:
    """The rows of ``table`` that are new or differ from ``previous`` (what a refresh pushes)."""
    if previous is None or previous.empty:
        return table
    key = ["user_id", "events_summarised", "summarised_until_ms", "summarised_until_item", "summarised_until_type"]
    same = table[key].merge(previous[key], how="left", on=key, indicator=True)["_merge"].to_numpy() == "both"
    return table[~same]


def write_table(path: Path, table: pd.DataFrame) -> None:
    """Replace the state table atomically (a reader sees the old one or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def check_states(table: pd.DataFrame, known_events: pd.Series, *, version: str, record_bytes: int,
                 recent: int) -> tuple[bool, dict[str, int]]:
    """Every state is ``record_bytes`` long and of ``version``; every user with events older than the recent
    window has a state that summarises some, and none summarises more than it has."""
    older = (known_events - recent).clip(lower=0).reindex(table["user_id"]).fillna(0).to_numpy()  # [U]
    count = table["events_summarised"].to_numpy()
    bad = {
        "wrong_size": int((table["state"].map(len) != record_bytes).sum()),
        "wrong_version": int((table["summariser_version"] != version).sum()),
        "missing_users": int(len(set(known_events.index[known_events > recent]) - set(table["user_id"]))),
        "unsummarised": int(((older > 0) & (count == 0)).sum()),
        "over_counted": int((count > older).sum()),
    }
    return not any(bad.values()), bad


@dg.asset(
    partitions_def=summariser_partitions,
    deps=[ingested_interactions],
    kinds={"pytorch", "feast", "parquet"},
    group_name=SUMMARIES,
    check_specs=[dg.AssetCheckSpec(
        "summary_states", asset="user_summaries", blocking=True,
        description="every user with events before the recent window has a state of the right size and "
                    "summariser version, summarising no more events than it has")],
)
def user_summaries(context: dg.AssetExecutionContext, encore: EncoreResource, feast: FeastResource,
                   mlflow_server: MLflowResource):
    """Refresh the summaries of one summariser version (the partition) from the offline store: a backfill from
    scratch the first time, then only the events that left each user's recent window since."""
    from features.feature_repo import user_summary_dir
    from features.ingest import write_snapshot
    from models.lifecycle.registry import Registry
    from models.summaries import known_events, refresh_summaries, write_online_summaries
    from models.vista import state_bytes

    settings = encore.settings()
    version = context.partition_key
    registry = Registry(mlflow_server.resolve(settings), settings.registry)
    found = summariser_model(registry, version)
    if isinstance(found, str):  # not a failure: the pipeline simply has no vista model of this version
        context.log.info(found)
        yield dg.MaterializeResult(metadata={"skipped": found, "users": 0, "events_folded": 0})
        yield dg.AssetCheckResult(check_name="summary_states", passed=True, metadata={"skipped": found})
        return
    rec, model_version, alias = found
    t0 = time.perf_counter()
    # the same reader as training_dataset (features.offline_read: Parquet or the Iceberg table)
    events = read_interactions(settings, columns=["user_id", "item_id", "event_type", "timestamp_ms"])
    path = summaries_path(settings.root, version)
    previous = pd.read_parquet(path) if path.exists() else None
    recent = rec.config.max_len
    table = refresh_summaries(rec, events, previous, recent=recent)
    write_table(path, table)
    changed = changed_rows(table, previous)
    stamped = changed.assign(event_timestamp=pd.to_datetime(changed["summarised_until_ms"].clip(lower=0), unit="ms",
                                                            utc=True))
    if len(stamped):
        write_snapshot(user_summary_dir(settings), stamped)
    online = serves_online(registry, alias)
    if online and len(changed):
        write_online_summaries(feast.store(settings), changed)
    wall_s = time.perf_counter() - t0
    summariser = rec.model.summariser
    record = state_bytes(summariser.cfg.tokens, summariser.cfg.dim)
    known = known_events(rec, events).groupby("user_id").size()
    passed, bad = check_states(table, known, version=version, record_bytes=record, recent=recent)
    if passed:  # what the promotion gate waits for
        registry.record_summaries(version, {"users": len(table), "events": int(table["events_summarised"].sum()),
                                            "until_ms": int(table["summarised_until_ms"].max()) if len(table) else -1,
                                            "model_version": model_version})
    folded = int(table.attrs.get("events_folded", 0))
    context.log.info(f"summariser {version} ({alias} v{model_version}): {folded} events folded for "
                     f"{table.attrs.get('users_folded', 0)} users in {wall_s:.2f} s; {len(changed)} rows changed"
                     + ("" if online else "; not pushed online (the champion serves another summariser)"))
    yield dg.MaterializeResult(metadata={
        "model_version": model_version, "alias": alias, "backfill": previous is None,
        "users": len(table), "users_folded": int(table.attrs.get("users_folded", 0)), "events_folded": folded,
        "users_resummarised": int(table.attrs.get("users_resummarised", 0)),  # late events inside a summary
        "events_summarised": int(table["events_summarised"].sum()), "rows_changed": len(changed),
        "online": online, "wall_s": round(wall_s, 3), "bytes_per_user": record,
        "events_per_s": round(folded / wall_s, 1) if wall_s > 0 else 0.0,
        "path": dg.MetadataValue.path(str(path)), "dagster/row_count": len(table),
    })
    yield dg.AssetCheckResult(check_name="summary_states", passed=passed,
                              metadata={**bad, "users": len(table), "bytes_per_user": record,
                                        "users_with_older_events": int(np.sum(known.to_numpy() > recent))})
