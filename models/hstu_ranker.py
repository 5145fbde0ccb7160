"""HSTU as a target-aware ranker (Zhai et al., 2024, section 2.2) with M-FALCON batched candidate scoring.

The sequence
------------
A request has a history of E events (item, action, time), the request time t and m candidates. Each event
contributes two tokens, its item then its action (listen / like / skip / dislike ..., the event type), and each
candidate one item token placed after the history:

    history   = [ Φ_0, a_0, Φ_1, a_1, ..., Φ_{E-1}, a_{E-1} ]           # n = 2E tokens, oldest first
    candidate =   Φ_c (+ its slate rank)                              # at position n, one per candidate

    x(Φ_j) = sqrt(D) E_item[item_j mod item_buckets]                  # history and candidates share the table
    x(a_j) = sqrt(D) E_action[event type code of j]
    x(Φ_c) = sqrt(D) (E_item[c mod item_buckets] + E_rank[rank + 1])  # rank -1 (not in a slate): row 0

With ``item_vectors`` every item token (history and candidate) also gets ``P V[item]``: a frozen table of a
retriever's item embeddings through a learned projection, as Wukong's vector units (``models.ranker``).

Why interleave: an action token sits right after its item, so the stack can read "liked *this*" or "skipped
*this*" at relative offset 1, and a candidate's query can match a history item (the same table) *and* the
reaction that followed it. This is the paper's ranking setup: the candidate is the target of a "what will the
user do next" query over an item/action sequence (it reads items *and* feedback, which the retrieval model's
item-only sequences cannot).

The stack is ``models.hstu``'s: the same ``HSTUBlock`` weights and math (pointwise SiLU attention divided by
``max_len = 2 E_max + 1``, relative position + time bias, U gating; see that module). Relative bias here:

    rab(i, j) = w_pos[i - j] + w_time[bucket(t - time_j)]             # time measured from the request time t

(both tokens of an event carry its time; a candidate carries t, so its gap to itself is 0). The attention mask:
history token i attends to history tokens j <= i (causal); a candidate attends to every history token and to
itself, never to another candidate. Multi-task heads read the candidate's last hidden state:

    logits_c = MLP(LayerNorm(h_L(Φ_c)))                              # [T], one per task (like, skip, engaged ...)

M-FALCON (the paper's microbatched, fast attention leveraging cacheable operations)
----------------------------------------------------------------------------------
Nothing in the history depends on the candidates (causal, and candidates come last), so the history's hidden
states, and in particular each block's K and V of the history, are the same for every candidate. Hence:

1. ``encode_history``: one causal pass over the n history tokens; keep per block l its K_l [n, h, d_qk] and
   V_l [n, h, d_v] (the last block's history outputs are never read, only its K, V).
2. ``encode_candidates``: push all m candidates through the blocks as one batch; in block l candidate c
   attends to the cached (K_l, V_l) plus its own (k_c, v_c):

       A_c = SiLU(q_c K_l^T + rab(n, ·)) / max_len  ·  key mask        # [h, n]
       out_c = A_c V_l + SiLU(q_c · k_c + rab(n, n)) / max_len · v_c    # [h, d_v]

   which is exactly what a full causal forward over [history, c] computes at position n.

Cost for n history tokens and m candidates: O(n^2 + m n) attention and O(n + m) projections, against
O(m n^2) and O(m n) for m single-candidate forwards (``score_naive``, the reference ``bench/mfalcon.py``
times against). ``score_mfalcon`` equals ``score_naive`` to float32 rounding (tests/test_hstu_ranker.py).

Training on ``models.ranking_data.RankingExamples``: examples sharing (user, t, history) form one request (a
served slate plus its sampled negatives; a MovieLens rating alone or with the user's same-second ratings);
each mini-batch runs M-FALCON over a set of requests, loss = mean over tasks of the BCE, as in
``models.ranker``. The history is the last ``history_events`` events before t (point-in-time, as built by
``ranking_data``). ``predict`` gives [N, T] probabilities, so ``models.ranker.evaluate_ranker`` scores it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from features.events import EVENT_TYPE_CODES
from models.data import NUM_EVENT_TYPES
from models.hstu import HSTU, BiasLookup, HSTUConfig, bucketize_time_gap
from models.ranker import FrozenItemVectors, ItemVectors, with_vector_shape
from models.ranking_data import RankingExamples, task_labels, validation_rows
from models.wukong import mlp

EMBEDDING_KEYS: tuple[str, ...] = ("history_item", "candidate_item", "action", "rank")


@dataclass
class HSTURankerConfig:
    dim: int = 32  # D
    blocks: int = 2
    heads: int = 2
    attn_dim: int = 16  # d_qk per head
    linear_dim: int = 16  # d_v per head
    history_events: int = 50  # E_max: the last 50 events = 100 tokens
    item_buckets: int = 1024  # item ids are taken modulo this (as models.ranker.RankerConfig)
    max_rank: int = 31  # slate ranks 0..max_rank have their own row, later ones share the last
    head_hidden: int = 64
    dropout: float = 0.0
    num_time_buckets: int = 128
    # Frozen pre-trained item vectors added to every item token through a learned projection (as Wukong's
    # ``models.ranker.RankerConfig.item_vectors``); the shape is set by training from the ItemVectors given.
    item_vectors: bool = False
    vector_items: int = 0
    vector_dim: int = 0

    @property
    def max_len(self) -> int:
        return 2 * self.history_events + 1  # history tokens + the candidate

    def hstu(self) -> HSTUConfig:
        return HSTUConfig(dim=self.dim, blocks=self.blocks, heads=self.heads, attn_dim=self.attn_dim,
                          linear_dim=self.linear_dim, max_len=self.max_len, dropout=self.dropout,
                          num_time_buckets=self.num_time_buckets,
                          # the published block only: M-FALCON (encode_history / encode_candidates) implements its
                          # SiLU attention with relative bias and U gating, not the HSTU ablations
                          rab=True, attention="silu", gating=True)


@dataclass
class RequestBatch:
    """B requests, right-padded: histories in events (each becomes two tokens) and candidates."""

    hist_items: torch.Tensor  # [B, E] int64 raw item ids
    hist_types: torch.Tensor  # [B, E] int64 event type codes (0: padding or unknown)
    hist_s: torch.Tensor  # [B, E] int64 event times, seconds
    hist_len: torch.Tensor  # [B] int64 events of each history (<= E)
    t_s: torch.Tensor  # [B] int64 request time, seconds
    cand_items: torch.Tensor  # [B, M] int64 raw item ids
    cand_ranks: torch.Tensor  # [B, M] int64 slate rank, -1: not in a slate
    cand_mask: torch.Tensor  # [B, M] bool, False: padding


@dataclass
class HistoryCache:
    """What the candidates need of the history, per block: its K and V, plus the shared bias indices."""

    keys: list[torch.Tensor]  # per block [B, n, h, d_qk]
    values: list[torch.Tensor]  # per block [B, n, h, d_v]
    lengths: torch.Tensor  # [B] history tokens (2 x events)
    key_mask: torch.Tensor  # [B, n] bool, token j < length
    time_bucket: torch.Tensor  # [B, n] bucket(t - time of token j)


def event_codes(event_types: Sequence[str] | np.ndarray) -> np.ndarray:
    """Event type names -> codes (``features.events.EVENT_TYPE_CODES``; unknown names -> 0, the padding row)."""
    return pd.Series(np.asarray(event_types, dtype=object)).map(EVENT_TYPE_CODES).fillna(0).to_numpy(np.int64)


def _interleave(items: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """[B, E, ...] x 2 -> [B, 2E, ...]: item_0, action_0, item_1, action_1, ..."""
    B, E = items.shape[:2]
    return torch.stack([items, actions], dim=2).reshape(B, 2 * E, *items.shape[2:])


class HSTURanker(nn.Module):
    """Embeddings + an HSTU stack (``models.hstu.HSTU``) + multi-task heads on the candidate's output."""

    def __init__(self, cfg: HSTURankerConfig, tasks: Sequence[str]):
        super().__init__()
        self.cfg = cfg
        self.tasks = tuple(tasks)
        init = partial(nn.init.trunc_normal_, std=0.02, a=-0.04, b=0.04)  # as models.recommender
        self.embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name="item", num_embeddings=cfg.item_buckets, embedding_dim=cfg.dim,
                                feature_names=["history_item", "candidate_item"], init_fn=init),
                EmbeddingConfig(name="action", num_embeddings=NUM_EVENT_TYPES, embedding_dim=cfg.dim,
                                feature_names=["action"], init_fn=init),
                EmbeddingConfig(name="rank", num_embeddings=cfg.max_rank + 2, embedding_dim=cfg.dim,
                                feature_names=["rank"], init_fn=init),
            ],
            device=torch.device("cpu"),
        )
        if cfg.item_vectors:
            self.vectors = FrozenItemVectors(cfg.vector_items, cfg.vector_dim)  # V
            self.project = nn.Linear(cfg.vector_dim, cfg.dim, bias=False)  # P
        self.hstu = HSTU(cfg.hstu())  # its blocks are the ranker's blocks, whichever path runs them
        self.head = nn.Sequential(nn.LayerNorm(cfg.dim), mlp([cfg.dim, cfg.head_hidden, len(self.tasks)],
                                                              cfg.dropout))
        self.train_losses: list[float] = []  # mean loss of each epoch, filled by train_hstu_ranker
        self.valid_curve: list[float] = []  # validation AUC of each epoch (train_hstu_ranker's valid_share > 0)
        self.chosen_epoch: int | None = None  # the epoch whose weights were kept (None: the last, no validation)

    # ------------------------------------------------------------------------------------------ tokens

    def tokens(self, b: RequestBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(history tokens [B, 2E, D] zero past each length, their times [B, 2E] s, candidate tokens [B, M, D])."""
        c = self.cfg
        B, E = b.hist_items.shape
        M = b.cand_items.shape[1]
        rank_row = torch.where(b.cand_ranks < 0, 0, b.cand_ranks.clamp(max=c.max_rank) + 1)
        values = torch.cat([b.hist_items.reshape(-1) % c.item_buckets, b.cand_items.reshape(-1) % c.item_buckets,
                            b.hist_types.reshape(-1), rank_row.reshape(-1)])
        lengths = torch.cat([torch.full((B,), E), torch.full((B,), M), torch.full((B,), E), torch.full((B,), M)])
        emb = self.embeddings(KeyedJaggedTensor.from_lengths_sync(keys=list(EMBEDDING_KEYS), values=values,
                                                                  lengths=lengths))
        scale = math.sqrt(c.dim)
        item = emb["history_item"].values().view(B, E, c.dim)
        action = emb["action"].values().view(B, E, c.dim)
        cand_item = emb["candidate_item"].values().view(B, M, c.dim)
        if c.item_vectors:  # + P V[item]: what a retriever learnt of the item, beside what the slates teach
            item = item + self.project(self.vectors(b.hist_items))
            cand_item = cand_item + self.project(self.vectors(b.cand_items))
        valid = (torch.arange(E) < b.hist_len[:, None]).to(item.dtype)[..., None]  # [B, E, 1]
        hist = scale * _interleave(item * valid, action * valid)  # [B, 2E, D]
        hist_s = _interleave(b.hist_s, b.hist_s)  # [B, 2E]: both tokens of an event carry its time
        cand = scale * (cand_item + emb["rank"].values().view(B, M, c.dim))  # [B, M, D]
        return hist, hist_s, cand

    # ------------------------------------------------------------------------------------------ M-FALCON

    def encode_history(self, hist: torch.Tensor, hist_s: torch.Tensor, lengths: torch.Tensor,
                       t_s: torch.Tensor) -> HistoryCache:
        """One causal pass over the history tokens [B, n, D]; returns each block's K, V (lengths [B] in tokens)."""
        c = self.cfg
        B, n, _ = hist.shape
        h, dqk, dv, max_len = c.heads, c.attn_dim, c.linear_dim, c.max_len
        if n + 1 > max_len:
            raise ValueError(f"{n} history tokens + the candidate exceed max_len {max_len}")
        pos = torch.arange(n)
        key_mask = pos[None, :] < lengths[:, None]  # [B, n]
        time_bucket = bucketize_time_gap(t_s[:, None] - hist_s, c.num_time_buckets)  # [B, n]
        offset_idx = (pos[:, None] - pos[None, :]).clamp(0, max_len - 1)  # [n, n] i - j
        # Causal with 1/max_len folded in, as HSTU.forward. Right padding: a real query i never sees a padded
        # key j >= length > i; padded queries compute values nobody reads.
        causal_over_n = torch.tril(torch.ones(n, n, dtype=hist.dtype)) / max_len  # [n, n]
        keys, values = [], []
        x = hist
        blocks = self.hstu.blocks
        for depth, block in enumerate(blocks):
            u, v, q, k = block.project(x)  # [B, n, h*dv] x 2, [B, n, h*dqk] x 2
            keys.append(k.view(B, n, h, dqk))
            values.append(v.view(B, n, h, dv))
            if depth == len(blocks) - 1:
                break  # candidates read only this block's K, V of the history, not its output
            rab = (BiasLookup.apply(block.rab.pos_w, offset_idx)[None]  # [1, n, n]
                   + BiasLookup.apply(block.rab.time_w, time_bucket)[:, None, :])  # [B, 1, n] -> [B, n, n]
            scores = torch.einsum("bihd,bjhd->bhij", q.view(B, n, h, dqk), keys[-1]) + rab[:, None]  # [B, h, n, n]
            attn = F.silu(scores) * causal_over_n
            attn_out = torch.einsum("bhij,bjhd->bihd", attn, values[-1]).reshape(B, n, h * dv)
            x = block.output(x, u, attn_out)  # [B, n, D]
        return HistoryCache(keys=keys, values=values, lengths=lengths, key_mask=key_mask, time_bucket=time_bucket)

    def encode_candidates(self, cache: HistoryCache, cand: torch.Tensor) -> torch.Tensor:
        """Candidate tokens [B, M, D] -> last hidden states [B, M, D]; each attends to its request's cached
        history and to itself."""
        c = self.cfg
        B, M, _ = cand.shape
        n = cache.key_mask.shape[1]
        h, dqk, dv, max_len = c.heads, c.attn_dim, c.linear_dim, c.max_len
        pos = torch.arange(n)
        offset_idx = (cache.lengths[:, None] - pos[None, :]).clamp(0, max_len - 1)  # [B, n]: candidate at `length`
        key_over_n = cache.key_mask.to(cand.dtype) / max_len  # [B, n]
        self_bucket = bucketize_time_gap(torch.zeros(1, dtype=torch.int64), c.num_time_buckets)  # gap 0 -> [1]
        x = cand
        for block, k_hist, v_hist in zip(self.hstu.blocks, cache.keys, cache.values):
            u, v, q, k = block.project(x)  # [B, M, h*dv] x 2, [B, M, h*dqk] x 2
            q, k, v = q.view(B, M, h, dqk), k.view(B, M, h, dqk), v.view(B, M, h, dv)
            rab = BiasLookup.apply(block.rab.pos_w, offset_idx) + BiasLookup.apply(block.rab.time_w, cache.time_bucket)
            rab_self = block.rab.pos_w[0] + block.rab.time_w[self_bucket]  # offset 0, gap 0: [1]
            scores = torch.einsum("bmhd,bjhd->bhmj", q, k_hist) + rab[:, None, None, :]  # [B, h, M, n]
            attn = F.silu(scores) * key_over_n[:, None, None, :]
            self_attn = F.silu((q * k).sum(-1) + rab_self) / max_len  # [B, M, h]
            attn_out = torch.einsum("bhmj,bjhd->bmhd", attn, v_hist) + self_attn[..., None] * v  # [B, M, h, dv]
            x = block.output(x, u, attn_out.reshape(B, M, h * dv))  # [B, M, D]
        return x

    def forward(self, b: RequestBatch) -> torch.Tensor:
        """M-FALCON over a batch of requests: logits [B, M, T] (padded candidates hold unused values)."""
        hist, hist_s, cand = self.tokens(b)
        cache = self.encode_history(hist, hist_s, 2 * b.hist_len, b.t_s)
        return self.head(self.encode_candidates(cache, cand))

    # ------------------------------------------------------------------------------------------ one request

    def request(self, history_items: Sequence[int] | np.ndarray, history_types: Sequence[int] | np.ndarray,
                history_ms: Sequence[int] | np.ndarray, t_ms: int, candidates: Sequence[int] | np.ndarray,
                ranks: Sequence[int] | np.ndarray | None = None) -> RequestBatch:
        """One request as a batch of 1; the history (oldest first) is cut to its last ``history_events``."""
        keep = self.cfg.history_events
        items = np.asarray(history_items, np.int64)[-keep:] if keep else np.zeros(0, np.int64)
        types = np.asarray(history_types, np.int64)[-keep:] if keep else np.zeros(0, np.int64)
        ms = np.asarray(history_ms, np.int64)[-keep:] if keep else np.zeros(0, np.int64)
        cand = np.asarray(candidates, np.int64)
        rank = np.full(len(cand), -1, np.int64) if ranks is None else np.asarray(ranks, np.int64)
        if not len(items) == len(types) == len(ms) or len(rank) != len(cand):
            raise ValueError("history items/types/times, and candidates/ranks, must have equal lengths")
        as_row = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None]  # noqa: E731
        return RequestBatch(
            hist_items=as_row(items), hist_types=as_row(types), hist_s=as_row(ms // 1000),
            hist_len=torch.tensor([len(items)]), t_s=torch.tensor([int(t_ms) // 1000]),
            cand_items=as_row(cand), cand_ranks=as_row(rank), cand_mask=torch.ones(1, len(cand), dtype=torch.bool),
        )

    @torch.no_grad()
    def score_mfalcon(self, history_items, history_types, history_ms, t_ms: int, candidates,  # noqa: ANN001
                      ranks=None) -> torch.Tensor:  # noqa: ANN001
        """Logits [m, T] of m candidates of one request: the history once, all candidates in one batch."""
        return self(self.request(history_items, history_types, history_ms, t_ms, candidates, ranks))[0]

    @torch.no_grad()
    def score_naive(self, history_items, history_types, history_ms, t_ms: int, candidates,  # noqa: ANN001
                    ranks=None) -> torch.Tensor:  # noqa: ANN001
        """The reference: each candidate in its own full forward over [history tokens, candidate] through the
        stock jagged ``HSTU.forward`` (plain causal attention over n + 1 tokens). Logits [m, T]."""
        full = self.request(history_items, history_types, history_ms, t_ms, candidates, ranks)
        out = []
        for j in range(full.cand_items.shape[1]):
            one = RequestBatch(**{**vars(full), "cand_items": full.cand_items[:, j:j + 1],
                                  "cand_ranks": full.cand_ranks[:, j:j + 1], "cand_mask": full.cand_mask[:, j:j + 1]})
            hist, hist_s, cand = self.tokens(one)  # [1, n, D], [1, n], [1, 1, D]
            x = torch.cat([hist[0], cand[0]])  # [n + 1, D]
            t = one.t_s.expand(1)
            ts = torch.cat([hist_s[0], t])  # the candidate is stamped t: gap 0 to itself
            y = self.hstu(x, torch.tensor([0, x.shape[0]]), ts, t.expand(x.shape[0]))  # [n + 1, D]
            out.append(self.head(y[-1:]))  # [1, T]
        return torch.cat(out) if out else torch.zeros(0, len(self.tasks))

    # ------------------------------------------------------------------------------------------ examples

    @torch.no_grad()
    def predict(self, examples: RankingExamples, batch_size: int = 1024) -> np.ndarray:
        """[N, T] probabilities, each request's candidates scored together (M-FALCON)."""
        self.eval()
        groups = RequestGroups.build(examples, self.cfg.history_events)
        out = np.zeros((len(examples), len(self.tasks)), np.float32)
        for gs in groups.batches(np.arange(groups.num_groups), batch_size):
            b, rows = groups.batch(gs)
            out[rows] = torch.sigmoid(self(b)[b.cand_mask]).numpy()
        return out


# ----------------------------------------------------------------------------------------------------------
# Requests of a RankingExamples set
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RequestGroups:
    """Examples grouped by (user, t, history): group g's examples are ``rows[offsets[g]:offsets[g + 1]]``."""

    rows: np.ndarray  # [N] example rows, grouped
    offsets: np.ndarray  # [G + 1]
    hist_start: np.ndarray  # [G] first event of the (capped) history
    hist_len: np.ndarray  # [G] events
    t_ms: np.ndarray  # [G]
    items: np.ndarray  # [N] candidate item of each example (example order)
    ranks: np.ndarray  # [N]
    ev_item: np.ndarray  # [events] the events table, as arrays
    ev_code: np.ndarray
    ev_ms: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def build(cls, examples: RankingExamples, history_events: int) -> RequestGroups:
        ex = examples.examples
        key = ["user_id", "t_ms", "hist_start", "hist_end"]
        group = ex.groupby(key, sort=False).ngroup().to_numpy(np.int64) if len(ex) else np.zeros(0, np.int64)
        rows = np.argsort(group, kind="stable")
        counts = np.bincount(group, minlength=int(group.max(initial=-1)) + 1)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        first = rows[offsets[:-1]]  # one example of each group
        start, end = examples.hist_start[first], examples.hist_end[first]
        length = np.minimum(end - start, history_events)
        ev = examples.events
        return cls(rows=rows, offsets=offsets, hist_start=end - length, hist_len=length,
                   t_ms=ex["t_ms"].to_numpy(np.int64)[first], items=ex["item_id"].to_numpy(np.int64),
                   ranks=ex["rank"].to_numpy(np.int64), ev_item=ev["item_id"].to_numpy(np.int64),
                   ev_code=event_codes(ev["event_type"].to_numpy(object)), ev_ms=ev["timestamp_ms"].to_numpy(np.int64))

    def batches(self, groups: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """``groups`` (in this order) cut into runs of about ``batch_size`` examples (a request is never split)."""
        sizes = self.sizes[groups]
        bid = (np.cumsum(sizes) - sizes) // max(batch_size, 1)
        return np.split(groups, np.flatnonzero(np.diff(bid)) + 1) if len(groups) else []

    def batch(self, groups: np.ndarray) -> tuple[RequestBatch, np.ndarray]:
        """(the RequestBatch of these groups, the example rows of its real candidates in row-major order)."""
        length, sizes = self.hist_len[groups], self.sizes[groups]
        E, M = int(length.max(initial=0)), int(sizes.max(initial=0))
        e_mask = np.arange(E) < length[:, None]  # [B, E]
        e_idx = np.where(e_mask, self.hist_start[groups][:, None] + np.arange(E), 0)
        c_mask = np.arange(M) < sizes[:, None]  # [B, M]
        c_rows = self.rows[np.where(c_mask, self.offsets[groups][:, None] + np.arange(M), 0)]
        pick = lambda table, idx, mask: torch.from_numpy(np.where(mask, table[idx], 0) if len(table) else idx * 0)  # noqa: E731
        b = RequestBatch(
            hist_items=pick(self.ev_item, e_idx, e_mask), hist_types=pick(self.ev_code, e_idx, e_mask),
            hist_s=pick(self.ev_ms, e_idx, e_mask) // 1000, hist_len=torch.from_numpy(length),
            t_s=torch.from_numpy(self.t_ms[groups] // 1000), cand_items=torch.from_numpy(self.items[c_rows]),
            cand_ranks=torch.from_numpy(self.ranks[c_rows]), cand_mask=torch.from_numpy(c_mask),
        )
        return b, c_rows[c_mask]


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train_hstu_ranker(
    examples: RankingExamples,
    cfg: HSTURankerConfig | None = None,
    tasks: Sequence[str] = ("engaged", "like", "skip"),
    *,
    epochs: int = 5,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    valid_share: float = 0.0,
    item_vectors: ItemVectors | None = None,
) -> HSTURanker:
    """Adam on the mean-over-tasks BCE; shuffled batches of whole requests (about ``batch_size`` examples each),
    deterministic given ``seed``. ``valid_share`` > 0: the requests of the last share of the examples by time are
    held out and the epoch with the best validation AUC on the first task is kept (``models.ranker.train_ranker``'s
    rule; a request's candidates share one time, so a request is wholly in or out). ``item_vectors``: the frozen
    table of a config with ``item_vectors`` on."""
    from models.ranker import BestEpoch, auc

    cfg = with_vector_shape(cfg or HSTURankerConfig(), item_vectors)
    torch.manual_seed(seed)
    model = HSTURanker(cfg, tasks)
    if item_vectors is not None:
        model.vectors.fill(item_vectors)
    labels = torch.from_numpy(task_labels(examples, tasks))
    groups = RequestGroups.build(examples, model.cfg.history_events)
    _, valid_rows = validation_rows(examples, np.arange(len(examples)), valid_share)
    cut = examples.examples["t_ms"].to_numpy(np.int64)[valid_rows].min() if len(valid_rows) else None
    every = np.arange(groups.num_groups)
    fit, valid = (every, every[:0]) if cut is None else (every[groups.t_ms < cut], every[groups.t_ms >= cut])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    best = BestEpoch()
    for epoch in range(1, epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for gs in groups.batches(fit[rng.permutation(len(fit))], batch_size):
            b, rows = groups.batch(gs)
            logits = model(b)[b.cand_mask]  # [examples, T]
            loss = F.binary_cross_entropy_with_logits(logits, labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(rows), seen + len(rows)
        model.train_losses.append(total / max(seen, 1))
        if len(valid):
            y, p = _validation_scores(model, groups, valid, labels, batch_size)
            best.record(model, epoch, auc(y, p))
    best.restore(model)
    return model


@torch.no_grad()
def _validation_scores(model: HSTURanker, groups: RequestGroups, valid: np.ndarray, labels: torch.Tensor,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first-task labels, logits) of the validation requests' candidates, in eval mode (then back to train)."""
    model.eval()
    ys, ps = [], []
    for gs in groups.batches(valid, batch_size):
        b, rows = groups.batch(gs)
        ps.append(model(b)[b.cand_mask][:, 0].numpy())
        ys.append(labels[rows, 0].numpy())
    model.train()
    return np.concatenate(ys), np.concatenate(ps)


__all__ = ["HSTURanker", "HSTURankerConfig", "HistoryCache", "RequestBatch", "RequestGroups", "event_codes",
           "train_hstu_ranker"]
