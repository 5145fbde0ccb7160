"""A/B metrics: attribute interactions to the exposures that caused them, then one value per user.

The randomisation unit is the **user** (``experiments.assignment`` hashes user ids), so every metric is first
aggregated to one value per user and the users are the i.i.d. observations of the tests
(``experiments.stats``). Testing per event or per request instead would treat a heavy listener's 200 events
as 200 independent draws and produce confidence intervals that are far too narrow.

Inputs
------
*exposures*: one row per served recommendation request —
``request_id, user_id, variant, timestamp_ms, items`` (``items``: the list of served item ids; lists,
arrays or JSON strings such as ``"[1, 2]"`` are accepted).

*interactions*: one row per event (see ``features.events.InteractionEvent``) —
``event_id, user_id, item_id, event_type, timestamp_ms, played_ratio, request_id`` (``source`` and
``variant`` are allowed and carried along; the exposure's variant is the authoritative one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import cast

import pandas as pd
from pydantic import BaseModel, Field

from features.events import POSITIVE_TYPES


EXPOSURE_COLUMNS: tuple[str, ...] = ("request_id", "user_id", "variant", "timestamp_ms", "items")
INTERACTION_COLUMNS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "timestamp_ms",
    "played_ratio",
    "request_id",
)

# Per-user metrics, in report order. Descriptions double as the report's glossary.
METRICS: dict[str, str] = {
    "exposures": "recommendation requests served to the user",
    "listens": "attributed listen events",
    "likes": "attributed like events",
    "skips": "attributed skip events",
    "listening_time": "sum of played_ratio over attributed events (listening-time proxy, in tracks)",
    "like_rate": "likes per exposure: Σ likes / Σ exposures over the arm's users (ratio of sums)",
    "likes_per_play": "Σ likes / Σ (listens + skips) over all the arm's users (ratio of sums)",
    "skip_rate": "skips per play: Σ skips / Σ (listens + skips) over all the arm's users (ratio of sums; users "
                 "without plays stay in the sample, so a treatment that stops plays cannot hide its skips)",
    "hit_rate": "Σ hits / Σ served items: share of served items then listened to, liked or added to a playlist",
}
# Metrics where a smaller value is better; the report flags direction so a 'significant' rise is not
# mistaken for a win.
LOWER_IS_BETTER: frozenset[str] = frozenset({"skips", "skip_rate"})
# Metrics that must not get worse unless a config names others (the report's and a rollout's default).
DEFAULT_GUARDRAILS: tuple[str, ...] = ("skip_rate",)
RATE_METRICS: frozenset[str] = frozenset({"like_rate", "likes_per_play", "skip_rate", "hit_rate"})
# Ratio metrics: (numerator, denominator) per-user columns. An arm's value is Σ numerator / Σ denominator over
# all its users (as GrowthBook, Statsig and Eppo report them), tested with the delta method
# (``experiments.stats.ratio_test``), not the mean of per-user ratios: that mean weighs a user with one play
# like one with a hundred, and is undefined for users without plays, so it can only be taken over the users
# who played, a subset the treatment itself changes. The per-user columns of the same names are each user's own
# rate, kept for display and as CUPED covariates' names.
RATIO_METRICS: dict[str, tuple[str, str]] = {
    "like_rate": ("likes", "exposures"),
    "likes_per_play": ("likes", "plays"),
    "skip_rate": ("skips", "plays"),
    "hit_rate": ("hits", "served_items"),
}


class AttributionStats(BaseModel):
    """What attribution kept and dropped, so a report can say why interactions went missing."""

    interactions: int
    duplicates: int = Field(description="repeated event_id (at-least-once delivery), dropped")
    without_request_id: int
    unmatched_request_id: int = Field(description="request_id that no exposure has")
    before_exposure: int
    after_window: int
    user_mismatch: int = Field(description="user_id differs from the exposure's user")
    variant_mismatch: int = Field(description="kept; the exposure's variant wins")
    attributed: int


# =============================================================================== attribution


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}; it has {list(frame.columns)}")


def _as_item_list(value: object) -> list[int]:
    # Parquet hands back numpy arrays, JSON sinks strings; normalise so `served` checks work on all.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    items = json.loads(value) if isinstance(value, str) else value
    return [int(v) for v in cast(Iterable[object], items)]  # type: ignore[call-overload]


def _clean_exposures(exposures: pd.DataFrame) -> pd.DataFrame:
    _require(exposures, EXPOSURE_COLUMNS, "exposures")
    # A request is exposed once; a replayed exposure message must not double-count it.
    ex = exposures.drop_duplicates("request_id", keep="first").copy()
    ex["items"] = ex["items"].map(_as_item_list)
    ex["variant"] = ex["variant"].astype(str)
    return ex


def _attribute(
    exposures: pd.DataFrame, interactions: pd.DataFrame, window_s: float
) -> tuple[pd.DataFrame, AttributionStats]:
    if not window_s > 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    _require(interactions, INTERACTION_COLUMNS, "interactions")
    ex = _clean_exposures(exposures)

    total = len(interactions)
    events = interactions.drop_duplicates("event_id", keep="first")
    duplicates = total - len(events)
    with_request = events[events["request_id"].notna()]
    without_request = len(events) - len(with_request)

    ex_cols = ex[["request_id", "user_id", "variant", "timestamp_ms"]].rename(
        columns={"user_id": "exposure_user_id", "variant": "exposure_variant", "timestamp_ms": "exposure_ts_ms"}
    )
    merged = with_request.merge(ex_cols, on="request_id", how="inner")
    unmatched = len(with_request) - len(merged)

    lag_ms = merged["timestamp_ms"] - merged["exposure_ts_ms"]
    before = lag_ms < 0  # clock skew or a stale request_id: not caused by this exposure
    after = lag_ms > window_s * 1000
    user_mismatch = ~before & ~after & (merged["user_id"] != merged["exposure_user_id"])
    kept = merged[~before & ~after & ~user_mismatch].copy()

    variant_mismatch = 0
    if "variant" in kept.columns:
        logged = kept["variant"]
        variant_mismatch = int((logged.notna() & (logged.astype(str) != kept["exposure_variant"])).sum())
        kept = kept.drop(columns="variant")
    kept = kept.rename(columns={"exposure_variant": "variant"}).drop(columns="exposure_user_id")

    # Was the interacted item one of the items served in that request? (hit rate needs it)
    served_pairs = ex[["request_id", "items"]].explode("items").dropna(subset=["items"])
    served_pairs = served_pairs.rename(columns={"items": "item_id"}).astype({"item_id": "int64"})
    served_pairs["served"] = True
    if len(kept):
        kept = kept.astype({"item_id": "int64"}).merge(
            served_pairs.drop_duplicates(), on=["request_id", "item_id"], how="left"
        )
        kept["served"] = kept["served"].astype("boolean").fillna(False).astype(bool)
    else:
        kept["served"] = pd.Series(dtype=bool)

    attribution = AttributionStats(
        interactions=total,
        duplicates=duplicates,
        without_request_id=without_request,
        unmatched_request_id=unmatched,
        before_exposure=int(before.sum()),
        after_window=int(after.sum()),
        user_mismatch=int(user_mismatch.sum()),
        variant_mismatch=variant_mismatch,
        attributed=len(kept),
    )
    return kept.reset_index(drop=True), attribution


def attribute(exposures: pd.DataFrame, interactions: pd.DataFrame, window_s: float) -> pd.DataFrame:
    """Interactions caused by an exposure: same ``request_id`` and within ``window_s`` after it.

    Kept: ``0 <= interaction.timestamp_ms - exposure.timestamp_ms <= window_s * 1000`` and the same user.
    Dropped: no/unknown ``request_id``, events before the exposure or after the window, another user's
    request id, and repeated ``event_id`` (Kafka delivers at least once). The result has the interaction
    columns, ``variant`` taken from the exposure (the assignment log is authoritative), ``exposure_ts_ms``
    and ``served`` (the item was among those served in that request).
    """
    return _attribute(exposures, interactions, window_s)[0]


# =============================================================================== per-user metrics


def per_user_metrics(exposures: pd.DataFrame, attributed: pd.DataFrame) -> pd.DataFrame:
    """One row per (user_id, variant) with every metric in ``METRICS``.

    ``attributed`` is the output of :func:`attribute`. Every exposed user gets a row, including users who
    never interacted (their counts are 0) — dropping them would bias each arm towards its engaged users.
    The per-user ``skip_rate``/``likes_per_play`` are NaN for users without plays and ``hit_rate`` for users
    served no items; the report analyses these as ratios of sums over all users (``RATIO_METRICS``), from the
    ``plays``, ``served_items`` and ``hits`` columns also returned.
    """
    ex = _clean_exposures(exposures)
    keys = ["user_id", "variant"]
    base = ex.assign(n_items=ex["items"].map(lambda items: len(set(items)))).groupby(keys, as_index=False).agg(
        exposures=("request_id", "size"), served_items=("n_items", "sum")
    )

    ev = attributed
    counts = pd.DataFrame(
        {
            "user_id": ev["user_id"],
            "variant": ev["variant"].astype(str),
            "listens": (ev["event_type"] == "listen").astype(int),
            "likes": (ev["event_type"] == "like").astype(int),
            "skips": (ev["event_type"] == "skip").astype(int),
            "listening_time": pd.to_numeric(ev["played_ratio"], errors="coerce").fillna(0.0).astype(float),
        }
    )
    agg = counts.groupby(keys, as_index=False).sum()

    # A hit is a distinct (request, served item) pair with at least one positive reaction.
    positive_served = ev[ev["served"] & ev["event_type"].isin(POSITIVE_TYPES)]
    hits = (
        positive_served.drop_duplicates(["request_id", "item_id"])
        .assign(variant=lambda d: d["variant"].astype(str))
        .groupby(keys, as_index=False)
        .size()
        .rename(columns={"size": "hits"})
    )

    out = base.merge(agg, on=keys, how="left").merge(hits, on=keys, how="left")
    for col in ("listens", "likes", "skips", "hits"):
        out[col] = out[col].fillna(0).astype(int)
    out["listening_time"] = out["listening_time"].fillna(0.0)
    out["like_rate"] = out["likes"] / out["exposures"]
    out["plays"] = out["listens"] + out["skips"]
    plays = out["plays"].where(out["plays"] > 0)
    out["skip_rate"] = (out["skips"] / plays).astype(float)
    out["likes_per_play"] = (out["likes"] / plays).astype(float)
    out["hit_rate"] = (out["hits"] / out["served_items"].where(out["served_items"] > 0)).astype(float)
    return out[[*keys, *METRICS, "plays", "served_items", "hits"]]


# Pre-period covariate used for each metric when the pre-period is given as raw events. Pre-period users
# had no exposures, so metrics tied to exposures get the closest activity measure; CUPED stays unbiased
# with any pre-treatment covariate — a poorer one only reduces less variance.
PRE_PERIOD_COVARIATE: dict[str, str] = {
    "exposures": "events",
    "listens": "listens",
    "likes": "likes",
    "skips": "skips",
    "listening_time": "listening_time",
    "like_rate": "like_share",
    "likes_per_play": "like_share",
    "skip_rate": "skip_rate",
    "hit_rate": "positive_share",
}


def pre_period_covariates(interactions: pd.DataFrame) -> pd.DataFrame:
    """Per-user activity before the experiment, from raw interaction events (no exposures needed)."""
    _require(interactions, ("event_id", "user_id", "event_type", "played_ratio"), "pre-period interactions")
    ev = interactions.drop_duplicates("event_id")
    per = pd.DataFrame(
        {
            "user_id": ev["user_id"],
            "events": 1,
            "listens": (ev["event_type"] == "listen").astype(int),
            "likes": (ev["event_type"] == "like").astype(int),
            "skips": (ev["event_type"] == "skip").astype(int),
            "positives": ev["event_type"].isin(POSITIVE_TYPES).astype(int),
            "listening_time": pd.to_numeric(ev["played_ratio"], errors="coerce").fillna(0.0).astype(float),
        }
    )
    out = per.groupby("user_id", as_index=False).sum()
    plays = out["listens"] + out["skips"]
    out["skip_rate"] = out["skips"] / plays.where(plays > 0)
    out["like_share"] = out["likes"] / out["events"]
    out["positive_share"] = out["positives"] / out["events"]
    return out
