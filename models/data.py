"""Interaction events -> per-user jagged sequences -> splits -> TorchRec batches.

Vocabulary of the pipeline (all arrays are numpy until a ``Batch`` is built):

* ``UserSequences`` stores every user's events back to back (one flat array per field + ``offsets``), sorted
  by time. Nothing is padded: a user's events are ``[offsets[u], offsets[u + 1])``.
* An ``Examples`` row is a *window* of one user's consecutive events: inputs ``[start, end - 1)`` and
  targets ``[start + 1, end)`` (position i predicts event i + 1), plus which targets are ranked and which are
  feedback-scored. All indices are absolute into the flat arrays, so a window costs four integers.
* ``make_batch`` turns a handful of windows into a ``Batch``: a ``KeyedJaggedTensor`` (keys ``item_id`` and
  ``event_type``) with lengths + flat values, and jagged per-position targets. Models pad only to the longest
  window *in the batch*, inside their attention, with FBGEMM's jagged ops.
* A model that summarises what came before its window (VISTA, ``models.vista``) asks ``make_batch`` for each
  window's *older prefix* too (``older_events``): the user's events ``[offsets[u], start)``, found from the
  window's start alone, as a second ``KeyedJaggedTensor`` (``Batch.older``). Other batches do not carry it.

Which events are in the history and which are targets (the ARGUS recipe):

* Every event (skips and dislikes too) is part of the *input* history: a skip is informative context.
* Next-item *targets* are positive events only: ``like``, ``add_to_playlist``, and ``listen`` with
  ``played_ratio >= 0.5`` or unknown (a listen without a ratio is a completed play, e.g. MovieLens-style
  implicit data). Training the retrieval head to predict a skip would teach it to recommend what users skip.
  ``with_targets(seqs, "all")`` makes every event a target instead: the published SASRec/HSTU protocol, where
  every MovieLens rating, low ones included, is an interaction to predict.
* The optional feedback head is trained on *every* next event: given the next item, was the reaction positive?
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.* on CPU)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.events import EVENT_TYPE_CODES, POSITIVE_TYPES
from models.jagged_fallback import register_missing

# A GPU beside the CPU-only fbgemm_gpu build: PyTorch kernels for the jagged ops it lacks (a no-op otherwise).
register_missing()

FEATURE_KEYS = ("item_id", "event_type")  # order of keys in every KeyedJaggedTensor we build
NUM_EVENT_TYPES = len(EVENT_TYPE_CODES) + 1  # + padding code 0
POSITIVE_CODES = frozenset(EVENT_TYPE_CODES[t] for t in POSITIVE_TYPES)
LISTEN_CODE = EVENT_TYPE_CODES["listen"]
MIN_PLAYED_RATIO = 0.5  # a listen below this ratio is an early abandon: negative feedback
RANK_ALL_POSITIVES = -1  # Examples.rank_at of a training window: every positive target is ranked
RANK_NONE = -2  # Examples.rank_at of a feedback-only evaluation window


# ----------------------------------------------------------------------------------------------------------
# Item vocabulary
# ----------------------------------------------------------------------------------------------------------


class ItemVocab:
    """Raw item id (any int64) <-> dense index 1..V. Index 0 is padding / unknown."""

    def __init__(self, raw_ids: Sequence[int] | np.ndarray):
        ids = np.asarray(raw_ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ItemVocab ids must be unique")
        self.raw_ids = ids  # raw_ids[i - 1] is the raw id of dense index i
        self._sorted = np.argsort(ids, kind="stable")  # for vectorised encode via searchsorted

    @classmethod
    def build(cls, item_ids: np.ndarray | Sequence[int]) -> "ItemVocab":
        return cls(np.unique(np.asarray(item_ids, dtype=np.int64)))  # sorted: deterministic across runs

    def __len__(self) -> int:
        return len(self.raw_ids)

    @property
    def num_embeddings(self) -> int:
        return len(self.raw_ids) + 1  # + padding row 0

    def encode(self, raw: np.ndarray | Sequence[int]) -> np.ndarray:
        """Raw ids -> dense indices; unknown ids map to 0."""
        raw = np.asarray(raw, dtype=np.int64)
        if len(self.raw_ids) == 0:
            return np.zeros(raw.shape, dtype=np.int64)
        sorted_ids = self.raw_ids[self._sorted]
        pos = np.searchsorted(sorted_ids, raw).clip(0, len(sorted_ids) - 1)
        found = sorted_ids[pos] == raw
        return np.where(found, self._sorted[pos] + 1, 0).astype(np.int64)

    def decode(self, idx: np.ndarray | Sequence[int]) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if (idx < 1).any() or (idx > len(self.raw_ids)).any():
            raise IndexError("dense index out of range 1..V")
        return self.raw_ids[idx - 1]

    def to_json(self) -> str:
        return json.dumps({"version": 1, "raw_ids": self.raw_ids.tolist()})

    @classmethod
    def from_json(cls, text: str) -> "ItemVocab":
        return cls(json.loads(text)["raw_ids"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemVocab) and np.array_equal(self.raw_ids, other.raw_ids)


# ----------------------------------------------------------------------------------------------------------
# Per-user sequences
# ----------------------------------------------------------------------------------------------------------


def positive_mask(event_types: np.ndarray, played_ratio: np.ndarray) -> np.ndarray:
    """The target rule (see module docstring): like / add_to_playlist / listen with ratio >= 0.5 or unknown."""
    event_types = np.asarray(event_types)
    played_ratio = np.asarray(played_ratio, dtype=np.float64)
    completed = np.isnan(played_ratio) | (played_ratio >= MIN_PLAYED_RATIO)
    is_positive_type = np.isin(event_types, list(POSITIVE_CODES))
    return is_positive_type & ((event_types != LISTEN_CODE) | completed)


@dataclass
class UserSequences:
    """All users' events, time-sorted, stored flat. User u owns events ``[offsets[u], offsets[u + 1])``."""

    vocab: ItemVocab
    user_ids: np.ndarray  # [U] raw user ids
    offsets: np.ndarray  # [U + 1] int64
    items: np.ndarray  # [E] int64 dense item index (1..V)
    event_types: np.ndarray  # [E] int64 event code (1..6)
    timestamps: np.ndarray  # [E] int64 seconds
    played_ratio: np.ndarray  # [E] float32, NaN = unknown
    positive: np.ndarray  # [E] bool, positive reaction: the feedback task's label
    target: np.ndarray | None = None  # [E] bool, events the next-item task ranks; None = the positive ones

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = self.positive

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_events(self) -> int:
        return len(self.items)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def build_sequences(df: pd.DataFrame, vocab: ItemVocab | None = None) -> UserSequences:
    """Events DataFrame (user_id, item_id, event_type, timestamp_ms, played_ratio) -> ``UserSequences``.

    Events are sorted per user by ``timestamp_ms``; ties keep their order in ``df`` (stable sort), so a
    source that writes ``listen`` then ``like`` in the same millisecond keeps that order. Items unknown to a
    given ``vocab`` are dropped (they cannot be embedded).
    """
    missing = {"user_id", "item_id", "event_type", "timestamp_ms"} - set(df.columns)
    if missing:
        raise ValueError(f"events frame lacks columns {sorted(missing)}")
    vocab = vocab if vocab is not None else ItemVocab.build(df["item_id"].to_numpy())

    types = df["event_type"].map(EVENT_TYPE_CODES)
    if types.isna().any():
        bad = sorted(set(df["event_type"][types.isna()].astype(str)))
        raise ValueError(f"unknown event types {bad}; expected {sorted(EVENT_TYPE_CODES)}")
    users = df["user_id"].to_numpy(np.int64)
    ts_ms = df["timestamp_ms"].to_numpy(np.int64)
    items = vocab.encode(df["item_id"].to_numpy(np.int64))
    ratio = (
        df["played_ratio"].to_numpy(np.float32, na_value=np.nan)
        if "played_ratio" in df.columns
        else np.full(len(df), np.nan, np.float32)
    )
    codes = types.to_numpy(np.int64)

    keep = items > 0
    order = np.lexsort((ts_ms[keep], users[keep]))  # lexsort is stable: last key is primary
    users, ts_ms, items, ratio, codes = (a[keep][order] for a in (users, ts_ms, items, ratio, codes))

    user_ids, counts = np.unique(users, return_counts=True)
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return UserSequences(
        vocab=vocab,
        user_ids=user_ids,
        offsets=offsets,
        items=items,
        event_types=codes,
        timestamps=ts_ms // 1000,
        played_ratio=ratio,
        positive=positive_mask(codes, ratio),
    )


TARGET_RULES = ("positive", "all")


def with_targets(seqs: UserSequences, rule: str) -> UserSequences:
    """The next-item targets: ``positive`` events (the platform's rule) or ``all`` events (the papers')."""
    if rule not in TARGET_RULES:
        raise ValueError(f"unknown target rule {rule!r} (expected one of {TARGET_RULES})")
    target = seqs.positive if rule == "positive" else np.ones(seqs.num_events, dtype=bool)
    return replace(seqs, target=target)


# ----------------------------------------------------------------------------------------------------------
# Splits: windows of events
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Examples:
    """One window of consecutive events per row; every index is absolute into ``UserSequences`` arrays.

    inputs are events ``[start, end - 1)``, targets ``[start + 1, end)``. ``rank_at = RANK_ALL_POSITIVES``
    ranks every positive target (training), ``RANK_NONE`` none (a feedback-only window); otherwise only the
    target at ``rank_at`` is ranked (evaluation) and items of events ``[history_from, rank_at)`` count as
    already seen. Targets at ``>= feedback_from`` are feedback examples.
    """

    start: np.ndarray  # [B]
    end: np.ndarray  # [B]
    rank_at: np.ndarray  # [B]
    feedback_from: np.ndarray  # [B]
    history_from: np.ndarray  # [B]

    def __len__(self) -> int:
        return len(self.start)

    def subset(self, rows: np.ndarray | slice) -> "Examples":
        return Examples(*(a[rows] for a in self._arrays()))

    def concat(self, other: "Examples") -> "Examples":
        return Examples(*(np.concatenate([a, b]) for a, b in zip(self._arrays(), other._arrays())))

    def seen_in_window_only(self) -> "Examples":
        """The same windows, but only the items of their own inputs count as already seen (the reference's
        eval filters its input ids: a user's items older than the window stay in the ranking)."""
        return Examples(self.start, self.end, self.rank_at, self.feedback_from, self.start.copy())

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.start, self.end, self.rank_at, self.feedback_from, self.history_from)

    @property
    def num_ranked(self) -> int:
        return int((self.rank_at >= 0).sum())

    @property
    def num_inputs(self) -> int:
        """Input events over all windows: the tokens one pass over these examples feeds the model."""
        return int((self.end - self.start - 1).sum())

    @classmethod
    def empty(cls) -> "Examples":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, z)


@dataclass
class Split:
    train: Examples
    valid: Examples
    test: Examples


def _train_windows(seqs: UserSequences, cut: np.ndarray, max_len: int) -> Examples:
    """Each user's most recent ``max_len + 1`` events before ``cut`` (absolute index): the SASRec/HSTU recipe."""
    begin = seqs.offsets[:-1]
    start = np.maximum(begin, cut - (max_len + 1))
    keep = cut - start >= 2  # at least one input and one target
    start, end, begin = start[keep], cut[keep], begin[keep]
    return Examples(start, end, np.full(len(start), RANK_ALL_POSITIVES, np.int64), start + 1, begin)


def tile_windows(train: Examples, max_len: int) -> Examples:
    """Every training event of each window's user, not only the latest ``max_len + 1``: the events
    ``[history_from, end)`` of each row cut into consecutive windows of up to ``max_len + 1`` events that overlap
    by one event (the last target of a window is the first input of the next), so every event but each
    user's first is a target exactly once.

    Why: a user with 10,000 events gives the recent-window recipe one window of 201, and the rest of the history
    never trains anything (recipe ``train_windows: all``; the lifelong world, ``features/lifelong.py``). The
    newest window of each user is the one ``_train_windows`` builds; the older ones end where it starts.
    """
    step = max_len  # a window of max_len + 1 events has max_len targets
    spans = np.maximum(train.end - train.history_from - 1, 0)  # targets available per user
    counts = np.where(spans > 0, -(-spans // step), 0)  # windows per user (ceil)
    row = np.repeat(np.arange(len(train)), counts)
    k = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)  # 0 = newest window
    end = train.end[row] - k * step
    start = np.maximum(train.history_from[row], end - (max_len + 1))
    return Examples(start, end, np.full(len(start), RANK_ALL_POSITIVES, np.int64), start + 1, train.history_from[row])


def _eval_windows(seqs: UserSequences, rank_at: np.ndarray, stop: np.ndarray, max_len: int) -> Examples:
    """Rank the event at ``rank_at`` given the ``max_len`` events before it; feedback-score ``[rank_at, stop)``.

    The ranking window keeps the full ``max_len`` context of the ranked target. Feedback targets after it
    that do not fit in that window get a second, feedback-only window ending at ``stop``.
    """
    begin = seqs.offsets[:-1]
    keep = rank_at >= 0
    rank_at, stop, begin = rank_at[keep], np.maximum(stop[keep], rank_at[keep] + 1), begin[keep]
    start = np.maximum(begin, rank_at - max_len)
    end = np.minimum(stop, start + max_len + 1)
    ranking = Examples(start, end, rank_at, rank_at, begin)
    rest = end < stop  # feedback targets [end, stop) did not fit
    extra = Examples(
        start=np.maximum(begin[rest], stop[rest] - 1 - max_len),
        end=stop[rest],
        rank_at=np.full(int(rest.sum()), RANK_NONE, np.int64),
        feedback_from=end[rest],
        history_from=begin[rest],
    )
    return ranking.concat(extra)


def _ranked_targets(seqs: UserSequences) -> np.ndarray:
    """Target events (``seqs.target``: the positive ones by default) that have at least one earlier event of
    their user (a target needs a history)."""
    first = np.zeros(seqs.num_events, dtype=bool)
    first[seqs.offsets[:-1][seqs.lengths() > 0]] = True
    return seqs.target & ~first


def leave_one_out(seqs: UserSequences, max_len: int, *, validation: bool = True) -> Split:
    """Last positive target per user = test, second-to-last = validation, everything before = training.

    Validation and test histories contain every event before their target (negatives included). Users with
    fewer than two positive targets are training-only.

    ``validation=False`` is the published SASRec/HSTU MovieLens protocol (the reference's ``ignore_last_n=1``):
    no validation split; training sees every event but each user's last target, which is the test; users with
    at least one target are tested.
    """
    pos_idx = np.flatnonzero(_ranked_targets(seqs))
    owner = np.searchsorted(seqs.offsets, pos_idx, side="right") - 1  # [T] user of each target (sorted)
    n_pos = np.bincount(owner, minlength=seqs.num_users)
    past_last = np.searchsorted(owner, np.arange(seqs.num_users), side="right")  # one past u's last target
    last = np.where(n_pos >= 1, pos_idx[np.clip(past_last - 1, 0, None)] if len(pos_idx) else -1, -1)
    second = np.where(n_pos >= 2, pos_idx[np.clip(past_last - 2, 0, None)] if len(pos_idx) else -1, -1)
    user_end = seqs.offsets[1:]
    if not validation:
        has_test = n_pos >= 1
        return Split(
            train=_train_windows(seqs, np.where(has_test, last, user_end), max_len),
            valid=Examples.empty(),
            test=_eval_windows(seqs, np.where(has_test, last, -1), user_end, max_len),
        )
    has_eval = n_pos >= 2
    train_cut = np.where(has_eval, second, user_end)
    return Split(
        train=_train_windows(seqs, train_cut, max_len),
        valid=_eval_windows(seqs, np.where(has_eval, second, -1), last, max_len),
        test=_eval_windows(seqs, np.where(has_eval, last, -1), user_end, max_len),
    )


def temporal_split(
    seqs: UserSequences,
    max_len: int,
    *,
    test_time_s: int | None = None,
    valid_time_s: int | None = None,
    test_fraction: float = 0.1,
    valid_fraction: float = 0.1,
) -> Split:
    """Global temporal split: train on events before ``valid_time``; rank each user's first positive event in
    ``[valid_time, test_time)`` (validation) and at/after ``test_time`` (test), given everything before it.

    Times default to quantiles of all event times (the last ``test_fraction`` of events is the test period).
    Unlike leave-one-out no future of *other* users leaks into training. Users new after a cut are skipped
    (no history: the popularity fallback serves them).
    """
    ts = seqs.timestamps
    if test_time_s is None:
        test_time_s = int(np.quantile(ts, 1.0 - test_fraction))
    if valid_time_s is None:
        valid_time_s = int(np.quantile(ts, 1.0 - test_fraction - valid_fraction))
    user_end = seqs.offsets[1:]
    valid_cut = _first_at_or_after(seqs, valid_time_s)
    test_cut = _first_at_or_after(seqs, test_time_s)
    target_idx = np.flatnonzero(_ranked_targets(seqs))  # sorted; users are contiguous

    def first_target(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """[U] first positive target in [lo, hi) per user, -1 if none."""
        j = np.searchsorted(target_idx, lo)
        cand = target_idx[np.minimum(j, len(target_idx) - 1)] if len(target_idx) else np.full_like(lo, -1)
        return np.where((j < len(target_idx)) & (cand < hi), cand, -1)

    return Split(
        train=_train_windows(seqs, valid_cut, max_len),
        valid=_eval_windows(seqs, first_target(valid_cut, test_cut), test_cut, max_len),
        test=_eval_windows(seqs, first_target(test_cut, user_end), user_end, max_len),
    )


def _first_at_or_after(seqs: UserSequences, time_s: int) -> np.ndarray:
    """[U] absolute index of each user's first event with timestamp >= time_s (the user's end if none)."""
    # (user, time) packed into one sortable int64 key: users are contiguous and time-sorted within a user.
    span = int(seqs.timestamps.max(initial=0)) + 2
    owner = np.repeat(np.arange(seqs.num_users, dtype=np.int64), seqs.lengths())
    key = owner * span + seqs.timestamps
    probe = np.arange(seqs.num_users, dtype=np.int64) * span + int(np.clip(time_s, 0, span - 1))
    return np.searchsorted(key, probe, side="left")


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """B jagged sequences; every per-position tensor is aligned with ``features["item_id"].values()`` [N]."""

    features: KeyedJaggedTensor  # keys FEATURE_KEYS, stride B, identical lengths per key
    timestamps: torch.Tensor  # [N] int64 seconds of each input event
    query_timestamps: torch.Tensor  # [N] int64 seconds at which position i predicts (time of event i + 1)
    target_ids: torch.Tensor  # [N] int64 next item (0 = none, e.g. serving)
    target_positive: torch.Tensor  # [N] bool, next event is positive feedback
    rank_mask: torch.Tensor  # [N] bool, positions scored by the next-item (retrieval) task
    feedback_mask: torch.Tensor  # [N] bool, positions scored by the feedback task
    lengths: torch.Tensor  # [B] int64
    offsets: torch.Tensor  # [B + 1] int64 (complete cumsum of lengths)
    seen_rows: torch.Tensor | None = None  # [S] ranked-window number of each already-seen item (evaluation)
    seen_items: torch.Tensor | None = None  # [S] item index of each already-seen item
    window_ids: torch.Tensor | None = None  # [B] each window's place in its global batch (None: 0..B-1)
    older: KeyedJaggedTensor | None = None  # keys FEATURE_KEYS, stride B: each window's events before its start
    older_timestamps: torch.Tensor | None = None  # [M] int64 seconds of each older event

    @property
    def batch_size(self) -> int:
        return int(self.lengths.numel())

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def older_inputs(self) -> tuple[KeyedJaggedTensor, torch.Tensor] | tuple[()]:
        """The model's extra inputs when the batch carries older prefixes (VISTA), else none: so the call
        ``model(features, timestamps, query_timestamps, *batch.older_inputs())`` is unchanged for other models."""
        return (self.older, self.older_timestamps) if self.older is not None else ()

    def to(self, device: torch.device | str) -> "Batch":
        moved = {k: (v.to(device) if v is not None else None) for k, v in self.__dict__.items()}
        return Batch(**moved)


def jagged_features(items: torch.Tensor, event_types: torch.Tensor, lengths: torch.Tensor) -> KeyedJaggedTensor:
    """The model's sparse input: both keys share ``lengths`` (one event type per history item)."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(FEATURE_KEYS),
        values=torch.cat([items, event_types]),
        lengths=torch.cat([lengths, lengths]),
    )


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    """[B] -> [B + 1] exclusive-then-total cumsum, e.g. [2, 3] -> [0, 2, 5] (FBGEMM's jagged offsets)."""
    return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)


def to_padded(x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> tuple[torch.Tensor, int]:
    """Jagged [N, D] -> right-padded [B, n, D] with n = the batch's longest sequence (checked against max_len)."""
    lengths = offsets[1:] - offsets[:-1]
    n = int(lengths.max()) if lengths.numel() else 0
    if n > max_len:
        raise ValueError(f"sequence of length {n} exceeds max_len {max_len}")
    return torch.ops.fbgemm.jagged_to_padded_dense(x, [offsets], [n], 0.0), n


def to_jagged(x: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Right-padded [B, n, D] -> jagged [N, D], dropping the padded positions (N given: no host sync)."""
    return torch.ops.fbgemm.dense_to_jagged(x, [offsets], total)[0]


def jagged_positions(offsets: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the N jagged values: (its sequence [N], its position in that sequence [N], from 0)."""
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
    return row, torch.arange(len(row), device=offsets.device) - offsets[:-1][row]


def _ranges(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start[i], stop[i])`` without a Python loop."""
    lengths = np.maximum(stop - start, 0)
    total = int(lengths.sum())
    base = np.repeat(start - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return base + np.arange(total)


def older_prefix(seqs: UserSequences, start: np.ndarray, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[B] window starts -> ([B] first, [B] stop): the events of each window's user before the window,
    ``[offsets[u], start)``, or only the ``limit`` latest of them (0 = all)."""
    owner = np.searchsorted(seqs.offsets, start, side="right") - 1  # the user whose events contain start
    first = seqs.offsets[owner]
    if limit > 0:
        first = np.maximum(first, start - limit)
    return first, start


def make_batch(seqs: UserSequences, ex: Examples, *, with_seen: bool = False, older_events: int | None = None) -> Batch:
    """Gather the windows ``ex`` into a jagged ``Batch`` (no padding anywhere).

    ``older_events``: None = no older prefix (every model but VISTA); n >= 0 = ``Batch.older`` holds each
    window's events before it, the n latest of them (0 = all: ``older_prefix``)."""
    n_inputs = ex.end - 1 - ex.start  # [B]
    idx = _ranges(ex.start, ex.end - 1)  # [N] absolute index of each input event
    tgt = idx + 1  # [N] absolute index of the event each position predicts
    row = np.repeat(np.arange(len(ex)), n_inputs)
    ranked_one = ex.rank_at[row]
    rank_mask = np.where(ranked_one == RANK_ALL_POSITIVES, seqs.target[tgt], tgt == ranked_one)
    feedback_mask = tgt >= ex.feedback_from[row]

    lengths = torch.from_numpy(n_inputs.astype(np.int64))
    batch = Batch(
        features=jagged_features(torch.from_numpy(seqs.items[idx]), torch.from_numpy(seqs.event_types[idx]), lengths),
        timestamps=torch.from_numpy(seqs.timestamps[idx]),
        query_timestamps=torch.from_numpy(seqs.timestamps[tgt]),
        target_ids=torch.from_numpy(seqs.items[tgt]),
        target_positive=torch.from_numpy(seqs.positive[tgt]),
        rank_mask=torch.from_numpy(rank_mask),
        feedback_mask=torch.from_numpy(feedback_mask),
        lengths=lengths,
        offsets=offsets_of(lengths),
    )
    if with_seen:
        ranked = ex.rank_at >= 0
        hist_from, rank_at = ex.history_from[ranked], ex.rank_at[ranked]
        seen_idx = _ranges(hist_from, rank_at)
        # rows are numbered among the batch's *ranked* windows: the order of h[rank_mask]
        batch.seen_rows = torch.from_numpy(np.repeat(np.arange(len(rank_at)), rank_at - hist_from))
        batch.seen_items = torch.from_numpy(seqs.items[seen_idx])
    if older_events is not None:
        first, stop = older_prefix(seqs, ex.start, older_events)
        old_idx = _ranges(first, stop)  # [M] absolute index of each older event
        old_len = torch.from_numpy((stop - first).astype(np.int64))
        batch.older = jagged_features(torch.from_numpy(seqs.items[old_idx]), torch.from_numpy(seqs.event_types[old_idx]), old_len)
        batch.older_timestamps = torch.from_numpy(seqs.timestamps[old_idx])
    return batch


def iterate_batches(
    seqs: UserSequences,
    ex: Examples,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    with_seen: bool = False,
    bucket_by_length: bool = False,
    pool_batches: int = 16,
    older_events: int | None = None,
) -> Iterator[Batch]:
    """Batches of ``ex``. ``bucket_by_length``: sort windows by length within pools of ``pool_batches``
    batches and shuffle the batch order, so that similar-length histories share a batch and the padded
    [B, n, n] attention wastes little work on padding (about 2-3x faster on MovieLens; same data per epoch)."""
    for rows in batch_rows(ex, batch_size, shuffle=shuffle, generator=generator, bucket_by_length=bucket_by_length,
                           pool_batches=pool_batches):
        yield make_batch(seqs, ex.subset(rows), with_seen=with_seen, older_events=older_events)


def batch_rows(
    ex: Examples,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    bucket_by_length: bool = False,
    pool_batches: int = 16,
) -> list[np.ndarray]:
    """The row numbers of each batch ``iterate_batches`` yields, in order (the distributed trainer splits
    each of these global batches across its ranks)."""
    order = torch.randperm(len(ex), generator=generator).numpy() if shuffle else np.arange(len(ex))
    batches = [order[lo : lo + batch_size] for lo in range(0, len(ex), batch_size)]
    if bucket_by_length and len(ex):
        n_inputs = ex.end - ex.start
        pool = batch_size * pool_batches
        order = np.concatenate(
            [c[np.argsort(n_inputs[c], kind="stable")] for c in (order[lo : lo + pool] for lo in range(0, len(order), pool))]
        )
        batches = [order[lo : lo + batch_size] for lo in range(0, len(ex), batch_size)]
        if shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def batch_from_histories(
    items: Sequence[np.ndarray],
    event_types: Sequence[np.ndarray],
    timestamps_s: Sequence[np.ndarray],
    query_timestamps_s: Sequence[int],
) -> Batch:
    """Serving: one jagged batch from already-encoded histories (dense item idx, event codes, seconds).

    Position i's query time is the time of event i + 1; the last position's is the request time.
    """
    lengths = torch.tensor([len(x) for x in items], dtype=torch.int64)
    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64)) if len(xs) else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    ts = [np.asarray(t, np.int64) for t in timestamps_s]
    query = [np.r_[t[1:], np.int64(q)] for t, q in zip(ts, query_timestamps_s)]
    n = int(lengths.sum())
    return Batch(
        features=jagged_features(cat(items), cat(event_types), lengths),
        timestamps=cat(ts),
        query_timestamps=cat(query),
        target_ids=torch.zeros(n, dtype=torch.int64),
        target_positive=torch.zeros(n, dtype=torch.bool),
        rank_mask=torch.zeros(n, dtype=torch.bool),
        feedback_mask=torch.zeros(n, dtype=torch.bool),
        lengths=lengths,
        offsets=offsets_of(lengths),
    )
