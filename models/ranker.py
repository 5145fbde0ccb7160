"""What the rankers share: features -> units, a DLRM baseline, the multi-task loss, training and evaluation.

A ranker scores the candidates of one request. Each example (``models.ranking_data``) becomes a set of
*units*, vectors of width d that the backbone lets interact:

    units = [ dense_1 .. dense_m | item | history | user (| user attrs | item attrs) ]   # [B, m + 3 (+ 2), d]

    item     = E_item[candidate item]                                   # sparse, one id
    history  = mean_{j in last L items before t} E_item[j]              # the same table, mean-pooled bag
                                                        # (``cfg.history = "engaged"``: last L engaged items)
    user     = E_user[user_id mod U]                                    # hashed: new users share rows
    dense    = reshape( MLP( standardise(f) ), (m, d) )                 # the "bottom MLP"
    f        = [ log1p(history length), log1p(seconds since the user's last event),
                 log1p(events of the item before t), rank in the slate (-1: sampled) ]
    user attrs = mean_{a in gender, age group, occupation} E_attr[hash(a)]       # ``cfg.attributes`` only
    item attrs = mean_{a in genres, album} E_attr[hash(a)]
    item vec    = P V[candidate item]                                 # ``cfg.item_vectors`` only: V frozen,
    history vec = P mean_{j in last L items before t} V[j]            # P [d, p] learned

The vector units (``RankerConfig.item_vectors``) read a frozen table V [items, p] of pre-trained item
embeddings, a retriever's (``ItemVectors.of_recommender``), through one learned projection P. Why: the id
tables learn an item only from the slates it was shown in, and that is too little to learn what the items
*are*; the retriever has read every play, so its table carries what the items are. On the simulator, rankers
with id tables and every event in the history bag scored below a scorer that knows nothing about the user
(engaged AUC 0.76 against 0.78); a retriever's vectors and the engaged history (``cfg.history``) lifted them to
0.82 (docs/journal/2026-12-07-what-the-rankers-miss.md). An item the table does not know gets the zero vector.

The attribute units (``RankerConfig.attributes``) read the example columns ``models.ranking_data.with_attributes``
adds: user demographics and item genres as of t (Feast ``get_historical_features`` on platform data, the
dataset's files in the benches). Each value is hashed as ``field=value`` into one shared table, so no vocabulary
travels with the model and a value first seen at serving time still gets a (shared) row; an unknown value is
left out of its bag, and an empty bag is the zero vector.

Every input is point-in-time: the history is ``events[hist_start:hist_end]`` (strictly before t) and the
item's popularity counts only events strictly before t, never the request's own reactions. Served, the same
function computes them from the served histories, with the item counts frozen at training time and the history
length capped at what the online store keeps (``RankerConfig.max_history``): ``models.served_ranker``. The item and
history share one table so that "the candidate resembles what the user just played" is a dot product the
interaction layers can see. The rank is a position feature (the logged slate's position bias); a server
scoring unranked candidates sets it to one fixed value.

Backbones map units to one logit per task: ``models.wukong.Wukong`` or ``DLRM`` below. The loss is the mean
over tasks of the binary cross-entropy of each label (like, skip, engaged, ...).

Evaluation: per task, AUC over all test examples and GAUC, the AUC within each request averaged with weights
= the request's example count, over the requests that have both classes (a request with only negatives says
nothing about the order inside it). Two scorers computed from data alone give the floor: ``popularity``
(the item's event count before t) and ``random``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from features.events import POSITIVE_TYPES
from models.ranking_data import RankingExamples, count_before, task_labels, validation_rows
from models.wukong import Wukong, WukongConfig, mlp

SPARSE_KEYS: tuple[str, ...] = ("item_id", "history", "user_id")
ATTRIBUTE_KEYS: tuple[str, ...] = ("user_attributes", "item_attributes")
VECTOR_UNITS: tuple[str, ...] = ("item_vector", "history_vector")
HISTORIES: tuple[str, ...] = ("all", "engaged")
USER_ATTRIBUTES: tuple[str, ...] = ("gender", "age", "occupation")
ITEM_ATTRIBUTES: tuple[str, ...] = ("genres", "album")
DENSE_FEATURES: tuple[str, ...] = ("log_history_length", "log_seconds_since_last", "log_item_popularity", "rank")
BACKBONES: tuple[str, ...] = ("wukong", "dlrm")


@dataclass
class RankerConfig:
    """Feature encoder + backbone sizes. The Wukong fields are ignored by ``dlrm``."""

    backbone: str = "wukong"
    dim: int = 16  # d
    item_buckets: int = 1024  # item ids are taken modulo this
    user_buckets: int = 1024
    history_len: int = 20  # L
    dense_units: int = 2  # m
    layers: int = 2
    fmb_units: int = 4
    lcb_units: int = 4
    fmb_rank: int | None = 4
    mlp_hidden: int = 64
    dropout: float = 0.0
    attributes: bool = False  # user and item attribute units (the examples must carry them)
    attribute_buckets: int = 1024  # hashed attribute values share this many rows
    # The history-length feature counts at most this many events (None: all). A served history holds only the
    # online store's last ``ingest.history_length`` events, so the platform's rankers set that cap: training
    # then counts what serving can see (``models.served_ranker``).
    max_history: int | None = None
    # "engaged": the history bag is the user's last L engaged events (listens, likes, ...), not the last L events
    # of any kind. Why: a logged slate adds every examined item to the history, skips included, so after a few
    # slates the last L events are mostly what the user was shown and turned down, not what they like.
    history: str = "all"
    # Frozen pre-trained item vectors as two more units (candidate, history mean), through a learned projection.
    # ``item_vectors`` asks for them; ``train_ranker`` sets the table's shape from the ``ItemVectors`` it is given
    # (``vector_items`` rows, ``vector_dim`` wide), so that a saved config rebuilds the table to load into.
    item_vectors: bool = False
    vector_items: int = 0
    vector_dim: int = 0

    def __post_init__(self) -> None:
        if self.history not in HISTORIES:
            raise ValueError(f"RankerConfig.history must be one of {HISTORIES}, got {self.history!r}")

    @property
    def sparse_keys(self) -> tuple[str, ...]:
        return SPARSE_KEYS + (ATTRIBUTE_KEYS if self.attributes else ())

    @property
    def num_units(self) -> int:
        return self.dense_units + len(self.sparse_keys) + (len(VECTOR_UNITS) if self.item_vectors else 0)


@dataclass(frozen=True)
class ItemVectors:
    """Pre-trained item embeddings for the vector units: ``vectors[i]`` [p] is item ``ids[i]`` (raw ids, unique)."""

    ids: np.ndarray  # [V] int64
    vectors: np.ndarray  # [V, p] float32
    source: str = ""  # where they came from (e.g. "retriever v3"), for the run's record

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.ids) != len(self.vectors) or not len(self.ids):
            raise ValueError(f"ItemVectors: {len(self.ids)} ids for vectors of shape {self.vectors.shape}: expected "
                             "one non-empty [V, p] row per id")
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("ItemVectors: ids must be unique")

    @classmethod
    def of_recommender(cls, recommender, source: str = "") -> ItemVectors:  # noqa: ANN001 - a Recommender
        """A retriever's (``models.recommender.Recommender``) normalised item embeddings, the rows its scores are
        dot products with."""
        matrix = recommender.item_matrix[1:].detach().float().numpy()  # row 0 is padding
        return cls(np.asarray(recommender.vocab.raw_ids, np.int64), matrix.astype(np.float32), source)


def with_vector_shape(cfg, item_vectors: ItemVectors | None):  # noqa: ANN001, ANN201 - RankerConfig | HSTURankerConfig
    """``cfg`` with its frozen table's shape set from ``item_vectors``; refuses vectors a config does not ask for,
    and a config that asks for vectors without them."""
    name = type(cfg).__name__
    if cfg.item_vectors != (item_vectors is not None):
        raise ValueError(f"{name}.item_vectors is on but no ItemVectors were given (a retriever's: "
                         "ItemVectors.of_recommender)" if cfg.item_vectors else
                         f"ItemVectors were given but {name}.item_vectors is off")
    if item_vectors is None:
        return cfg
    return replace(cfg, vector_items=len(item_vectors.ids), vector_dim=item_vectors.vectors.shape[1])


class FrozenItemVectors(nn.Module):
    """``ItemVectors`` inside a model: raw item ids -> their frozen vectors [..., p] (zeros for an item the table
    does not know). Buffers, not parameters: saved with the model's state, never trained. Built empty at the
    table's shape (what a saved config records) and filled by ``fill``; Wukong / DLRM (``FeatureEncoder``) and
    the HSTU ranker read their item vectors through it."""

    ids: torch.Tensor
    vectors: torch.Tensor

    def __init__(self, items: int, dim: int):
        super().__init__()
        if items < 1 or dim < 1:
            raise ValueError(f"item_vectors is on but the table's shape is unset ({items} x {dim}): training sets "
                             "it from the ItemVectors it is given")
        self.register_buffer("ids", torch.zeros(items, dtype=torch.int64))  # sorted raw ids
        self.register_buffer("vectors", torch.zeros(items + 1, dim))  # row 0: "unknown", zeros

    @torch.no_grad()
    def fill(self, item_vectors: ItemVectors) -> None:
        """Copy the table in, sorted by raw id so that a lookup is one ``searchsorted``."""
        order = np.argsort(item_vectors.ids, kind="stable")
        self.ids.copy_(torch.from_numpy(item_vectors.ids[order]))
        self.vectors[0].zero_()
        self.vectors[1:].copy_(torch.from_numpy(item_vectors.vectors[order]))

    def rows(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw item ids [...] -> rows of ``vectors`` (0: an item the table does not know)."""
        ids = ids if isinstance(ids, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(ids, np.int64))
        pos = torch.searchsorted(self.ids, ids.contiguous()).clamp_max(len(self.ids) - 1)
        return torch.where(self.ids[pos] == ids, pos + 1, torch.zeros_like(pos))

    def forward(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.vectors[self.rows(ids)]  # [..., p]


# ----------------------------------------------------------------------------------------------------------
# Features (numpy, point-in-time, computed once per example set)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RankingFeatures:
    """Model inputs of N examples: ids, the last-L history (left-aligned, padded), raw dense features."""

    item: np.ndarray  # [N] int64
    user: np.ndarray  # [N] int64
    history: np.ndarray  # [N, L] int64, the most recent L items before t, oldest first, left-padded
    history_mask: np.ndarray  # [N, L] bool
    dense: np.ndarray  # [N, len(DENSE_FEATURES)] float32
    # key -> (values, lengths): the hashed attribute bags of each example (``attribute_bags``); None: off
    attributes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.item)


def hash_values(field: str, values: Sequence[object], buckets: int) -> np.ndarray:
    """Stable hashes of ``field=value`` into [1, buckets) (CRC-32: the same in every process, unlike hash()).
    Row 0 is never used by a value: it stays free for padding."""
    return np.asarray([1 + zlib.crc32(f"{field}={v}".encode()) % (buckets - 1) for v in values], np.int64)


def _known(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and value != ""


def attribute_bags(frame: pd.DataFrame, fields: Sequence[str], buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths [N]) of one bag per row: the hashed known values of ``fields`` (a list column, e.g.
    genres, contributes each element). Hashing runs once per distinct value, not once per row."""
    per_row: list[list[int]] = [[] for _ in range(len(frame))]
    for field in fields:
        column = frame[field].to_list()
        if field == "age":  # an int, or a float after a join through missing values: one spelling, "25"
            column = [int(v) if _known(v) else None for v in column]
        flat = [(r, v) for r, value in enumerate(column)
                for v in (value if isinstance(value, (list, tuple, np.ndarray)) else [value]) if _known(v)]
        if not flat:
            continue
        distinct = sorted({str(v) for _, v in flat})
        codes = dict(zip(distinct, hash_values(field, distinct, buckets).tolist()))
        for r, v in flat:
            per_row[r].append(codes[str(v)])
    lengths = np.asarray([len(b) for b in per_row], np.int64)
    values = np.fromiter((v for b in per_row for v in b), np.int64, count=int(lengths.sum()))
    return values, lengths


def example_attribute_bags(examples: RankingExamples, buckets: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The user-attribute and item-attribute bags of every example (``ATTRIBUTE_KEYS``)."""
    ex = examples.examples
    missing = [c for c in USER_ATTRIBUTES + ITEM_ATTRIBUTES if c not in ex]
    if missing:
        raise ValueError(f"the examples carry no attributes {missing}: add them with "
                         "models.ranking_data.with_attributes (or turn RankerConfig.attributes off)")
    return {"user_attributes": attribute_bags(ex, USER_ATTRIBUTES, buckets),
            "item_attributes": attribute_bags(ex, ITEM_ATTRIBUTES, buckets)}


def rows_of_bags(values: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bags of ``rows`` (a batch) out of flat (values, lengths)."""
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    n = lengths[rows]
    idx = np.repeat(starts[rows] - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(int(n.sum()))
    return values[idx], n


def item_popularity_before(examples: RankingExamples) -> np.ndarray:
    """[N] events of each example's item with timestamp strictly before its t, all users, own request excluded.

    One sort of the events by (item, time) answers every example: the count of events sorting before
    (item, t) minus those before (item, -inf). A reaction of the example's own request stamped before t (clock
    skew) is subtracted too, so the label never leaks into the feature."""
    ev, ex = examples.events, examples.examples
    ev_item = ev["item_id"].to_numpy(np.int64)
    ev_ts = ev["timestamp_ms"].to_numpy(np.int64)
    order = np.lexsort((ev_ts, ev_item))
    item = ex["item_id"].to_numpy(np.int64)
    t = ex["t_ms"].to_numpy(np.int64)
    before_t = count_before(ev_item[order], ev_ts[order], item, t)
    before_all = count_before(ev_item[order], ev_ts[order], item, np.full(len(item), np.iinfo(np.int64).min))
    count = before_t - before_all
    own = ev[ev["request_id"].notna()][["request_id", "item_id", "timestamp_ms"]]
    keyed = ex[["request_id", "item_id", "t_ms"]].reset_index().dropna(subset=["request_id"])
    hits = keyed.merge(own, on=["request_id", "item_id"])
    hits = hits[hits["timestamp_ms"] < hits["t_ms"]]
    return count - np.bincount(hits["index"].to_numpy(np.int64), minlength=len(ex))


def ranking_features(examples: RankingExamples, history_len: int, attribute_buckets: int | None = None, *,
                     popularity: np.ndarray | None = None, max_history: int | None = None,
                     engaged_history: bool = False) -> RankingFeatures:
    """Vectorised features of every example (no per-example Python loop); ``attribute_buckets``: also the
    hashed attribute bags (the examples must carry the attribute columns).

    ``popularity`` [N]: the item's event count to use instead of ``item_popularity_before`` (a server knows
    only its own users' histories, not every user's events: ``models.served_ranker`` passes counts frozen at
    training time); ``max_history``: cap of the history-length feature (``RankerConfig.max_history``);
    ``engaged_history``: the history bag holds the last L *engaged* events (``POSITIVE_TYPES``, the ``engaged``
    label's types) among the last
    ``max_history`` events (all, without a cap), not the last L events of any type (``RankerConfig.history``)."""
    ex = examples.examples
    start, end = examples.hist_start, examples.hist_end
    ev_item = examples.events["item_id"].to_numpy(np.int64)
    ev_ts = examples.events["timestamp_ms"].to_numpy(np.int64)
    if not len(ev_item):  # no events at all: every history is empty
        ev_item, ev_ts = np.zeros(1, np.int64), np.zeros(1, np.int64)
    if engaged_history:
        # The last L engaged events: the same gather over the engaged events' positions. cum[e] counts the
        # engaged events before position e, so an example's engaged history is engaged[cum[start]:cum[end]].
        # With ``max_history``, only among the last max_history events: all that a served history holds.
        is_engaged = examples.events["event_type"].astype(str).isin(POSITIVE_TYPES).to_numpy()
        engaged = np.flatnonzero(is_engaged)
        cum = np.concatenate([[0], np.cumsum(is_engaged)])
        first = start if max_history is None else np.maximum(start, end - max_history)
        j = cum[end][:, None] - history_len + np.arange(history_len)  # [N, L]
        mask = j >= cum[first][:, None]
        history = np.where(mask, ev_item[engaged[j.clip(0, max(len(engaged) - 1, 0))]] if len(engaged) else 0, 0)
    else:
        idx = end[:, None] - history_len + np.arange(history_len)  # [N, L]: the last L positions before end
        mask = idx >= start[:, None]
        history = np.where(mask, ev_item[idx.clip(0, len(ev_item) - 1)], 0)

    t = ex["t_ms"].to_numpy(np.int64)
    length = end - start
    counted = np.minimum(length, max_history) if max_history is not None else length
    last_ts = ev_ts[(end - 1).clip(0, len(ev_ts) - 1)]
    since = np.where(length > 0, (t - last_ts) / 1000.0, 0.0).clip(0)  # no history: 0 (its length says so)
    dense = np.stack(
        [np.log1p(counted), np.log1p(since),
         np.log1p(item_popularity_before(examples) if popularity is None else np.asarray(popularity, np.float64)),
         ex["rank"].to_numpy()],
        axis=1,
    ).astype(np.float32)
    return RankingFeatures(
        item=ex["item_id"].to_numpy(np.int64), user=ex["user_id"].to_numpy(np.int64),
        history=history.astype(np.int64), history_mask=mask, dense=dense,
        attributes=example_attribute_bags(examples, attribute_buckets) if attribute_buckets else None,
    )


def config_features(cfg: RankerConfig, examples: RankingExamples, *,
                    popularity: np.ndarray | None = None) -> RankingFeatures:
    """``ranking_features`` as ``cfg`` reads them (history length and kind, attributes, the length cap): the one
    mapping from a config to its features, for training and for prediction."""
    return ranking_features(examples, cfg.history_len, cfg.attribute_buckets if cfg.attributes else None,
                            popularity=popularity, max_history=cfg.max_history,
                            engaged_history=cfg.history == "engaged")


# ----------------------------------------------------------------------------------------------------------
# Encoder, DLRM, Ranker
# ----------------------------------------------------------------------------------------------------------


class FeatureEncoder(nn.Module):
    """RankingFeatures rows -> units [B, m + 3 (+ 2) (+ 2), d]: dense units first, then item, history, user (then the
    attribute units, then the vector units)."""

    dense_mean: torch.Tensor
    dense_std: torch.Tensor

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name="item", num_embeddings=cfg.item_buckets, embedding_dim=cfg.dim,
                                   feature_names=["item_id", "history"], pooling=PoolingType.MEAN),
                EmbeddingBagConfig(name="user", num_embeddings=cfg.user_buckets, embedding_dim=cfg.dim,
                                   feature_names=["user_id"], pooling=PoolingType.MEAN),
                *([EmbeddingBagConfig(name="attribute", num_embeddings=cfg.attribute_buckets, embedding_dim=cfg.dim,
                                      feature_names=list(ATTRIBUTE_KEYS), pooling=PoolingType.MEAN)]
                  if cfg.attributes else []),
            ],
            device=torch.device("cpu"),
        )
        n_dense = len(DENSE_FEATURES)
        # Train-set statistics, set by train_ranker: the raw features differ in scale by orders of magnitude.
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        self.bottom = mlp([n_dense, cfg.mlp_hidden, cfg.dense_units * cfg.dim], cfg.dropout)
        if cfg.item_vectors:
            self.vectors = FrozenItemVectors(cfg.vector_items, cfg.vector_dim)  # V
            self.project = nn.Linear(cfg.vector_dim, cfg.dim, bias=False)  # P

    def vector_units(self, f: RankingFeatures, rows: np.ndarray) -> torch.Tensor:
        """[B, 2, d]: P V[candidate] and P mean(V[history]) (an empty history: zeros)."""
        item = self.vectors(f.item[rows])  # [B, p]
        mask = torch.from_numpy(f.history_mask[rows]).unsqueeze(-1)  # [B, L, 1]
        history = (self.vectors(f.history[rows]) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.project(torch.stack([item, history], dim=1))  # [B, 2, d]

    def sparse(self, f: RankingFeatures, rows: np.ndarray) -> KeyedJaggedTensor:
        """One KJT: a one-id bag per candidate item and per user, a variable bag per history."""
        c = self.cfg
        mask = f.history_mask[rows]
        history = f.history[rows][mask] % c.item_buckets  # row-major: each row's valid items, in order
        values = [f.item[rows] % c.item_buckets, history, f.user[rows] % c.user_buckets]
        ones = np.ones(len(rows), np.int64)
        lengths = [ones, mask.sum(1), ones]
        if c.attributes:
            if f.attributes is None:
                raise ValueError("RankerConfig.attributes is on but the features carry no attribute bags")
            for key in ATTRIBUTE_KEYS:
                v, n = rows_of_bags(*f.attributes[key], rows)
                values.append(v)
                lengths.append(n)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(c.sparse_keys), values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )

    def forward(self, f: RankingFeatures, rows: np.ndarray) -> torch.Tensor:
        B, d = len(rows), self.cfg.dim
        pooled = self.embeddings(self.sparse(f, rows)).to_dict()  # key -> [B, d]; an empty history is zeros
        sparse = torch.stack([pooled[k] for k in self.cfg.sparse_keys], dim=1)  # [B, 3 (+ 2), d]
        dense = (torch.from_numpy(f.dense[rows]) - self.dense_mean) / self.dense_std  # [B, 4]
        dense = self.bottom(dense).view(B, self.cfg.dense_units, d)  # [B, m, d]
        units = [dense, sparse] + ([self.vector_units(f, rows)] if self.cfg.item_vectors else [])
        return torch.cat(units, dim=1)  # [B, m + 3 (+ 2) (+ 2), d]


class DLRM(nn.Module):
    """DLRM (Naumov et al., 2019): pairwise dot products of the units + the dense units -> top MLP.

        z = [ flatten(dense units) | <x_i, x_j> for i < j ]      # [B, m d + n (n - 1) / 2]
        logits = MLP_top(z)                                      # [B, num_tasks]

    The bottom MLP (dense features -> dense units) lives in the shared FeatureEncoder."""

    pairs_i: torch.Tensor
    pairs_j: torch.Tensor

    def __init__(self, num_units: int, dense_units: int, dim: int, hidden: int, num_tasks: int, dropout: float = 0.0):
        super().__init__()
        self.dense_units = dense_units
        i, j = torch.triu_indices(num_units, num_units, offset=1)
        self.register_buffer("pairs_i", i, persistent=False)
        self.register_buffer("pairs_j", j, persistent=False)
        width = dense_units * dim + len(i)
        self.top = mlp([width, hidden, hidden, num_tasks], dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dots = (x @ x.transpose(1, 2))[:, self.pairs_i, self.pairs_j]  # [B, n (n - 1) / 2]
        z = torch.cat([x[:, : self.dense_units].flatten(1), dots], dim=1)
        return self.top(z)  # [B, num_tasks]


def build_backbone(cfg: RankerConfig, num_tasks: int) -> nn.Module:
    if cfg.backbone == "wukong":
        return Wukong(WukongConfig(
            dim=cfg.dim, num_units=cfg.num_units, layers=cfg.layers, fmb_units=cfg.fmb_units,
            lcb_units=cfg.lcb_units, fmb_rank=cfg.fmb_rank, mlp_hidden=cfg.mlp_hidden, dropout=cfg.dropout,
            num_tasks=num_tasks,
        ))
    if cfg.backbone == "dlrm":
        return DLRM(cfg.num_units, cfg.dense_units, cfg.dim, cfg.mlp_hidden, num_tasks, cfg.dropout)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {cfg.backbone!r}")


class Ranker(nn.Module):
    """Encoder + backbone + multi-task BCE: one logit per task (``tasks`` names the label columns)."""

    def __init__(self, cfg: RankerConfig, tasks: Sequence[str]):
        super().__init__()
        self.cfg = cfg
        self.tasks = tuple(tasks)
        self.encoder = FeatureEncoder(cfg)
        self.backbone = build_backbone(cfg, len(self.tasks))
        self.train_losses: list[float] = []  # mean loss of each epoch, filled by train_ranker
        self.valid_curve: list[float] = []  # validation AUC of each epoch (train_ranker's valid_share > 0)
        self.chosen_epoch: int | None = None  # the epoch whose weights were kept (None: the last, no validation)

    def forward(self, f: RankingFeatures, rows: np.ndarray) -> torch.Tensor:
        return self.backbone(self.encoder(f, rows))  # [B, num_tasks]


    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over tasks and examples of BCE(logit, label); labels [B, num_tasks] in {0, 1}."""
        return F.binary_cross_entropy_with_logits(logits, labels)

    @torch.no_grad()
    def predict(self, examples: RankingExamples, batch_size: int = 4096, *,
                popularity: np.ndarray | None = None) -> np.ndarray:
        """[N, num_tasks] probabilities; ``popularity``: see ``ranking_features`` (None: the examples' own)."""
        self.eval()
        f = config_features(self.cfg, examples, popularity=popularity)
        out = [torch.sigmoid(self(f, np.arange(begin, min(begin + batch_size, len(f))))).numpy()
               for begin in range(0, len(f), batch_size)]
        return np.concatenate(out) if out else np.empty((0, len(self.tasks)), np.float32)


def train_ranker(
    examples_train: RankingExamples,
    cfg: RankerConfig,
    tasks: Sequence[str] = ("engaged", "like", "skip"),
    *,
    epochs: int = 5,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    valid_share: float = 0.0,
    item_vectors: ItemVectors | None = None,
) -> Ranker:
    """Adam on the multi-task BCE, shuffled mini-batches, deterministic given ``seed``.

    ``item_vectors``: the frozen table of a config with ``item_vectors`` on (required there, refused elsewhere).

    ``valid_share`` > 0: the last share of the examples by time (``validation_rows``, ARGUS fine-tuning's rule)
    is held out, the model trains on the rest for up to ``epochs`` epochs, and the weights of the epoch with the
    best validation AUC on the first task are kept (``valid_curve``, ``chosen_epoch``). Why: a ranker with hashed
    user and item ids memorises its training slates, and a fixed epoch count overfits a larger model sooner
    than a smaller one, which would make a size sweep measure the epoch count rather than the size."""
    cfg = with_vector_shape(cfg, item_vectors)
    torch.manual_seed(seed)
    ranker = Ranker(cfg, tasks)
    if item_vectors is not None:
        ranker.encoder.vectors.fill(item_vectors)
    f = config_features(cfg, examples_train)
    labels = torch.from_numpy(task_labels(examples_train, tasks))
    fit, valid = validation_rows(examples_train, np.arange(len(f)), valid_share)
    with torch.no_grad():
        ranker.encoder.dense_mean.copy_(torch.from_numpy(f.dense[fit].mean(0)))
        ranker.encoder.dense_std.copy_(torch.from_numpy(f.dense[fit].std(0)).clamp_min(1e-3))
    opt = torch.optim.Adam(ranker.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    best = BestEpoch()
    for epoch in range(1, epochs + 1):
        ranker.train()
        total, seen = 0.0, 0
        order = fit[rng.permutation(len(fit))]
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            loss = ranker.loss(ranker(f, rows), labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(rows), seen + len(rows)
        ranker.train_losses.append(total / max(seen, 1))
        if len(valid):
            best.record(ranker, epoch, auc(labels[valid, 0].numpy(), _scores(ranker, f, valid)[:, 0]))
    best.restore(ranker)
    return ranker


class BestEpoch:
    """Keeps the weights of the epoch with the best validation score (the first of equal epochs; an undefined
    score, NaN, never wins) and puts them back into the model at the end: the rankers' epoch choice
    (``train_ranker``, ``models.hstu_ranker.train_hstu_ranker``). ``restore`` sets the model's ``valid_curve``
    (every epoch's score) and ``chosen_epoch`` (None when nothing was recorded: the last epoch's weights stay)."""

    def __init__(self) -> None:
        self.curve: list[float] = []
        self.epoch: int | None = None
        self._score = -math.inf
        self._state: dict[str, torch.Tensor] | None = None

    def record(self, model: nn.Module, epoch: int, score: float) -> None:
        self.curve.append(score)
        if self._state is None or (not math.isnan(score) and score > self._score):
            self._score = -math.inf if math.isnan(score) else score
            self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.epoch = epoch

    def restore(self, model: nn.Module) -> None:
        if self._state is not None:
            model.load_state_dict(self._state)
        model.valid_curve, model.chosen_epoch = list(self.curve), self.epoch


@torch.no_grad()
def _scores(ranker: Ranker, f: RankingFeatures, rows: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """[len(rows), num_tasks] probabilities of feature rows ``rows`` (eval mode, then back to train mode)."""
    ranker.eval()
    out = [torch.sigmoid(ranker(f, rows[b : b + batch_size])).numpy() for b in range(0, len(rows), batch_size)]
    ranker.train()
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (undefined, not 0.5)."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """AUC per group (request), averaged with weights = group size, over groups with both classes.

    Vectorised as Mann–Whitney within each group: AUC_g = (Σ ranks of the positives − P(P+1)/2) / (P·N), with
    ties at their average rank, which is what ``roc_auc_score`` gives per group, without a loop over groups."""
    frame = pd.DataFrame({"y": np.asarray(labels, dtype=np.float64), "s": np.asarray(scores, dtype=np.float64),
                          "g": np.asarray(groups)})
    frame["rp"] = frame.groupby("g", sort=False)["s"].rank(method="average") * frame["y"]
    per = frame.groupby("g", sort=False).agg(n=("y", "size"), pos=("y", "sum"), rp=("rp", "sum"))
    neg = per["n"] - per["pos"]
    both = (per["pos"] > 0) & (neg > 0)
    if not both.any():
        return float("nan")
    per, neg = per[both], neg[both]
    value = (per["rp"] - per["pos"] * (per["pos"] + 1) / 2) / (per["pos"] * neg)
    return float((value * per["n"]).sum() / per["n"].sum())


def task_metrics(examples: RankingExamples, scores: np.ndarray, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """scores [N, T] (one column per task) or [N] (one score for every task)."""
    labels = task_labels(examples, tasks)
    groups = examples.examples["request_id"].astype(str).to_numpy()
    out = {}
    for k, task in enumerate(tasks):
        s = scores[:, k] if scores.ndim == 2 else scores
        out[task] = {"auc": auc(labels[:, k], s), "gauc": gauc(labels[:, k], s, groups)}
    return out


def evaluate_ranker(
    ranker: Ranker, examples_test: RankingExamples, seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """{scorer: {task: {"auc", "gauc"}}} for the ranker (``"model"``), ``"popularity"`` and ``"random"``."""
    tasks = ranker.tasks
    n = len(examples_test)
    return {
        "model": task_metrics(examples_test, ranker.predict(examples_test), tasks),
        "popularity": task_metrics(examples_test, item_popularity_before(examples_test).astype(np.float64), tasks),
        "random": task_metrics(examples_test, np.random.default_rng(seed).random(n), tasks),
    }
