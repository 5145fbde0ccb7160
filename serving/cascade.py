"""The cascade's second stage: rerank a retriever's top-K with a ranker and keep the top k.

    candidates = retriever.recommend(history, k=K)                 # (item, cosine) x K, seen items excluded
    p_c        = ranker.score_candidates(history, candidates)      # P(positive reaction | history, c)
    score_c    = w_feedback * p_c + w_retrieval * cosine_c         # serve.cascade_weights
    answer     = top k of the candidates by score_c                # ties keep the retriever's order

Why a weighted sum of the heads: the ranker's probability is what the cascade exists for (default weights
feedback 1, retrieval 0), but an operator may keep some of the retriever's opinion, and a ranker with more
heads (p(like), expected played ratio) adds terms here, not a new code path.

A candidate the ranker does not know (an item newer than the ranker) scores p = 0: it goes below every item
the ranker vouches for, but stays in the list. A history the ranker knows nothing of (no item in its
vocabulary) gets no ranking at all: the retriever's order stands, and the answer says so (no ranker version).
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
    ranker: Any,  # a models.recommender.Recommender with a feedback head
    histories: Sequence[Mapping[str, Any]],
    candidates: Sequence[Sequence[tuple[int, float]]],
    *,
    k: Sequence[int],
    weights: Mapping[str, float],
    now_ms: int | None = None,
) -> list[Ranked]:
    """Each history's candidates (the retriever's (item, cosine) list) reordered by the blended score, cut to
    its own ``k``. One ranker call for the whole micro-batch."""
    ids = [[item for item, _ in c] for c in candidates]
    probs = ranker.score_candidates(histories, ids, now_ms=now_ms)
    w_fb, w_ret = float(weights.get("feedback", 0.0)), float(weights.get("retrieval", 0.0))
    out: list[Ranked] = []
    for cands, p, keep in zip(candidates, probs, k):
        if p is None or not len(cands):
            out.append(Ranked(list(cands)[:keep], None))
            continue
        p = np.nan_to_num(np.asarray(p, np.float64), nan=0.0)
        cosine = np.array([s for _, s in cands], np.float64)
        score = w_fb * p + w_ret * cosine
        order = np.argsort(-score, kind="stable")[:keep]  # stable: ties keep the retriever's order
        out.append(Ranked([(cands[j][0], float(score[j])) for j in order], [float(p[j]) for j in order]))
    return out
