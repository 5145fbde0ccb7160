"""User and item attributes for the rankers: written to the Feast views, read back point-in-time.

The rows (``features.datasets.USER_ATTRIBUTE_COLUMNS`` / ``ITEM_ATTRIBUTE_COLUMNS``) carry a validity time:
an attribute row stamped ``event_timestamp`` holds from then until a newer row of the same entity replaces
it. A request at time t reads, per entity, the latest row stamped at or before t: Feast's own
``get_historical_features`` rule (the views have ttl 0, so no row expires). Two roads, one rule:

* **platform data** (``historical_attributes``): the views' Parquet files through Feast
  ``get_historical_features``, the offline twin of the online rows serving reads;
* **file datasets in the benches** (``attributes_as_of``): the frames read from the dataset's files
  (``features.datasets.load_user_attributes`` / ``load_item_attributes``), joined with the same rule in
  pandas. A static file has no dates: its rows hold from ``STATIC_SINCE_MS`` on, before any event.

Both return one row per entity row asked, in its order, with the columns ``ATTRIBUTE_FEATURES`` (None / an
empty list where nothing is known).

Serving reads the same views online (``online_attributes``): the latest row of each user and item, which is
the as-of-t row for a request at t = now. It returns the same frame, cleaned by the same rule (``_clean``), so
a ranker's attribute bags are hashed from identical values in training and at serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from features.events import MIN_TIMESTAMP_MS

if TYPE_CHECKING:  # Feast is imported where it is used: the rankers read the constants below without it
    from feast import FeatureStore

    from infra.settings import EncoreSettings

USER_FEATURES: tuple[str, ...] = ("gender", "age", "occupation")
ITEM_FEATURES: tuple[str, ...] = ("genres", "album")
ATTRIBUTE_FEATURES: tuple[str, ...] = USER_FEATURES + ITEM_FEATURES
STATIC_SINCE_MS = MIN_TIMESTAMP_MS  # a dataset file's attributes: known before the first event (2001-09-09)


def _batch_path(view) -> Path:  # noqa: ANN001 - a FeatureView over a push source
    return Path(view.batch_source.path)


def _stamped(frame: pd.DataFrame, timestamp_ms: int) -> pd.DataFrame:
    out = frame.copy()
    if "event_timestamp" not in out:
        out["event_timestamp"] = pd.Timestamp(int(timestamp_ms), unit="ms", tz="UTC")
    return out


def attributes_written(settings: EncoreSettings) -> bool:
    """Whether any attribute row was written to the views (reading them through Feast needs their files)."""
    return any((settings.feast_dir / f"{view}.parquet").exists() for view in ("user_attributes", "item_attributes"))


def write_attributes(store: FeatureStore, settings: EncoreSettings, *, users: pd.DataFrame | None = None,
                     items: pd.DataFrame | None = None, timestamp_ms: int = STATIC_SINCE_MS) -> None:
    """Append attribute rows (valid from ``timestamp_ms``, or their own ``event_timestamp``) to the views'
    Parquet files and write the latest row per entity online: training and serving read the same rows."""
    from features.feature_repo import item_attributes_view, user_attributes_view, write_online

    for view, key, frame in ((user_attributes_view(settings), "user_id", users),
                             (item_attributes_view(settings), "item_id", items)):
        if frame is None or frame.empty:
            continue
        rows = _stamped(frame, timestamp_ms)
        path = _batch_path(view)
        if path.exists():
            rows = pd.concat([pd.read_parquet(path), rows], ignore_index=True)
        rows.to_parquet(path, index=False)
        latest = rows.sort_values("event_timestamp", kind="stable").drop_duplicates(key, keep="last")
        records = latest.to_dict("records")
        for r in records:
            r["event_timestamp"] = r["event_timestamp"].to_pydatetime()
            if "genres" in r:
                r["genres"] = [str(g) for g in r["genres"]]
        write_online(store, view.name, key, records, "event_timestamp")


def source_attributes(source: str, settings: EncoreSettings,
                      dataset_dir: Path | str | None = None) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(users, items) attribute frames of a replay source (``features.replay.open_source``'s names):
    ``synthetic`` is the simulator world of ``settings.simulator`` (its tracks' genre and album; its listeners
    have no demographics), a MovieLens name reads ``u.user``/``u.item`` or ``users.dat``/``movies.dat`` from
    ``dataset_dir``. A source with no attribute files is an error, not an empty load."""
    from features.datasets import DATASETS, load_item_attributes, load_user_attributes, simulator_item_attributes

    if source == "synthetic":
        from features.simulator import MusicWorld

        catalog = MusicWorld(settings.simulator).catalog
        return None, simulator_item_attributes(catalog.genre, catalog.album)
    if source not in DATASETS:
        raise ValueError(f"unknown attribute source {source!r}: use synthetic or one of {sorted(DATASETS)}")
    if dataset_dir is None:
        raise ValueError(f"attribute source {source!r} needs the dataset's folder (dataset_dir)")
    users, items = load_user_attributes(source, dataset_dir), load_item_attributes(source, dataset_dir)
    if users is None and items is None:
        raise ValueError(f"{source}: no user or item attribute file in {dataset_dir} "
                         "(u.user/u.item for ml-100k, users.dat/movies.dat for ml-1m)")
    return users, items


def changed_rows(frame: pd.DataFrame | None, stored: pd.DataFrame | None, key: str,
                 names: tuple[str, ...]) -> pd.DataFrame | None:
    """The rows of ``frame`` whose entity is new or whose values differ from the entity's latest stored row:
    loading the same file twice writes nothing, and a changed value gets a row of its own (valid from the
    load), so earlier requests keep reading what was true then."""
    if frame is None or frame.empty or stored is None or stored.empty:
        return frame
    latest = stored.sort_values("event_timestamp", kind="stable").drop_duplicates(key, keep="last").set_index(key)

    def same(row: pd.Series) -> bool:
        if row[key] not in latest.index:
            return False
        old = latest.loc[row[key]]
        return all(_clean(n, [old[n]]) == _clean(n, [row[n]]) for n in names if n in frame)

    keep = [not same(row) for _, row in frame.iterrows()]
    return frame[np.asarray(keep, bool)]


def sync_attributes(store: FeatureStore, settings: EncoreSettings, *, users: pd.DataFrame | None,
                    items: pd.DataFrame | None, now_ms: int) -> dict[str, int]:
    """Write what is new or changed in ``users`` / ``items`` (``changed_rows``) to the attribute views: on a
    view's first load the rows hold from ``STATIC_SINCE_MS`` (a dataset file describes its entities from
    before any event), later changes from ``now_ms``. Returns the rows written per view."""
    from features.feature_repo import item_attributes_view, user_attributes_view

    written: dict[str, int] = {}
    for view, key, names, frame in ((user_attributes_view(settings), "user_id", USER_FEATURES, users),
                                    (item_attributes_view(settings), "item_id", ITEM_FEATURES, items)):
        path = _batch_path(view)
        stored = pd.read_parquet(path) if path.exists() else None
        rows = changed_rows(frame, stored, key, names)
        written[view.name] = 0 if rows is None else len(rows)
        if written[view.name]:
            since = STATIC_SINCE_MS if stored is None else int(now_ms)
            kwargs = {"users": rows} if key == "user_id" else {"items": rows}
            write_attributes(store, settings, timestamp_ms=since, **kwargs)
    return written


def historical_attributes(store: FeatureStore, settings: EncoreSettings, entity: pd.DataFrame) -> pd.DataFrame:
    """``entity`` (``user_id, item_id, t_ms``) with ``ATTRIBUTE_FEATURES`` as of each row's t, through Feast
    ``get_historical_features``; views nothing was written to read as unknown."""
    from features.feature_repo import item_attributes_view, user_attributes_view

    out = _unknown(entity)
    if entity.empty:
        return out
    t = entity["t_ms"].to_numpy(np.int64)
    for view, key, names in ((user_attributes_view(settings), "user_id", USER_FEATURES),
                             (item_attributes_view(settings), "item_id", ITEM_FEATURES)):
        if not _batch_path(view).exists():
            continue  # nothing written to this view: unknown
        # One call per view, over the distinct (entity, t): Feast's file (dask) store answers one row per entity
        # key and time, and drops an entity row when every row of its entity is later than it instead of
        # returning nulls (which, with both views in one call, would also lose the other view's values).
        pairs, inverse = np.unique(np.stack([entity[key].to_numpy(np.int64), t], axis=1), axis=0, return_inverse=True)
        rows = pd.DataFrame({key: pairs[:, 0], "event_timestamp": pd.to_datetime(pairs[:, 1], unit="ms", utc=True),
                             "_pair": np.arange(len(pairs))})
        got = store.get_historical_features(entity_df=rows, features=[f"{view.name}:{n}" for n in names]).to_df()
        got = got.drop_duplicates("_pair").set_index("_pair").reindex(np.arange(len(pairs)))  # dropped: unknown
        for name in names:
            out[name] = _clean(name, got[name].to_numpy(object)[inverse.reshape(-1)].tolist())
    return out


def online_attributes(store: FeatureStore, settings: EncoreSettings, user_ids: Sequence[int] | np.ndarray,
                      item_ids: Sequence[int] | np.ndarray) -> pd.DataFrame:
    """One row per (user_ids[r], item_ids[r]) with ``ATTRIBUTE_FEATURES``: the latest rows of the Feast online
    store's ``user_attributes`` / ``item_attributes`` views (what ``write_attributes`` wrote online). One read
    per view over the distinct ids of the call: a served micro-batch's (user, candidate) pairs repeat users and
    items many times. Unknown entities (or nothing written) read as unknown, as in ``historical_attributes``."""
    from features.feature_repo import item_attributes_view, user_attributes_view

    entity = pd.DataFrame({"user_id": np.asarray(user_ids, np.int64), "item_id": np.asarray(item_ids, np.int64)})
    out = _unknown(entity)
    if entity.empty:
        return out
    for view, key, names in ((user_attributes_view(settings), "user_id", USER_FEATURES),
                             (item_attributes_view(settings), "item_id", ITEM_FEATURES)):
        distinct, inverse = np.unique(entity[key].to_numpy(np.int64), return_inverse=True)
        got = store.get_online_features([f"{view.name}:{n}" for n in names],
                                        [{key: int(v)} for v in distinct]).to_dict()
        for name in names:
            values = got[name]
            out[name] = _clean(name, [values[i] for i in inverse.reshape(-1)])
    return out


def attributes_as_of(entity: pd.DataFrame, users: pd.DataFrame | None, items: pd.DataFrame | None) -> pd.DataFrame:
    """``entity`` (``user_id, item_id, t_ms``) with ``ATTRIBUTE_FEATURES`` as of each row's t, from attribute
    frames (rows without ``event_timestamp`` hold from ``STATIC_SINCE_MS``): Feast's rule, in pandas."""
    out = _unknown(entity)
    t = pd.to_datetime(entity["t_ms"].to_numpy(np.int64), unit="ms", utc=True).astype("datetime64[ns, UTC]")
    for frame, key, names in ((users, "user_id", USER_FEATURES), (items, "item_id", ITEM_FEATURES)):
        if frame is None or frame.empty:
            continue
        rows = _stamped(frame, STATIC_SINCE_MS).sort_values("event_timestamp", kind="stable")
        rows = rows.astype({key: np.int64, "event_timestamp": "datetime64[ns, UTC]"})
        left = pd.DataFrame({key: entity[key].to_numpy(np.int64), "event_timestamp": t, "_row": np.arange(len(entity))})
        # as-of: the latest row at or before t (allow_exact_matches: Feast's "<=")
        joined = pd.merge_asof(left.sort_values("event_timestamp", kind="stable"), rows, on="event_timestamp", by=key,
                               direction="backward").sort_values("_row")
        for name in names:
            if name in joined:
                out[name] = _clean(name, joined[name].to_list())
    return out


def _unknown(entity: pd.DataFrame) -> pd.DataFrame:
    n = len(entity)
    return pd.DataFrame({"gender": [None] * n, "age": [None] * n, "occupation": [None] * n,
                         "genres": [[] for _ in range(n)], "album": [None] * n})


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _clean(name: str, values: list) -> list:
    """One representation for "unknown" whichever road: None for scalars, [] for genres; ages as ints,
    "" (an item without an album) as None."""
    if name == "genres":
        return [[] if _missing(v) else [str(g) for g in v] for v in values]
    if name == "age":
        return [None if _missing(v) else int(v) for v in values]
    return [None if _missing(v) or v == "" else str(v) for v in values]
