"""Cached VISTA summaries (issue #36): refreshing each user's ``SummaryState`` from the offline store's events,
and folding the events the cache has not seen yet into it at serving time.

What a cached row holds (one per user and summariser version; the Feast view ``user_summary``):

    state                  bytes   SummaryState.to_bytes(): P [K, D] fp16 + log Z [K] fp32 + T, n int64
    summariser_version     str     Summariser.version() of the weights that made it
    events_summarised      int     n, the events folded into it
    summarised_until_ms    int     \
    summarised_until_item  int      }  the key of the newest summarised event (-1, -1, "": none yet)
    summarised_until_type  str     /

Which events a state stands for. A user's events are ordered by the key (timestamp_ms, item_id, event_type),
the order and the identity the online ``user_history`` uses (``features.ingest._merge_history``: same key,
same event), so that same-millisecond events have one order everywhere. Unknown items (not in the model's
vocabulary) are left out first, as ``Recommender.user_embeddings`` leaves them out. Then:

    recent window  = the last ``recent`` (= max_len) known events        read raw by the downstream model
    older          = every known event before the window                  pooled into the summary
    state          = exactly the older events with key <= until           (until: the last key folded)

so a refresh folds the older events with key > until (linear in those alone), and serving folds the older
events of its 200-event history that have key > until (a few, or none) and reads the rest raw. The update
is a sum over events (``models.vista``), so folding in pieces, in any grouping, is the same as one pass
from the empty state; the only loss is the fp16 rounding of P each time a state is stored.

An event that arrives late, with a key at or below ``until``, cannot be folded in: the state is a prefix of the
key order by construction. A refresh notices it by counting: the user's older events with key <= until must be
exactly the n the state holds. A user whose count differs (a late event landed inside the summarised prefix)
is summarised again from the empty state, from all their older events (``attrs["users_resummarised"]``): late
events cost that user one pass over their history, and are never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from features.events import EVENT_TYPE_CODES
from models.vista import Summariser, SummaryState, state_bytes, summarise_events

SUMMARY_COLUMNS = ("user_id", "state", "summariser_version", "events_summarised", "summarised_until_ms",
                   "summarised_until_item", "summarised_until_type")
NOTHING = (-1, -1, "")  # the key "before every event": an empty state's until
FOLD_CHUNK = 65_536  # events per padded update: [B, n, K] + [B, n, D] fp32 stay a few tens of MB

# serving: how a vista answer's summary was obtained
CACHED = "cached"  # the cached state, plus the older events of the history it had not seen (exact)
LAGGING = "lagging"  # the cached state is older than the online history reaches back: events in between are missing
STALE = "stale"  # no usable cache (missing, another summariser version): summarised from the online history


class SummariserMismatch(ValueError):
    """Cached states made by another summariser version than the model's: not this model's summaries."""


@dataclass(frozen=True)
class Boundary:
    """The key of the newest event a state summarises (``NOTHING``: none)."""

    ms: int
    item: int
    type: str

    @staticmethod
    def of(row: Mapping[str, Any]) -> "Boundary":
        return Boundary(int(row["summarised_until_ms"]), int(row["summarised_until_item"]),
                        str(row["summarised_until_type"]))

    def precedes(self, ms: int, item: int, type_: str) -> bool:
        """Whether the event (ms, item, type) comes after this boundary in key order (is not summarised)."""
        return (ms, item, type_) > (self.ms, self.item, self.type)


def _summariser(recommender: Any) -> Summariser:
    summariser = getattr(recommender.model, "summariser", None)
    if summariser is None or recommender.summariser_version is None:
        raise ValueError(f"a {recommender.config.model} model has no summariser: only vista models are summarised")
    return summariser


# ------------------------------------------------------------------------------------------------ refresh


def refresh_summaries(recommender: Any, events: pd.DataFrame, previous: pd.DataFrame | None, *,
                      recent: int, chunk: int = FOLD_CHUNK) -> pd.DataFrame:
    """One row per user (``SUMMARY_COLUMNS``): ``previous`` (the same table from the last refresh, or None)
    with every older event of ``events`` it has not summarised yet folded in (module docstring).

    ``events``: the offline store's rows (user_id, item_id, event_type, timestamp_ms), every event of each
    user it covers (the recent window is counted from them). Users of ``previous`` absent from ``events``
    keep their rows; users of ``events`` new to ``previous`` start from the empty state (a user whose events
    all fit the recent window gets an empty state: 0 events, still this version's row). The summariser's
    work is linear in the events folded; ``df.attrs["events_folded"]`` says how many.

    Raises ``SummariserMismatch`` when ``previous`` holds another summariser version: states are never mixed
    (a new version is a backfill from scratch: ``previous=None``)."""
    summariser = _summariser(recommender)
    version = recommender.summariser_version
    k, d = summariser.cfg.tokens, summariser.cfg.dim
    previous = previous if previous is not None else pd.DataFrame({c: [] for c in SUMMARY_COLUMNS})
    others = sorted(set(previous["summariser_version"].astype(str)) - {version})
    if others:
        raise SummariserMismatch(f"cached states of summariser {others} cannot be refreshed by summariser {version}: "
                                 "backfill the new version from scratch")
    ev = known_events(recommender, events)  # sorted by (user, key), deduplicated, known items only
    users = ev["user_id"].to_numpy()
    pos = ev.groupby("user_id", sort=False).cumcount().to_numpy()  # [E] place in the user's key order
    size = ev.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()  # [E] user's known events
    older = pos < size - recent  # [E] left the recent window
    # the boundary of each event's user (NOTHING for a user without a previous row)
    prev = previous.set_index("user_id")
    b_ms = _lookup(prev, "summarised_until_ms", users, NOTHING[0])
    b_item = _lookup(prev, "summarised_until_item", users, NOTHING[1])
    b_type = _lookup(prev, "summarised_until_type", users, NOTHING[2])
    ms, item, typ = ev["timestamp_ms"].to_numpy(), ev["item_id"].to_numpy(), ev["event_type"].to_numpy().astype(str)
    after = (ms > b_ms) | ((ms == b_ms) & ((item > b_item) | ((item == b_item) & (typ > b_type.astype(str)))))
    # late events: a user whose older events up to the boundary are not the n the state holds starts again
    covered = pd.Series(older & ~after).groupby(users, sort=False).sum()  # per user: older events <= until
    held = prev["events_summarised"].reindex(covered.index)  # NaN: no previous row
    late = covered.index[held.notna().to_numpy() & (covered.to_numpy() != held.fillna(-1).to_numpy())].to_numpy()
    if len(late):
        prev = prev.drop(index=late)
        after = after | np.isin(users, late)
    fold = ev[older & after]

    # one state per user that has something to fold: its previous state, or the empty one
    fold_users, starts, lengths = np.unique(fold["user_id"].to_numpy(), return_index=True, return_counts=True)
    had = [u in prev.index for u in fold_users]
    records = [prev.at[u, "state"] for u, h in zip(fold_users, had) if h]
    base = summariser.init_state(len(fold_users))
    if records:  # load the stored ones over the empty ones
        stored = SummaryState.from_bytes(records, k, d)
        rows = torch.tensor([i for i, h in enumerate(had) if h], dtype=torch.long)
        base.log_mass[rows], base.pooled[rows] = stored.log_mass, stored.pooled
        base.last_time[rows], base.count[rows] = stored.last_time, stored.count
    with torch.inference_mode():
        state = fold_events(summariser, base, fold["dense"].to_numpy(), fold["code"].to_numpy(),
                            fold["timestamp_ms"].to_numpy() // 1000, lengths, chunk=chunk)
    last = starts + lengths - 1  # each folded user's newest folded event (sorted by key)
    folded = pd.DataFrame({
        "user_id": fold_users.astype(np.int64), "state": state.to_bytes(), "summariser_version": version,
        "events_summarised": state.count.numpy().astype(np.int64),
        "summarised_until_ms": fold["timestamp_ms"].to_numpy()[last].astype(np.int64),
        "summarised_until_item": fold["item_id"].to_numpy()[last].astype(np.int64),
        "summarised_until_type": fold["event_type"].to_numpy()[last].astype(str)})
    # users seen for the first time with nothing older than their window: the empty state
    seen = set(prev.index) | set(fold_users.tolist())
    fresh = np.array(sorted(set(np.unique(users).tolist()) - seen), dtype=np.int64)
    empty = pd.DataFrame({
        "user_id": fresh, "state": summariser.init_state(len(fresh)).to_bytes() if len(fresh) else [],
        "summariser_version": version, "events_summarised": np.zeros(len(fresh), np.int64),
        "summarised_until_ms": np.full(len(fresh), NOTHING[0], np.int64),
        "summarised_until_item": np.full(len(fresh), NOTHING[1], np.int64), "summarised_until_type": NOTHING[2]})
    kept = previous[~previous["user_id"].isin(fold_users) & ~previous["user_id"].isin(late)]
    parts = [p for p in (kept, folded, empty) if len(p)]
    out = (pd.concat(parts, ignore_index=True) if parts else previous.iloc[:0]).loc[:, list(SUMMARY_COLUMNS)]
    out = out.astype({"user_id": np.int64, "events_summarised": np.int64, "summarised_until_ms": np.int64,
                      "summarised_until_item": np.int64}).sort_values("user_id", ignore_index=True)
    if len(out) and not all(len(r) == state_bytes(k, d) for r in out["state"]):
        raise ValueError(f"a state record is not {state_bytes(k, d)} bytes (K={k}, D={d})")
    out.attrs["events_folded"] = int(len(fold))
    out.attrs["users_folded"] = int(len(fold_users))
    out.attrs["users_resummarised"] = int(len(late))
    return out


def known_events(recommender: Any, events: pd.DataFrame) -> pd.DataFrame:
    """The events a vista model reads, in key order per user: deduplicated by (user, key) as the online history
    is, unknown items dropped as ``Recommender.user_embeddings`` drops them; plus dense ids and event codes."""
    ev = events.loc[:, ["user_id", "item_id", "event_type", "timestamp_ms"]]
    ev = ev.astype({"user_id": np.int64, "item_id": np.int64, "timestamp_ms": np.int64, "event_type": str})
    ev = ev.drop_duplicates(["user_id", "timestamp_ms", "item_id", "event_type"])
    ev = ev.assign(dense=recommender.vocab.encode(ev["item_id"].to_numpy()))
    ev = ev[ev["dense"] > 0]
    ev = ev.assign(code=ev["event_type"].map(EVENT_TYPE_CODES).fillna(0).astype(np.int64))
    return ev.sort_values(["user_id", "timestamp_ms", "item_id", "event_type"], kind="stable", ignore_index=True)


def _lookup(table: pd.DataFrame, column: str, users: np.ndarray, missing: Any) -> np.ndarray:
    """``table[column]`` (indexed by user) for each of ``users``; ``missing`` for a user not in it."""
    if table.empty:
        return np.full(len(users), missing, dtype=object if isinstance(missing, str) else np.int64)
    values = table[column].reindex(users)
    return values.fillna(missing).to_numpy().astype(object if isinstance(missing, str) else np.int64)


def fold_events(summariser: Summariser, state: SummaryState, items: np.ndarray, codes: np.ndarray,
                seconds: np.ndarray, lengths: np.ndarray, *, chunk: int = FOLD_CHUNK) -> SummaryState:
    """Fold each user's events (flat [M] dense ids, codes, seconds; user b owns the ``lengths[b]`` events after
    those of users < b) into ``state`` [B], at most ``chunk`` padded events per update.

    The update pads every user of a call to the longest one ([B, n, K]), so users of similar length go
    together (sorted by length) and a user longer than ``chunk`` is folded in pieces; exact either way, since
    folding is a sum over events."""
    lengths = np.asarray(lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out: list[SummaryState | None] = [None] * len(lengths)
    group: list[int] = []
    for b in list(np.argsort(lengths, kind="stable")) + [None]:  # None: flush the last group
        width = 0 if b is None else min(int(lengths[b]), chunk)
        if group and (b is None or (len(group) + 1) * max(width, 1) > chunk):
            rows = torch.tensor(group, dtype=torch.long)
            st = state.select(rows)
            for lo in range(0, int(lengths[group].max()), chunk):  # pieces of every user in the group
                take = np.clip(lengths[group] - lo, 0, chunk)  # [G] events of this piece per user
                idx = np.concatenate([np.arange(offsets[u] + lo, offsets[u] + lo + t) for u, t in zip(group, take)])
                st = summarise_events(summariser, np.split(items[idx], np.cumsum(take)[:-1]),
                                      np.split(codes[idx], np.cumsum(take)[:-1]),
                                      np.split(seconds[idx], np.cumsum(take)[:-1]), st)
            for i, u in enumerate(group):
                out[u] = st.select([i])
            group = []
        if b is not None:
            group.append(int(b))
    if not out:
        return state
    return SummaryState.cat(out)  # type: ignore[arg-type]


def write_online_summaries(store: Any, rows: pd.DataFrame, batch: int = 5_000) -> None:
    """Write ``rows`` (``SUMMARY_COLUMNS``) to the online ``user_summary`` view, as ingest writes histories.
    Stamped with the write's time, not the events': Redis keeps a row only over an older one, and a new
    version's backfill has the same event times as the states it replaces."""
    from features.feature_repo import write_online

    now = datetime.now(timezone.utc)
    records = rows.loc[:, list(SUMMARY_COLUMNS)].to_dict("records")
    for lo in range(0, len(records), batch):
        write_online(store, "user_summary", "user_id", [{**r, "event_timestamp": now} for r in records[lo: lo + batch]],
                     "event_timestamp")


# ------------------------------------------------------------------------------------------------ serving


def serving_states(recommender: Any, histories: Sequence[Mapping[str, Any]], *,
                   history_length: int | None = None) -> tuple[list[SummaryState | None], list[str]]:
    """Each history's summary state for ``Recommender.retrieve(..., summaries=...)`` and how it was obtained
    (``CACHED``, ``LAGGING`` or ``STALE``).

    A history dict is the online ``user_history`` row (item_ids, event_types, timestamps_ms, oldest first) with
    its cached ``user_summary`` row under ``"summary"`` (None: none cached). The cached state is used when its
    version is the model's and the history's recent window starts after it; the older events of the history
    that it has not summarised are folded in (exact, a handful of events). Otherwise None: the model
    summarises what the online history holds (``STALE``). ``history_length``: the events the online history
    keeps; a full history whose oldest event is newer than the cache's boundary may have lost events between
    the two (``LAGGING``: the cache is still used)."""
    summariser = _summariser(recommender)
    version, max_len = recommender.summariser_version, recommender.config.max_len
    k, d = summariser.cfg.tokens, summariser.cfg.dim
    status = [STALE] * len(histories)
    rows, records, new = [], [], []
    for r, h in enumerate(histories):
        cached = h.get("summary")
        if (not cached or cached.get("summariser_version") != version
                or len(cached.get("state", b"")) != state_bytes(k, d)):
            continue  # none, another summariser's, or another size: not this model's summary
        raw = np.asarray(h.get("item_ids", []), np.int64)
        ms = np.asarray(h.get("timestamps_ms", []), np.int64)
        types = [str(t) for t in h.get("event_types", [])]
        known = recommender.read_order(raw, ms)  # the events user_embeddings reads, in its order
        boundary = Boundary.of(cached)
        cut = max(len(known) - max_len, 0)
        first = known[cut] if cut < len(known) else None  # the recent window's oldest event
        if first is not None and not boundary.precedes(int(ms[first]), int(raw[first]), types[first]):
            continue  # the cache holds events of the recent window (the history lags the cache): not usable
        older = [j for j in known[:cut] if boundary.precedes(int(ms[j]), int(raw[j]), types[j])]
        full = history_length is not None and len(raw) >= history_length
        lost = full and int(cached["events_summarised"]) > 0 and len(raw) and boundary.precedes(
            int(ms[0]), int(raw[0]), types[0])  # the oldest event kept is newer than the boundary: a gap, maybe
        status[r] = LAGGING if lost else CACHED
        rows.append(r)
        records.append(cached["state"])
        new.append((recommender.vocab.encode(raw[older]), np.array([EVENT_TYPE_CODES.get(types[j], 0) for j in older], np.int64),
                    ms[older] // 1000))
    states: list[SummaryState | None] = [None] * len(histories)
    if rows:
        with torch.inference_mode():
            folded = summarise_events(summariser, [n[0] for n in new], [n[1] for n in new], [n[2] for n in new],
                                      SummaryState.from_bytes(records, k, d))
        for i, r in enumerate(rows):
            states[r] = folded.select([i])
    return states, status


__all__ = ["CACHED", "LAGGING", "NOTHING", "STALE", "SUMMARY_COLUMNS", "Boundary", "SummariserMismatch",
           "fold_events", "known_events", "refresh_summaries", "serving_states", "write_online_summaries"]
