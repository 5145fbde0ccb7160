"""The cascade's rerank step on a real (tiny) ARGUS model: order, cut, weights, and what it leaves alone."""

from __future__ import annotations

import numpy as np
import pytest

from models.data import ItemVocab
from models.recommender import Recommender, build_model
from serving.cascade import rerank
from tests.test_models import T0_MS, model_config

ITEMS = list(range(100, 130))


@pytest.fixture(scope="module")
def ranker() -> Recommender:
    import torch

    torch.manual_seed(0)
    cfg = model_config(model="hstu", num_items=len(ITEMS), max_len=20, dim=16, blocks=1, heads=2, dropout=0.0,
                       feedback_head=True)
    return Recommender(build_model(cfg), ItemVocab(ITEMS))


def _history(items: list[int]) -> dict:
    return {"item_ids": items, "event_types": ["listen"] * len(items),
            "timestamps_ms": [T0_MS + 1000 * i for i in range(len(items))]}


def test_rerank_orders_by_the_rankers_probability_and_cuts_to_k(ranker):
    h = _history([100, 101, 102])
    cands = [(i, 1.0 - 0.01 * n) for n, i in enumerate(range(103, 123))]  # the retriever's order, 20 candidates
    (out,) = rerank(ranker, [h], [cands], k=[5], weights={"feedback": 1.0, "retrieval": 0.0}, now_ms=T0_MS + 10_000)
    p = ranker.score_candidates([h], [[i for i, _ in cands]], now_ms=T0_MS + 10_000)[0]
    best = np.argsort(-p, kind="stable")[:5]
    assert [i for i, _ in out.items] == [cands[j][0] for j in best]
    assert np.allclose([s for _, s in out.items], p[best]) and np.allclose(out.ranker_scores, p[best])
    # all weight on the retriever: its own order comes back
    (same,) = rerank(ranker, [h], [cands], k=[5], weights={"feedback": 0.0, "retrieval": 1.0}, now_ms=T0_MS + 10_000)
    assert [i for i, _ in same.items] == [i for i, _ in cands[:5]]


def test_unknown_candidates_go_last_and_an_unknown_history_keeps_the_retrieval_order(ranker):
    cands = [(999_999, 0.9), (103, 0.8), (104, 0.7)]  # the first is newer than the ranker
    out = rerank(ranker, [_history([100]), _history([888_888])], [cands, cands], k=[3, 2],
                 weights={"feedback": 1.0}, now_ms=T0_MS + 10_000)
    assert out[0].items[-1][0] == 999_999 and out[0].ranker_scores[-1] == 0.0
    assert out[1].ranker_scores is None and out[1].items == cands[:2]  # no user state: nothing reranked
