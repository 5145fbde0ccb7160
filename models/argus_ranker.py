"""ARGUS as the ranking stage: the pre-trained feedback head, fine-tuned on point-in-time ranking examples.

ARGUS (Yandex Music) pre-trains one transformer over event tokens that each encode (context, item, feedback):
the item id, the reaction to it (``event_types``: like / listen / dislike ...) and, through HSTU's time bias,
when it happened. Pre-training has two tasks on full histories: the next item (retrieval) and the reaction to
a given next item (the feedback head, ``models.recommender.FeedbackHead``). The ranking stage then asks the
feedback head a narrower question on a short list of candidates: *will this user like this item, now?* This
module fine-tunes the head for that question, on the ranking examples of ``models.ranking_data``:

    u      = encoder(history before t, event types, timestamps; query time t)   # user state, [D], unit norm
    p(y=1) = sigmoid(FeedbackHead(u, e_item))                                   # y = the task's label
    loss   = BCE(p, y)                                                          # over the training examples

Why fine-tune rather than use the pre-trained head as it is. The pre-training label is the platform's
"positive reaction" rule (on MovieLens: rating >= 3, ``models.data.positive_mask``), and its examples are the
next positions of training windows, where a rating given in the same second as the target sits in the
history. A ranker is asked about another label (``like``: rating >= 4) at a request time, with a history that
ends strictly before it (the point-in-time rule of ``models.ranking_data``). Fine-tuning trains the head on
exactly the examples it will be asked about.

Protocol (``fine_tune_ranker``):

* Histories are point-in-time: example i's history is ``examples.events[hist_start:hist_end]`` (events strictly
  before its ``t_ms``) with their event types and timestamps, the query time is ``t_ms``, items the model does
  not know are dropped and the last ``max_len`` events kept: exactly what ``Recommender.score_candidates``
  reads at serving time, so the states trained on are the states served.
* Examples whose candidate is unknown to the vocabulary, or whose history holds no known item (no user
  state), are skipped in training; ``score_examples`` gives them NaN.
* Validation is carved from the training period: the last ``valid_share`` of the examples by time. The head
  is fine-tuned on the earlier examples for up to ``epochs`` epochs; the epoch with the best validation AUC
  sets the budget, and the head is then fine-tuned again from the pre-trained weights on all the examples for
  that many epochs (the most recent examples matter most in a time-ordered split: they are not left out).
* By default only the head moves (``encoder_lr = 0``): the encoder's states are computed once and the
  fine-tuning costs seconds. ``encoder_lr > 0`` also fine-tunes the encoder (positions, event types, the HSTU
  blocks; never the item table, which retrieval shares) with that smaller learning rate, re-encoding every
  history at every step.

Cost: the distinct requests (history, query time) are encoded, not the examples: MovieLens users give many
ratings in one second, and those share one history. Requests whose window starts at the user's first event
(histories up to ``max_len`` events) are read off one causal pass over the user's history: position k's state
in that pass *is* the state of the history of its first k + 1 events queried at the time of the next event
(HSTU's attention at position k reads only events <= k, and its time bias measures gaps from position k's
query time), so it serves every request whose query time is that next event's. Longer histories, and requests
at other times, get a window of their own.

Side features of the candidate's token (``SideConfig``; off unless asked, so the platform's rankers and every
earlier figure are unchanged). ARGUS's event token encodes (context, item, feedback); the feedback head
predicts the feedback of a (context, item) token, so the candidate's token becomes

    e'_j = e_j + sum_f E_side[hash(f = value_f)]        # [D]; E_side starts at zero: e'_j = e_j before tuning
    p(y=1) = sigmoid(FeedbackHead(u, e'_j))

with f over the request's *context* (``SideConfig.context``: the surface, ``organic`` for a rating and
``recommended`` for a served slate, the hour of day and the weekday of t; events carry no device, so there is
none) and the user's and item's *attributes* (``SideConfig.attributes``: gender, age group, occupation, genres,
album, as of t: ``models.ranking_data.with_attributes``). The table trains with the head. The history's tokens
keep the pre-trained encoder's (item, feedback) form: context in them would need pre-training with it, and
the frozen encoder could not read it. A ranker with side features is a ``SideRecommender``: it scores examples
(``score_examples``) but has no saved form yet (its side table), so it is not served; the service does hand
every ranker its request's context (``serving.app``), which such an artefact would read.

The result is a new ``Recommender`` (same artefact: config.json, vocab.json, state_dict.pt) whose feedback
head predicts the task; ``metadata["ranker_task"]`` names it and ``metadata["ranker_fine_tune"]`` holds the
settings, the chosen epoch count and the validation curve.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from features.events import EVENT_TYPE_CODES
from models.data import jagged_features
from models.ranker import ITEM_ATTRIBUTES, USER_ATTRIBUTES, attribute_bags, auc, rows_of_bags
from models.ranking_data import RATED, RankingExamples, validation_rows
from models.recommender import Recommender, SequentialRecommender

TOKENS_PER_BATCH = 32_768  # events per encoder batch (passes are batched by length: little padding)


# ----------------------------------------------------------------------------------------------------------
# Which histories to encode: the requests and the passes that serve them
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RequestPlan:
    """The user states a set of examples needs, and the encoder passes that compute them.

    A *request* is a distinct (history, query time); a *pass* is one causal window over known events
    ``known[lo:hi]`` whose last position is queried at ``pass_query`` (earlier positions at the next event's
    time, as in serving). Request r's state is position ``req_pos[r]`` of pass ``req_pass[r]``."""

    example_request: np.ndarray  # [N] request of each example, -1: its history holds no known item
    example_item: np.ndarray  # [N] dense index of each example's candidate, 0: unknown to the vocabulary
    known_items: np.ndarray  # [K] dense item index of each known event (events the vocabulary knows)
    known_types: np.ndarray  # [K] event code
    known_ts: np.ndarray  # [K] seconds
    pass_lo: np.ndarray  # [P]
    pass_hi: np.ndarray  # [P]
    pass_query: np.ndarray  # [P] seconds: the query time of each pass's last position
    req_pass: np.ndarray  # [R]
    req_pos: np.ndarray  # [R]

    @property
    def num_requests(self) -> int:
        return len(self.req_pass)

    @property
    def scorable(self) -> np.ndarray:
        """[N] examples with a user state and a known candidate."""
        return (self.example_request >= 0) & (self.example_item > 0)

    def pass_batches(self, order: np.ndarray | None = None, tokens: int = TOKENS_PER_BATCH) -> list[np.ndarray]:
        """Passes in batches of about ``tokens`` events, similar lengths together (``order``: the passes to
        batch, default all); the batches in length order."""
        passes = np.arange(len(self.pass_lo)) if order is None else np.asarray(order)
        lengths = (self.pass_hi - self.pass_lo)[passes]
        passes = passes[np.argsort(lengths, kind="stable")]
        lengths = np.sort(lengths, kind="stable")
        batches, lo = [], 0
        while lo < len(passes):
            # the batch pads to its longest (last) pass: fill it up to the token budget at that length
            hi = lo + 1
            while hi < len(passes) and (hi - lo + 1) * lengths[hi] <= tokens:
                hi += 1
            batches.append(passes[lo:hi])
            lo = hi
        return batches


def plan_requests(recommender: Recommender, examples: RankingExamples) -> RequestPlan:
    """The requests of ``examples`` and the passes that encode them (see the module docstring)."""
    max_len = recommender.config.max_len
    events = examples.events
    dense = recommender.vocab.encode(events["item_id"].to_numpy(np.int64))
    known = dense > 0
    codes = events["event_type"].map(EVENT_TYPE_CODES).fillna(0).to_numpy(np.int64)  # unknown names -> 0, as serving
    ts_s = events["timestamp_ms"].to_numpy(np.int64) // 1000
    before = np.concatenate([[0], np.cumsum(known)])  # before[i]: known events among events[:i]

    ex = examples.examples
    lo = before[examples.hist_start]
    hi = before[examples.hist_end]
    query = ex["t_ms"].to_numpy(np.int64) // 1000
    item = recommender.vocab.encode(ex["item_id"].to_numpy(np.int64))
    has_state = hi > lo
    keys = np.stack([lo, hi, query], axis=1)[has_state]
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True) if len(keys) else (np.zeros((0, 3), np.int64), np.zeros(0, np.int64))
    example_request = np.full(len(ex), -1, np.int64)
    example_request[has_state] = inverse.reshape(-1)
    r_lo, r_hi, r_q = uniq[:, 0], uniq[:, 1], uniq[:, 2]
    k = r_hi - r_lo
    known_ts = ts_s[known]

    # One prefix pass per history start, over its first P known events (P = its longest history that fits).
    short = k <= max_len
    starts = pd.DataFrame({"lo": r_lo[short], "k": k[short], "q": r_q[short]})
    first = starts.sort_values(["lo", "k", "q"], ascending=[True, False, True]).drop_duplicates("lo")
    p_lo, p_len, p_query = (first[c].to_numpy(np.int64) for c in ("lo", "k", "q"))
    which = np.searchsorted(p_lo, r_lo).clip(0, max(len(p_lo) - 1, 0))
    length = p_len[which] if len(p_lo) else np.zeros(len(k), np.int64)
    next_ts = known_ts[np.minimum(r_lo + k, len(known_ts) - 1)] if len(known_ts) else np.zeros(len(k), np.int64)
    shared = short & np.where(k < length, r_q == next_ts, (k == length) & (r_q == p_query[which] if len(p_lo) else False))

    # Everything else: a window of its own, its last max_len known events.
    alone = np.flatnonzero(~shared)
    a_lo = r_hi[alone] - np.minimum(k[alone], max_len)
    pass_lo = np.concatenate([p_lo, a_lo])
    pass_hi = np.concatenate([p_lo + p_len, r_hi[alone]])
    pass_query = np.concatenate([p_query, r_q[alone]])
    req_pass = np.where(shared, which, 0)
    req_pos = k - 1
    req_pass[alone] = len(p_lo) + np.arange(len(alone))
    req_pos[alone] = r_hi[alone] - a_lo - 1
    return RequestPlan(
        example_request=example_request, example_item=item,
        known_items=dense[known], known_types=codes[known], known_ts=known_ts,
        pass_lo=pass_lo, pass_hi=pass_hi, pass_query=pass_query, req_pass=req_pass, req_pos=req_pos,
    )


def encode_passes(model: SequentialRecommender, plan: RequestPlan, passes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(states [R', D], their request ids [R']) of the requests served by ``passes``, with autograd as the
    caller's mode has it (the caller sets train or eval mode)."""
    lo, hi = plan.pass_lo[passes], plan.pass_hi[passes]
    lengths = hi - lo
    idx = np.repeat(lo - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(int(lengths.sum()))
    last = np.cumsum(lengths) - 1
    query = plan.known_ts[np.minimum(idx + 1, len(plan.known_ts) - 1)]  # each position: the next event's time
    query[last] = plan.pass_query[passes]  # the last: the request's time
    lengths_t = torch.from_numpy(lengths.astype(np.int64))
    features = jagged_features(torch.from_numpy(plan.known_items[idx]), torch.from_numpy(plan.known_types[idx]), lengths_t)
    h = model(features, torch.from_numpy(plan.known_ts[idx]), torch.from_numpy(query))  # [N, D]
    # the requests these passes serve, and where each one's state sits in h
    local = np.full(len(plan.pass_lo), -1, np.int64)
    local[passes] = np.arange(len(passes))
    requests = np.flatnonzero(local[plan.req_pass] >= 0)
    start = np.r_[0, np.cumsum(lengths)[:-1]]
    rows = start[local[plan.req_pass[requests]]] + plan.req_pos[requests]
    return h[torch.from_numpy(rows)], requests


@dataclass
class RequestStates:
    """The user state of every request of a plan, under one encoder (no gradient)."""

    plan: RequestPlan
    states: torch.Tensor  # [R, D]


def encode_requests(recommender: Recommender, examples: RankingExamples, plan: RequestPlan | None = None) -> RequestStates:
    """Every request's state under ``recommender``'s encoder, as ``score_candidates`` computes it."""
    plan = plan if plan is not None else plan_requests(recommender, examples)
    states = torch.zeros(plan.num_requests, recommender.config.dim)
    model = recommender.model.eval()
    with torch.inference_mode():
        for batch in plan.pass_batches():
            h, requests = encode_passes(model, plan, batch)
            states[torch.from_numpy(requests)] = h
    return RequestStates(plan, states)


def score_examples(recommender: Recommender, examples: RankingExamples, states: RequestStates | None = None) -> np.ndarray:
    """[N] the feedback head's probability for each example (NaN: unknown candidate or no known history).

    ``states``: ``encode_requests`` of these examples under this recommender's encoder (e.g. the pre-trained
    model's, when only the head was fine-tuned: ``Recommender.same_encoder``), to skip encoding them again."""
    states = states if states is not None else encode_requests(recommender, examples)
    plan = states.plan
    out = np.full(len(plan.example_request), np.nan, np.float32)
    rows = np.flatnonzero(plan.scorable)
    if len(rows):
        with torch.inference_mode():
            u = states.states[torch.from_numpy(plan.example_request[rows])]
            if isinstance(recommender, SideRecommender):
                e = recommender.candidate_vectors(examples, rows)
            else:
                e = recommender.item_matrix[torch.from_numpy(plan.example_item[rows])]
            out[rows] = torch.sigmoid(recommender.model.feedback_logits(u, e)).numpy()
    return out


# ----------------------------------------------------------------------------------------------------------
# Side features of the candidate token: context and attributes
# ----------------------------------------------------------------------------------------------------------

CONTEXT_FIELDS: tuple[str, ...] = ("surface", "hour", "weekday")


@dataclass(frozen=True)
class SideConfig:
    """Which side features enter the candidate's token (see the module docstring)."""

    context: bool = False  # the request's surface, hour of day and weekday
    attributes: bool = False  # user demographics and item genres / album (the examples must carry them)
    buckets: int = 1024  # hashed ``field=value`` rows of the side table

    @property
    def enabled(self) -> bool:
        return self.context or self.attributes


def context_frame(examples: RankingExamples) -> pd.DataFrame:
    """The request context of every example: ``surface`` (a rating was the user's own doing: organic; a served
    slate's items and the sampled ones were recommended), ``hour`` (0-23, UTC) and ``weekday`` (0 = Monday) of t.
    MovieLens times are shifted by whole weeks, so its hours and weekdays are the real ones."""
    ex = examples.examples
    t_ms = ex["t_ms"].to_numpy(np.int64)
    days = t_ms // 86_400_000
    return pd.DataFrame({"surface": np.where(ex["source"].to_numpy() == RATED, "organic", "recommended"),
                         "hour": (t_ms // 3_600_000) % 24, "weekday": (days + 3) % 7})  # 1970-01-01: a Thursday


def side_bags(examples: RankingExamples, cfg: SideConfig) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths [N]): each example's hashed side values, one bag per example."""
    parts = []
    if cfg.context:
        parts.append(attribute_bags(context_frame(examples), CONTEXT_FIELDS, cfg.buckets))
    if cfg.attributes:
        missing = [c for c in USER_ATTRIBUTES + ITEM_ATTRIBUTES if c not in examples.examples]
        if missing:
            raise ValueError(f"SideConfig.attributes needs attribute columns {missing}: add them with "
                             "models.ranking_data.with_attributes")
        parts.append(attribute_bags(examples.examples, USER_ATTRIBUTES + ITEM_ATTRIBUTES, cfg.buckets))
    n = len(examples)
    if not parts:
        return np.zeros(0, np.int64), np.zeros(n, np.int64)
    # one bag per example: its context values, then its attribute values
    lengths = np.sum([p[1] for p in parts], axis=0)
    rows = np.concatenate([np.repeat(np.arange(n), p[1]) for p in parts])
    values = np.concatenate([p[0] for p in parts])
    return values[np.argsort(rows, kind="stable")], lengths


class SideEmbedding(nn.Module):
    """sum_f E_side[hash(f = value_f)] per example: [B, D]. Zero at the start, so the tuned head starts from
    the pre-trained one exactly."""

    def __init__(self, cfg: SideConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.table = nn.EmbeddingBag(cfg.buckets, dim, mode="sum")
        nn.init.zeros_(self.table.weight)
        # e_j is a unit vector (components ~ 1/sqrt(D)) and the head multiplies its inputs by sqrt(D) (u * e by
        # D): a row moving at the head's learning rate would swamp the item within a few steps (measured on
        # ML-100K without the scale: every side configuration lost 0.013 test AUC, 3 seeds, and validation
        # stopped the tuning after as few as 2 epochs). Scaled, a step moves e'_j as a step of lr / sqrt(D) would.
        self.scale = dim**-0.5

    def forward(self, bags: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> torch.Tensor:
        values, lengths = rows_of_bags(*bags, rows)
        offsets = np.r_[0, np.cumsum(lengths)[:-1]]
        return self.scale * self.table(torch.from_numpy(values), torch.from_numpy(offsets.astype(np.int64)))  # [B, D]


class SideRecommender(Recommender):
    """A fine-tuned ranker whose candidate tokens carry side features: the Recommender plus its side table."""

    def __init__(self, recommender: Recommender, side: SideEmbedding):
        super().__init__(recommender.model, recommender.vocab, recommender.metadata)
        self.side = side.eval()

    def save(self, path: str | Path) -> Path:
        raise NotImplementedError("an ARGUS ranker with side features cannot be saved for serving yet (its side "
                                  "table is not part of the artefact): SideConfig stays off for registered ARGUS "
                                  "rankers")

    def candidate_vectors(self, examples: RankingExamples, rows: np.ndarray, bags: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
        """e'_j of the examples ``rows``: [len(rows), D]."""
        plan_items = self.vocab.encode(examples.examples["item_id"].to_numpy(np.int64)[rows])
        bags = bags if bags is not None else side_bags(examples, self.side.cfg)
        with torch.inference_mode():
            return self.item_matrix[torch.from_numpy(plan_items)] + self.side(bags, rows)


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------------


def _labels(examples: RankingExamples, task: str) -> np.ndarray:
    if task not in examples.examples:
        raise ValueError(f"task {task!r} is not a label column; the examples have {examples.labels}")
    labels = examples.examples[task].to_numpy(np.float64)
    if np.isnan(labels).any() or not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"task {task!r} must be a 0/1 label for every example")
    return labels.astype(np.float32)


class _Tuner:
    """One fine-tuning run from the pre-trained weights: the model copy, its optimiser, its epochs."""

    def __init__(self, recommender: Recommender, plan: RequestPlan, labels: np.ndarray, *, lr: float,
                 encoder_lr: float, weight_decay: float, batch_size: int, seed: int,
                 states: torch.Tensor | None, side: SideConfig | None = None,
                 bags: tuple[np.ndarray, np.ndarray] | None = None):
        self.model = copy.deepcopy(recommender.model)
        # the side table (None: plain item tokens), trained at the head's rate
        self.side = SideEmbedding(side, recommender.config.dim) if side is not None and side.enabled else None
        self.bags = bags
        self.items = recommender.item_matrix  # frozen: the item table is never fine-tuned
        self.plan, self.labels, self.batch_size = plan, torch.from_numpy(labels), batch_size
        self.tune_encoder = encoder_lr > 0
        head = list(self.model.feedback_head.parameters()) + (list(self.side.parameters()) if self.side else [])
        groups = [{"params": head, "lr": lr}]
        if self.tune_encoder:
            table = {id(p) for p in self.model.embeddings.parameters()}
            encoder = [p for n, p in self.model.named_parameters()
                       if not n.startswith("feedback_head.") and (id(p) not in table or "event_type" in n)]
            groups.append({"params": encoder, "lr": encoder_lr})
            for n, p in self.model.embeddings.named_parameters():
                p.requires_grad_("event_type" in n)
        else:
            for n, p in self.model.named_parameters():
                p.requires_grad_(n.startswith("feedback_head."))
        self.optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.states = states  # frozen encoder: every request's state, computed once

    def _candidates(self, rows: np.ndarray) -> torch.Tensor:
        """The candidate tokens of the examples ``rows``: e_j, plus the side features when on. [B, D]"""
        e = self.items[torch.from_numpy(self.plan.example_item[rows])]
        return e + self.side(self.bags, rows) if self.side is not None else e

    def _loss(self, u: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        e = self._candidates(rows)
        logits = self.model.feedback_logits(u, e)
        return F.binary_cross_entropy_with_logits(logits, self.labels[torch.from_numpy(rows)])

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def epoch(self, rows: np.ndarray) -> float:
        """One pass over the examples ``rows``; the mean training loss."""
        total = 0.0
        if not self.tune_encoder:
            order = rows[torch.randperm(len(rows), generator=self.generator).numpy()]
            for lo in range(0, len(order), self.batch_size):
                batch = order[lo : lo + self.batch_size]
                loss = self._loss(self.states[torch.from_numpy(self.plan.example_request[batch])], batch)
                self._step(loss)
                total += float(loss.detach()) * len(batch)
            return total / max(len(rows), 1)
        # Encoder too: each step encodes a batch of passes and trains on the examples of their requests.
        self.model.train()
        by_request = pd.Series(rows).groupby(self.plan.example_request[rows]).apply(np.asarray)
        passes = np.unique(self.plan.req_pass[by_request.index.to_numpy()])
        batches = self.plan.pass_batches(passes, tokens=self.batch_size * 16)
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            u, requests = encode_passes(self.model, self.plan, batches[b])
            present = np.isin(requests, by_request.index.to_numpy())
            requests, u = requests[present], u[torch.from_numpy(present)]
            ex = by_request.loc[requests]
            counts = ex.map(len).to_numpy()
            batch = np.concatenate(ex.to_list())
            loss = self._loss(u.repeat_interleave(torch.from_numpy(counts), dim=0), batch)
            self._step(loss)
            total += float(loss.detach()) * len(batch)
        self.model.eval()
        return total / max(len(rows), 1)

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Probabilities of the examples ``rows`` under the current weights."""
        if not len(rows):
            return np.zeros(0, np.float32)
        self.model.eval()
        with torch.inference_mode():
            if self.tune_encoder:
                requests = np.unique(self.plan.example_request[rows])
                states = torch.zeros(self.plan.num_requests, self.model.cfg.dim)
                for batch in self.plan.pass_batches(np.unique(self.plan.req_pass[requests])):
                    h, served = encode_passes(self.model, self.plan, batch)
                    states[torch.from_numpy(served)] = h
            else:
                states = self.states
            u = states[torch.from_numpy(self.plan.example_request[rows])]
            e = self._candidates(rows)
            return torch.sigmoid(self.model.feedback_logits(u, e)).numpy()


def fine_tune_ranker(
    recommender: Recommender,
    examples: RankingExamples,
    *,
    task: str = "like",
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 512,
    seed: int = 0,
    encoder_lr: float = 0.0,
    weight_decay: float = 0.0,
    valid_share: float = 0.1,
    states: RequestStates | None = None,
    side: SideConfig | None = None,
) -> Recommender:
    """A copy of ``recommender`` whose feedback head predicts ``task`` (a 0/1 label column of ``examples``),
    fine-tuned with BCE on the examples (see the module docstring for the protocol).

    ``epochs``: the most epochs validation may choose; ``lr``: the head's AdamW learning rate; ``encoder_lr``:
    0 keeps the encoder frozen, > 0 fine-tunes it too at that rate; ``valid_share``: the last share of the
    examples by time that chooses the epoch count (0: no validation, all ``epochs`` on everything);
    ``states``: ``encode_requests(recommender, examples)`` if already computed (the frozen-encoder case);
    ``side``: side features of the candidate token (context, attributes), trained with the head; the result is
    then a ``SideRecommender``."""
    if recommender.model.feedback_head is None:
        raise ValueError("this model has no feedback head (trained with feedback_weight = 0): it cannot rank")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    labels = _labels(examples, task)
    tune_encoder = encoder_lr > 0
    if states is None:
        states = encode_requests(recommender, examples) if not tune_encoder else RequestStates(plan_requests(recommender, examples), torch.zeros(0))
    plan = states.plan
    rows = np.flatnonzero(plan.scorable)
    if not len(rows):
        raise ValueError("no example has both a known candidate and a history with a known item")
    fit, valid = validation_rows(examples, rows, valid_share)
    settings = {"lr": lr, "encoder_lr": encoder_lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed}
    cached = None if tune_encoder else states.states
    side = side if side is not None and side.enabled else None
    bags = side_bags(examples, side) if side is not None else None

    def tuner() -> _Tuner:
        return _Tuner(recommender, plan, labels, states=cached, side=side, bags=bags, **settings)

    curve: list[dict[str, float]] = []
    chosen = epochs
    if len(valid):
        first = tuner()
        before = auc(labels[valid], first.scores(valid))
        for epoch in range(1, epochs + 1):
            loss = first.epoch(fit)
            curve.append({"epoch": epoch, "train_loss": loss, "valid_auc": auc(labels[valid], first.scores(valid))})
        best = max(curve, key=lambda r: (-math.inf if math.isnan(r["valid_auc"]) else r["valid_auc"]))  # first of equals
        chosen = int(best["epoch"])
    final = tuner()
    for _ in range(chosen):
        final.epoch(rows)
    metadata: dict[str, Any] = {
        **recommender.metadata,
        "ranker_task": task,
        "ranker_fine_tune": {
            **settings, "max_epochs": epochs, "epochs": chosen, "valid_share": valid_share,
            "encoder": "fine-tuned" if tune_encoder else "frozen", "examples": int(len(rows)),
            "skipped_examples": int(len(labels) - len(rows)), "valid_examples": int(len(valid)),
            "valid_auc_pretrained": before if len(valid) else None, "valid_curve": curve,
            "side": {"context": side.context, "attributes": side.attributes, "buckets": side.buckets} if side else None,
        },
    }
    for p in final.model.parameters():
        p.requires_grad_(True)
    tuned = Recommender(final.model, recommender.vocab, metadata)
    return SideRecommender(tuned, final.side) if final.side is not None else tuned


__all__ = ["RequestPlan", "RequestStates", "SideConfig", "SideRecommender", "context_frame", "encode_requests",
           "fine_tune_ranker", "plan_requests", "score_examples", "side_bags"]
