"""Ranking examples: (history before t, candidate, reactions), built point-in-time from logged events.

The retrieval stage learns *which item comes next*; the ranking stage scores a short list of candidates and
must learn *how the user will react to each one*. This module turns the offline store's events (and, for the
closed loop, the exposures log) into the ranker's training data. Rankers, assets and serving consume it.

The example unit
----------------
One row per (request, candidate item) at the request's time ``t_ms``:

* **shown** (``build_ranking_examples``): every item of a served slate (the exposure's ``items`` list, with
  its ``rank`` 0, 1, ...) is one example. The labels are read from the *reaction events*: events that carry
  the exposure's ``request_id``, belong to the exposure's user, name the served item and happen within
  ``window_s`` after the exposure (``0 <= event.t - exposure.t <= window_s``; the attribution rule of the
  A/B readout). Labels: ``like``, ``dislike``, ``skip`` (0/1: any event of that type), ``played_ratio``
  (the largest ratio reported, NaN when nothing reported one), ``engaged`` (any event of a type in
  ``features.events.POSITIVE_TYPES``; a short listen counts, the ratio is there for a ranker that wants the
  data module's ``played_ratio >= 0.5`` rule) and ``examined`` (1 if there is any reaction event at all).
* **sampled** (``sampled_negatives > 0``): per request, that many items drawn uniformly from the
  ``catalogue`` minus the slate and minus everything the user interacted with before ``t``. ``rank`` is -1,
  every label 0 (``played_ratio`` NaN).
* **rated** (``ratings_examples``, MovieLens-style data): every rating is an example of its item at its time,
  labelled ``like`` = rating >= 4, ``dislike`` = rating <= 2 and ``rating`` itself.

Negatives, strongest first
--------------------------
1. *Examined and rejected*: a skip or dislike (``examined`` = 1). The user saw the item and said no.
2. *Impressions*: shown but never examined (``examined`` = 0, all labels 0). The simulator, like a real
   feed, considers a slate top-down and stops; an item below the stopping point was never judged, so its 0
   says "not reached" as much as "not wanted". It is still a better negative than a random item (it was
   relevant enough to be served) but a ranker should weigh it less than an examined skip, or learn
   P(engaged | examined) on examined rows only. The ``examined`` and ``rank`` columns allow both.
3. *Sampled*: random catalogue items the user never touched. Easy negatives that teach the ranker the
   catalogue beyond what the current policy serves (the shown items alone are biased by that policy).

The point-in-time rule (no leakage)
-----------------------------------
An example's history is the user's events with ``timestamp_ms`` strictly before ``t_ms``: what a server
could have known when the request arrived. Strictly, because events with the same timestamp have no
knowable order (MovieLens logs many ratings in one second; the rated event itself has exactly ``t_ms``).
The request's own reaction events are never in its history: they come at or after ``t`` by the attribution
rule, and if a clock-skewed reaction is stamped *before* its exposure, the history is cut at that reaction
instead (``t_hist = min(t, first event carrying the request_id)``). Without this, a ranker would be shown
the answer (the user's reaction to this very item) as an input feature and look perfect offline.

Histories are not copied per example. ``RankingExamples.events`` is one table of all events sorted by
(user, time) and each example holds ``hist_start, hist_end``: its history is ``events[hist_start:hist_end]``
(the data module's flat-with-offsets layout). Every event belongs to the table, reactions included, so a
later request of the same user sees an earlier request's reactions, as it would in production.

``split_by_time`` splits by request time (every test request at or after every train request). Reaction
labels arrive up to ``window_s`` after ``t``; pass ``gap_ms = window_s * 1000`` to drop the train examples
whose labels could be observed only after the cutoff.

Ratings: the offline store does *not* keep MovieLens ratings. ``features.datasets`` maps them to event types
(>= 4.5 like, 3-4 listen with a played ratio, < 3 dislike), which cannot be inverted to the thresholds
asked of the ranker (a 4 is a listen with ratio 1.0, a 2.5 and a 2 are both dislikes). ``ratings_examples``
therefore reads an explicit ``rating`` column (a frame read from the rating files: ``user_id, item_id,
timestamp_ms, rating``); its event types come from ``event_type`` when present and from
``features.datasets.rating_feedback`` otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from features.attributes import ATTRIBUTE_FEATURES
from features.datasets import rating_feedback
from features.events import POSITIVE_TYPES

# Columns each input must have (ValueError names the missing ones). played_ratio and event_id are optional.
INTERACTION_REQUIRED: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp_ms", "request_id")
EXPOSURE_REQUIRED: tuple[str, ...] = ("request_id", "user_id", "timestamp_ms", "items")
RATING_REQUIRED: tuple[str, ...] = ("user_id", "item_id", "timestamp_ms", "rating")

EVENT_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp_ms", "played_ratio", "request_id")
KEY_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "request_id", "t_ms", "rank", "source", "hist_start", "hist_end")
SHOWN_LABELS: tuple[str, ...] = ("like", "dislike", "skip", "played_ratio", "engaged", "examined")
RATING_LABELS: tuple[str, ...] = ("like", "dislike", "rating")

SHOWN, SAMPLED, RATED = "shown", "sampled", "rated"
NO_RANK = -1  # rank of an example that was not in a slate (sampled, rated)
LIKE_MIN_RATING = 4.0
DISLIKE_MAX_RATING = 2.0
_INT_LABELS = ("like", "dislike", "skip", "engaged", "examined")
_MAX_SAMPLING_ROUNDS = 32  # rejection rounds before the exact (slower) fallback for the few requests left


# ----------------------------------------------------------------------------------------------------------
# The container
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RankingExamples:
    """Examples (one row per candidate) + the (user, time)-sorted events their histories point into.

    ``examples`` has ``KEY_COLUMNS`` + ``labels``; example i's history is ``events[hist_start[i]:hist_end[i]]``.
    """

    examples: pd.DataFrame
    events: pd.DataFrame
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def hist_start(self) -> np.ndarray:
        return self.examples["hist_start"].to_numpy(np.int64)

    @property
    def hist_end(self) -> np.ndarray:
        return self.examples["hist_end"].to_numpy(np.int64)

    def history_lengths(self) -> np.ndarray:
        return self.hist_end - self.hist_start

    def history(self, i: int) -> pd.DataFrame:
        """Example ``i``'s history (positional), oldest first: for tests and debugging, not for batching."""
        row = self.examples.iloc[i]
        return self.events.iloc[int(row["hist_start"]) : int(row["hist_end"])]

    def split_by_time(self, cutoff_ms: int, *, gap_ms: int = 0) -> tuple[RankingExamples, RankingExamples]:
        """(train, test): train has ``t_ms < cutoff_ms - gap_ms``, test ``t_ms >= cutoff_ms``.

        Both keep the full events table, so history offsets stay valid; a test history may contain events
        after the cutoff but, by construction, none at or after its own ``t``. ``gap_ms`` (e.g. the
        attribution window) drops train examples whose reactions may land after the cutoff.
        """
        if gap_ms < 0:
            raise ValueError(f"gap_ms must be >= 0, got {gap_ms}")
        t = self.examples["t_ms"].to_numpy(np.int64)
        train = self.examples[t < cutoff_ms - gap_ms].reset_index(drop=True)
        test = self.examples[t >= cutoff_ms].reset_index(drop=True)
        return replace(self, examples=train), replace(self, examples=test)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}; it has {list(frame.columns)}")


def _events_table(interactions: pd.DataFrame) -> pd.DataFrame:
    """All events, deduplicated by ``event_id`` (at-least-once delivery), sorted by (user, time), stably.

    Stable, so same-millisecond events keep the source's order (a listen before its like)."""
    frame = interactions.drop_duplicates("event_id", keep="first") if "event_id" in interactions else interactions
    users = frame["user_id"].to_numpy(np.int64)
    ts = frame["timestamp_ms"].to_numpy(np.int64)
    order = np.lexsort((ts, users))
    ratio = (
        frame["played_ratio"].to_numpy(np.float64, na_value=np.nan)
        if "played_ratio" in frame
        else np.full(len(frame), np.nan)
    )
    request = frame["request_id"].to_numpy(object) if "request_id" in frame else np.full(len(frame), None, object)
    return pd.DataFrame(
        {
            "user_id": users[order],
            "item_id": frame["item_id"].to_numpy(np.int64)[order],
            "event_type": frame["event_type"].astype(str).to_numpy(object)[order],
            "timestamp_ms": ts[order],
            "played_ratio": ratio[order],
            "request_id": request[order],
        }
    )


def count_before(ev_user: np.ndarray, ev_ts: np.ndarray, q_user: np.ndarray, q_ts: np.ndarray) -> np.ndarray:
    """For each query, how many events sort before (q_user, q_ts) in (user, time) order, ties excluded.

    Events must be sorted by (user, time). Because they are, that count is also the *position* in the events
    table where the query's user's events before ``q_ts`` end: one merge-sort of events and queries answers
    every query at once (a per-user searchsorted without a loop over users).
    """
    n_ev = len(ev_user)
    users = np.concatenate([ev_user, q_user])
    ts = np.concatenate([ev_ts, q_ts])
    is_event = np.concatenate([np.ones(n_ev, np.int64), np.zeros(len(q_user), np.int64)])
    # Primary user, then time, then queries before events: an event at exactly q_ts is not "before".
    order = np.lexsort((is_event, ts, users))
    events_so_far = np.cumsum(is_event[order]) - is_event[order]
    out = np.empty(len(q_user), np.int64)
    is_query = order >= n_ev
    out[order[is_query] - n_ev] = events_so_far[is_query]
    return out


def _history_bounds(events: pd.DataFrame, users: np.ndarray, t_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) into ``events`` of each (user, t)'s events with timestamp strictly before t."""
    ev_user = events["user_id"].to_numpy(np.int64)
    ev_ts = events["timestamp_ms"].to_numpy(np.int64)
    users = np.asarray(users, np.int64)
    start = count_before(ev_user, ev_ts, users, np.full(len(users), np.iinfo(np.int64).min))
    end = count_before(ev_user, ev_ts, users, np.asarray(t_ms, np.int64))
    return start, end


def _as_item_list(value: object) -> list[int]:
    # Parquet hands back numpy arrays, JSON sinks strings, Python producers lists: accept all three.
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    items = json.loads(value) if isinstance(value, str) else value
    return [int(v) for v in items]  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------------------
# Closed loop: exposures + reactions
# ----------------------------------------------------------------------------------------------------------


def _requests(exposures: pd.DataFrame) -> pd.DataFrame:
    """One row per request (a replayed exposure counts once), in (time, request_id) order: the order that
    makes sampling reproducible."""
    ex = exposures.drop_duplicates("request_id", keep="first")
    out = pd.DataFrame(
        {
            "request_id": ex["request_id"].astype(str).to_numpy(object),
            "user_id": ex["user_id"].to_numpy(np.int64),
            "t_ms": ex["timestamp_ms"].to_numpy(np.int64),
            "items": [_as_item_list(v) for v in ex["items"]],
        }
    )
    return out.sort_values(["t_ms", "request_id"], kind="stable").reset_index(drop=True)


def _served(requests: pd.DataFrame) -> pd.DataFrame:
    """The slates flattened: (req, item_id, rank), ``req`` the request's row in ``requests``."""
    lengths = requests["items"].map(len).to_numpy(np.int64)
    flat = np.fromiter((i for items in requests["items"] for i in items), np.int64, count=int(lengths.sum()))
    req = np.repeat(np.arange(len(requests)), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    served = pd.DataFrame({"req": req, "item_id": flat, "rank": np.arange(len(flat)) - first})
    # An item listed twice in one slate is one candidate (its first rank): its reactions cannot be told apart.
    return served.drop_duplicates(["req", "item_id"], keep="first").reset_index(drop=True)


def _reactions(events: pd.DataFrame, requests: pd.DataFrame, window_ms: int) -> pd.DataFrame:
    """Per (req, item_id) labels from the events attributed to that request (see the module docstring)."""
    req_of = pd.Series(np.arange(len(requests)), index=pd.Index(requests["request_id"]))
    tagged = events[events["request_id"].notna()]
    req = req_of.reindex(tagged["request_id"].astype(str)).to_numpy()
    known = ~np.isnan(req)
    tagged, req = tagged[known], req[known].astype(np.int64)
    lag = tagged["timestamp_ms"].to_numpy(np.int64) - requests["t_ms"].to_numpy(np.int64)[req]
    same_user = tagged["user_id"].to_numpy(np.int64) == requests["user_id"].to_numpy(np.int64)[req]
    keep = same_user & (lag >= 0) & (lag <= window_ms)
    kinds = tagged["event_type"].to_numpy(object)[keep]
    flags = pd.DataFrame(
        {
            "req": req[keep],
            "item_id": tagged["item_id"].to_numpy(np.int64)[keep],
            "like": kinds == "like",
            "dislike": kinds == "dislike",
            "skip": kinds == "skip",
            "engaged": np.isin(kinds, list(POSITIVE_TYPES)),
            "examined": True,
            "played_ratio": tagged["played_ratio"].to_numpy(np.float64)[keep],
        }
    )
    labels = flags.groupby(["req", "item_id"], as_index=False).agg(
        like=("like", "max"), dislike=("dislike", "max"), skip=("skip", "max"), engaged=("engaged", "max"),
        examined=("examined", "max"), played_ratio=("played_ratio", "max"),
    )
    return labels.astype({col: np.int8 for col in _INT_LABELS})


def _history_cut(events: pd.DataFrame, requests: pd.DataFrame) -> np.ndarray:
    """min(t, the first own event carrying the request's id): the instant each request's history ends."""
    tagged = events[events["request_id"].notna()]
    first = tagged.groupby([tagged["request_id"].astype(str), tagged["user_id"]])["timestamp_ms"].min()
    key = pd.MultiIndex.from_arrays([requests["request_id"], requests["user_id"]])
    own_first = first.reindex(key).to_numpy(np.float64)
    t = requests["t_ms"].to_numpy(np.int64)
    return np.where(np.isnan(own_first), t, np.minimum(t, np.nan_to_num(own_first))).astype(np.int64)


def with_attributes(examples: RankingExamples, attributes: pd.DataFrame) -> RankingExamples:
    """The examples with user and item attribute columns (``features.attributes.ATTRIBUTE_FEATURES``) added:
    ``attributes`` is one row per example, in order, as of the example's ``t_ms``, as
    ``features.attributes.historical_attributes`` (platform data, through Feast) or ``attributes_as_of`` (a
    dataset's files) return it. Attributes are read as of t like every other input, so a ranker never sees a
    value that was set after the request."""
    if len(attributes) != len(examples):
        raise ValueError(f"{len(attributes)} attribute rows for {len(examples)} examples")
    missing = [c for c in ATTRIBUTE_FEATURES if c not in attributes]
    if missing:
        raise ValueError(f"attributes are missing columns {missing}")
    frame = examples.examples.drop(columns=[c for c in ATTRIBUTE_FEATURES if c in examples.examples])
    for name in ATTRIBUTE_FEATURES:
        values = attributes[name].to_list()
        # list columns come back from Parquet as arrays: one type, a list, whichever road they took
        frame[name] = [list(v) for v in values] if name == "genres" else values
    return replace(examples, examples=frame)


def candidate_examples(base: RankingExamples, user_id: np.ndarray, item_id: np.ndarray, t_ms: np.ndarray,
                       source: str = RATED) -> RankingExamples:
    """Unlabelled examples of given (user, candidate, time) rows over ``base``'s events: each history is the
    user's events strictly before t, as for every other example. For scoring lists that no log holds (a
    cascade reranking retrieval's top-k at a cutoff)."""
    users, t = np.asarray(user_id, np.int64), np.asarray(t_ms, np.int64)
    start, end = _history_bounds(base.events, users, t)
    examples = pd.DataFrame({"user_id": users, "item_id": np.asarray(item_id, np.int64), "request_id": None, "t_ms": t,
                             "rank": NO_RANK, "source": source, "hist_start": start, "hist_end": end})
    return RankingExamples(examples=examples, events=base.events, labels=())


def served_examples(histories: Sequence[dict], user_ids: Sequence[int], candidates: Sequence[Sequence[int]],
                    t_ms: Sequence[int], rank: int = NO_RANK) -> RankingExamples:
    """Unlabelled examples of served requests: request r is user ``user_ids[r]`` with the history dict
    ``histories[r]`` (``item_ids``, ``event_types``, ``timestamps_ms``, oldest first, as the online store keeps
    it), asked at ``t_ms[r]`` about each of ``candidates[r]`` (examples in request order, candidates in order).

    The events table is built by the same rule as every training set's (``_events_table``: sorted by (user,
    time), stably) and each history is the user's events strictly before t (``candidate_examples``), so a
    ranker's features are computed from served histories by the functions that computed them in training.
    ``rank``: the slate-position feature of every candidate (one fixed value: the server has not placed them)."""
    if not len(histories) == len(user_ids) == len(candidates) == len(t_ms):
        raise ValueError("one user id, candidate list and request time per history")
    first: dict[int, dict] = {}
    for u, h in zip(user_ids, histories):
        first.setdefault(int(u), h)  # one user twice in a batch: its events once, or its history would double
    # One frame from concatenated arrays, not a frame per user: pandas' per-frame overhead was 40% of a served
    # Wukong micro-batch's cost.
    users, items, types, stamps = [], [], [], []
    for u, h in first.items():
        item = np.asarray(h.get("item_ids", []), np.int64).reshape(-1)
        kind = list(h.get("event_types") or ["listen"] * len(item))
        ts = np.asarray(h.get("timestamps_ms", []), np.int64).reshape(-1)
        if not len(item) == len(kind) == len(ts):
            raise ValueError(f"user {u}: item_ids, event_types and timestamps_ms must have equal lengths")
        users.append(np.full(len(item), u, np.int64))
        items.append(item)
        types += [str(k) for k in kind]
        stamps.append(ts)
    empty = np.zeros(0, np.int64)
    frame = pd.DataFrame({"user_id": np.concatenate(users or [empty]), "item_id": np.concatenate(items or [empty]),
                          "event_type": np.array(types, dtype=object), "timestamp_ms": np.concatenate(stamps or [empty]),
                          "request_id": np.full(len(types), None, dtype=object)})
    base = RankingExamples(examples=pd.DataFrame(), events=_events_table(frame), labels=())
    sizes = [len(c) for c in candidates]
    flat = np.fromiter((int(i) for c in candidates for i in c), np.int64, count=int(sum(sizes)))
    out = candidate_examples(base, np.repeat(np.asarray(user_ids, np.int64), sizes), flat,
                             np.repeat(np.asarray(t_ms, np.int64), sizes), source=SHOWN)
    out.examples["rank"] = np.int64(rank)
    return out


def attribute_entities(examples: RankingExamples) -> pd.DataFrame:
    """``user_id, item_id, t_ms`` of every example: the entity rows whose attributes it reads."""
    return examples.examples[["user_id", "item_id", "t_ms"]].reset_index(drop=True)


def validation_rows(examples: RankingExamples, rows: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit, valid): valid = ``rows`` at or after the time that leaves ``share`` of them later (the last part of
    the training period); empty when ``share`` is 0 or one side would hold a single class."""
    if share <= 0 or len(rows) < 2:
        return rows, rows[:0]
    t = examples.examples["t_ms"].to_numpy(np.int64)[rows]
    cut = np.quantile(t, 1.0 - share, method="lower")
    fit, valid = rows[t < cut], rows[t >= cut]
    return (fit, valid) if len(fit) and len(valid) else (rows, rows[:0])


def task_labels(examples: RankingExamples, tasks: Sequence[str]) -> np.ndarray:
    """[N, len(tasks)] float32 labels of the named tasks; ValueError naming the tasks that are not labels."""
    missing = [t for t in tasks if t not in examples.examples]
    if missing:
        raise ValueError(f"tasks {missing} are not label columns; the examples have {examples.labels}")
    return examples.examples[list(tasks)].to_numpy(np.float32)


def build_ranking_examples(
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    *,
    window_s: int,
    sampled_negatives: int = 0,
    catalogue: np.ndarray | Sequence[int] | None = None,
    seed: int = 0,
) -> RankingExamples:
    """Closed-loop ranking examples: every served item of every exposure, plus sampled negatives.

    ``interactions``: ``user_id, item_id, event_type, timestamp_ms, request_id`` (+ optional ``played_ratio``
    and ``event_id``), e.g. ``features.offline_store.read_interactions``. ``exposures``: ``request_id,
    user_id, timestamp_ms, items`` (the exposures log). Reactions count within ``window_s`` after the
    exposure. ``sampled_negatives`` per request come from ``catalogue`` (required then), drawn with ``seed``.
    """
    _require(interactions, INTERACTION_REQUIRED, "interactions")
    _require(exposures, EXPOSURE_REQUIRED, "exposures")
    if not window_s > 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    if sampled_negatives < 0:
        raise ValueError(f"sampled_negatives must be >= 0, got {sampled_negatives}")
    if sampled_negatives and catalogue is None:
        raise ValueError("sampled_negatives needs a catalogue to draw from")

    events = _events_table(interactions)
    requests = _requests(exposures)
    start, end = _history_bounds(events, requests["user_id"].to_numpy(np.int64), _history_cut(events, requests))

    shown = _served(requests).merge(_reactions(events, requests, int(window_s) * 1000), on=["req", "item_id"],
                                    how="left")
    for col in _INT_LABELS:
        shown[col] = shown[col].fillna(0).astype(np.int8)  # shown, no reaction: an impression negative
    shown["played_ratio"] = shown["played_ratio"].astype(np.float64)
    shown["source"] = SHOWN
    parts = [shown]
    if sampled_negatives:
        parts.append(_sampled(events, requests, start, end, np.asarray(catalogue), sampled_negatives, seed))

    rows = pd.concat(parts, ignore_index=True)
    req = rows["req"].to_numpy(np.int64)
    rows["user_id"] = requests["user_id"].to_numpy(np.int64)[req]
    rows["request_id"] = requests["request_id"].to_numpy(object)[req]
    rows["t_ms"] = requests["t_ms"].to_numpy(np.int64)[req]
    rows["hist_start"], rows["hist_end"] = start[req], end[req]
    # Requests in time order; within one, the slate top-down, then the sampled items.
    rows["_sampled"] = rows["source"] == SAMPLED
    rows = rows.sort_values(["req", "_sampled", "rank", "item_id"], kind="stable")
    frame = rows[list(KEY_COLUMNS) + list(SHOWN_LABELS)].reset_index(drop=True)
    return RankingExamples(examples=frame.astype({"rank": np.int64}), events=events, labels=SHOWN_LABELS)


# ----------------------------------------------------------------------------------------------------------
# Sampled negatives
# ----------------------------------------------------------------------------------------------------------


def _sampled(
    events: pd.DataFrame,
    requests: pd.DataFrame,
    start: np.ndarray,
    end: np.ndarray,
    catalogue: np.ndarray,
    k: int,
    seed: int,
) -> pd.DataFrame:
    """``k`` items per request, uniform over catalogue \\ slate \\ the user's items before t (fewer when the
    rest of the catalogue is smaller). Items are handled as indices c into the sorted catalogue and
    (request or user, c) pairs as one int64 key, so every exclusion test is a searchsorted."""
    cat = np.unique(np.asarray(catalogue, np.int64))
    n_cat, n_req = len(cat), len(requests)
    if n_cat == 0:
        raise ValueError("catalogue is empty")

    # First occurrence of each (user, item) in the events table. Histories are prefixes of a user's block,
    # so "item in the history [start, end)" is exactly "its first occurrence lies in [start, end)".
    users = np.unique(np.concatenate([events["user_id"].to_numpy(np.int64), requests["user_id"].to_numpy(np.int64)]))
    ev_items = events["item_id"].to_numpy(np.int64)
    ev_c = np.searchsorted(cat, ev_items).clip(0, n_cat - 1)
    in_cat = cat[ev_c] == ev_items
    ev_u = np.searchsorted(users, events["user_id"].to_numpy(np.int64))
    pair_key, first_pos = np.unique((ev_u * n_cat + ev_c)[in_cat], return_index=True)
    first_pos = np.flatnonzero(in_cat)[first_pos]
    req_u = np.searchsorted(users, requests["user_id"].to_numpy(np.int64))

    def in_history(req: np.ndarray, c: np.ndarray) -> np.ndarray:
        key = req_u[req] * n_cat + c
        j = np.searchsorted(pair_key, key).clip(0, max(len(pair_key) - 1, 0))
        if not len(pair_key):
            return np.zeros(len(req), bool)
        pos = first_pos[j]
        return (pair_key[j] == key) & (pos >= start[req]) & (pos < end[req])

    served = _served(requests)
    s_items = served["item_id"].to_numpy(np.int64)
    s_c = np.searchsorted(cat, s_items).clip(0, n_cat - 1)
    s_ok = cat[s_c] == s_items
    s_req, s_c = served["req"].to_numpy(np.int64)[s_ok], s_c[s_ok]
    served_key = np.sort(s_req * n_cat + s_c)

    # How many items each request may draw from: catalogue - history items - served items not in history.
    sorted_first = np.sort(first_pos)
    hist_count = np.searchsorted(sorted_first, end) - np.searchsorted(sorted_first, start)
    served_extra = np.bincount(s_req[~in_history(s_req, s_c)], minlength=n_req)
    need = np.minimum(k, n_cat - hist_count - served_extra).clip(0)

    rng = np.random.default_rng(seed)
    chosen_req: list[np.ndarray] = []
    chosen_c: list[np.ndarray] = []
    chosen_key = np.empty(0, np.int64)
    for _ in range(_MAX_SAMPLING_ROUNDS):
        active = np.flatnonzero(need > 0)
        if not len(active):
            break
        draws = 2 * need[active] + 4  # oversample: most draws survive when the catalogue is much larger
        req = np.repeat(active, draws)
        c = rng.integers(0, n_cat, size=len(req))
        key = req * n_cat + c
        ok = ~np.isin(key, served_key) & ~in_history(req, c) & ~np.isin(key, chosen_key)
        req, c, key = req[ok], c[ok], key[ok]
        _, first = np.unique(key, return_index=True)  # repeats within this round
        first.sort()
        req, c, key = req[first], c[first], key[first]
        # Keep the first need[r] survivors of each request, in draw order.
        slot = np.arange(len(req)) - np.searchsorted(req, req)
        take = slot < need[req]
        chosen_req.append(req[take])
        chosen_c.append(c[take])
        chosen_key = np.sort(np.concatenate([chosen_key, key[take]]))
        need -= np.bincount(req[take], minlength=n_req)
    for r in np.flatnonzero(need > 0):  # a nearly exhausted catalogue: draw exactly from what is left
        taken = np.concatenate([served_key, chosen_key])
        every = np.arange(n_cat)
        left = every[~np.isin(r * n_cat + every, taken) & ~in_history(np.full(n_cat, r), every)]
        pick = rng.choice(left, size=int(need[r]), replace=False)
        chosen_req.append(np.full(len(pick), r))
        chosen_c.append(pick)

    req = np.concatenate(chosen_req) if chosen_req else np.empty(0, np.int64)
    c = np.concatenate(chosen_c) if chosen_c else np.empty(0, np.int64)
    order = np.lexsort((np.arange(len(req)), req))  # per request, in draw order
    req, c = req[order].astype(np.int64), c[order]
    out = pd.DataFrame({"req": req, "item_id": cat[c], "rank": NO_RANK, "source": SAMPLED})
    for col in _INT_LABELS:
        out[col] = np.zeros(len(out), np.int8)
    out["played_ratio"] = np.nan
    return out


# ----------------------------------------------------------------------------------------------------------
# MovieLens-style ratings
# ----------------------------------------------------------------------------------------------------------


def ratings_examples(interactions: pd.DataFrame) -> RankingExamples:
    """One example per rated event: its item at its time, history = the user's events strictly before.

    ``interactions``: ``user_id, item_id, timestamp_ms, rating`` (rows with a missing rating are history
    only), plus ``event_type``/``played_ratio`` if known, else derived from the rating as the loaders do.
    Labels: ``like`` = rating >= 4, ``dislike`` = rating <= 2, ``rating``.
    """
    _require(interactions, RATING_REQUIRED, "interactions")
    frame = interactions.drop_duplicates("event_id", keep="first") if "event_id" in interactions else interactions
    frame = frame.reset_index(drop=True)
    rating = frame["rating"].to_numpy(np.float64, na_value=np.nan)
    if "event_type" not in frame:
        kind, played = rating_feedback(rating)
        frame = frame.assign(event_type=kind, played_ratio=played)
    events = _events_table(frame)

    rated = ~np.isnan(rating)
    users = frame["user_id"].to_numpy(np.int64)[rated]
    t = frame["timestamp_ms"].to_numpy(np.int64)[rated]
    start, end = _history_bounds(events, users, t)
    r = rating[rated]
    examples = pd.DataFrame(
        {
            "user_id": users,
            "item_id": frame["item_id"].to_numpy(np.int64)[rated],
            "request_id": None,
            "t_ms": t,
            "rank": NO_RANK,
            "source": RATED,
            "hist_start": start,
            "hist_end": end,
            "like": (r >= LIKE_MIN_RATING).astype(np.int8),
            "dislike": (r <= DISLIKE_MAX_RATING).astype(np.int8),
            "rating": r,
        }
    )
    examples = examples.sort_values(["t_ms", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    return RankingExamples(examples=examples, events=events, labels=RATING_LABELS)
