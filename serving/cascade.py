"""The cascade's second stage: rerank a retriever's top-K with a ranker and keep the top k.

    candidates = retriever.recommend(history, k=K)                  # (item, cosine) x K, seen items excluded
    p_c        = ranker.score_candidates(history, candidates)       # P(positive reaction | history, shown c)
    score_c    = w_feedback * log p_c + w_retrieval * cosine_c / T  # serve.cascade_weights; T = the retriever's
    answer     = top k of the candidates by score_c                 # training temperature; ties keep its order

Why log p plus the retriever's logit: the retriever's cosine / T is its log-softmax over the catalogue up to a
constant, log P(the user picks c next), and the ranker's p is P(a positive reaction | c shown). With both
weights at 1 (the default) the cascade orders by the product P(picks c) x P(likes c | shown): the ranker
corrects the retriever where reactions say it is wrong, and the retriever keeps the ranker from promoting
items it has no evidence on. A ranker trained on served slates has seen few items from deep in a top-200, so
its p alone (weights feedback 1, retrieval 0) extrapolates there; the closed-loop A/B
(``encore bench cascade-loop``) measured that order losing listening time against retrieval alone.

The ranker is any family's (``models.served_ranker``): an ARGUS ranker (a ``Recommender``: the retriever's
feedback head, fine-tuned) or a Wukong / DLRM / HSTU ranker (a ``ServedRanker``: its own features of each
history, computed by the training code; it hashes item ids, so it scores every candidate).

A candidate the ranker does not know (an item newer than the ranker) keeps the retriever's logit alone
(log p = 0 would flatter it, so it takes just under the lowest log p of its list): it stays in the list but goes below
items of equal retrieval score that the ranker vouches for. A history the ranker knows nothing of (no item in
its vocabulary) gets no ranking at all: the retriever's order stands, and the answer says so (no ranker
version).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ranked:
    """One request's answer after the cascade: items with their final scores, and the ranker's own P per item
    (None when the ranker could not rank this history and the retriever's order stands)."""

    items: list[tuple[int, float]]
    ranker_scores: list[float] | None


def rerank(
    ranker: Any,  # a models.recommender.Recommender with a feedback head, or a models.served_ranker.ServedRanker
    histories: Sequence[Mapping[str, Any]],
    candidates: Sequence[Sequence[tuple[int, float]]],
    *,
    k: Sequence[int],
    weights: Mapping[str, float],
    temperature: float = 0.05,
    now_ms: int | None = None,
    states: Sequence[Any] | None = None,
) -> list[Ranked]:
    """Each history's candidates (the retriever's (item, cosine) list) reordered by the blended score, cut to
    its own ``k``; ``temperature``: the retriever's (``retrieval_temperature``). One ranker call for the whole
    micro-batch. ``states``: the retriever's user state per history (``Recommender.retrieve``), given only
    when the ranker shares the retriever's encoder (``Recommender.same_encoder``): the ranker then scores
    them without encoding the histories a second time."""
    ids = [[item for item, _ in c] for c in candidates]
    probs = ranker.score_candidates(histories, ids, now_ms=now_ms, states=states)
    w_fb, w_ret = float(weights.get("feedback", 0.0)), float(weights.get("retrieval", 0.0))
    out: list[Ranked] = []
    for cands, p, keep in zip(candidates, probs, k):
        if p is None or not len(cands):
            out.append(Ranked(list(cands)[:keep], None))
            continue
        p = np.asarray(p, np.float64)
        log_p = np.log(np.clip(p, 1e-6, 1.0))
        known = np.isfinite(p)
        log_p = np.where(known, log_p, log_p[known].min() - 1e-6 if known.any() else 0.0)  # just below the worst known
        logit = np.array([s for _, s in cands], np.float64) / temperature
        score = w_fb * log_p + w_ret * logit
        order = np.argsort(-score, kind="stable")[:keep]  # stable: ties keep the retriever's order
        out.append(Ranked([(cands[j][0], float(score[j])) for j in order],
                          [float(np.nan_to_num(p[j], nan=0.0)) for j in order]))
    return out


def retrieval_temperature(retriever: Any, default: float = 0.05) -> float:
    """The softmax temperature the retriever was trained at (its saved recipe), which turns its cosine into a
    logit; the platform's recipes all train at 0.05."""
    config = (getattr(retriever, "metadata", None) or {}).get("train_config") or {}
    value = config.get("temperature")
    return float(value) if value else default
