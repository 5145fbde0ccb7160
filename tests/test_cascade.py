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


def test_rerank_orders_by_the_blend_of_log_p_and_the_retrievers_logit_and_cuts_to_k(ranker):
    h = _history([100, 101, 102])
    cands = [(i, 0.5 - 0.01 * n) for n, i in enumerate(range(103, 123))]  # the retriever's order, 20 candidates
    now = T0_MS + 10_000
    p = ranker.score_candidates([h], [[i for i, _ in cands]], now_ms=now)[0].astype(np.float64)
    cosine = np.array([c for _, c in cands])
    for w_fb, w_ret in ((1.0, 0.0), (1.0, 1.0), (0.5, 2.0)):
        (out,) = rerank(ranker, [h], [cands], k=[5], weights={"feedback": w_fb, "retrieval": w_ret},
                        temperature=0.05, now_ms=now)
        score = w_fb * np.log(p) + w_ret * cosine / 0.05
        best = np.argsort(-score, kind="stable")[:5]
        assert [i for i, _ in out.items] == [cands[j][0] for j in best]
        assert np.allclose([s for _, s in out.items], score[best]) and np.allclose(out.ranker_scores, p[best])
    # all weight on the retriever: its own order comes back
    (same,) = rerank(ranker, [h], [cands], k=[5], weights={"feedback": 0.0, "retrieval": 1.0}, now_ms=now)
    assert [i for i, _ in same.items] == [i for i, _ in cands[:5]]


def test_unknown_candidates_go_below_equals_and_an_unknown_history_keeps_the_retrieval_order(ranker):
    cands = [(999_999, 0.8), (103, 0.8), (104, 0.8)]  # the first is newer than the ranker; equal retrieval scores
    out = rerank(ranker, [_history([100]), _history([888_888])], [cands, cands], k=[3, 2],
                 weights={"feedback": 1.0, "retrieval": 1.0}, now_ms=T0_MS + 10_000)
    assert out[0].items[-1][0] == 999_999 and out[0].ranker_scores[-1] == 0.0
    assert out[1].ranker_scores is None and out[1].items == cands[:2]  # no user state: nothing reranked


def test_a_ranker_sharing_the_retrievers_encoder_reuses_its_states_and_scores_the_same(ranker):
    import copy

    import torch

    h = [_history([100, 101, 102]), _history([888_888]), _history([103])]
    now = T0_MS + 10_000
    recs, states = ranker.retrieve(h, k=15, now_ms=now)
    assert states[1] is None and recs[1] == []  # no known item: no state, no answer
    tuned = Recommender(copy.deepcopy(ranker.model), ranker.vocab)
    with torch.no_grad():
        tuned.model.feedback_head.mlp[-1].bias.add_(0.5)  # a head fine-tuned, the encoder as it was
    assert ranker.same_encoder(tuned)
    w = {"feedback": 1.0, "retrieval": 1.0}
    reused = rerank(tuned, h, recs, k=[5] * 3, weights=w, now_ms=now, states=states)
    encoded = rerank(tuned, h, recs, k=[5] * 3, weights=w, now_ms=now)
    for a, b in zip(reused, encoded):
        assert [i for i, _ in a.items] == [i for i, _ in b.items]
        assert (a.ranker_scores is None) == (b.ranker_scores is None)
        if a.ranker_scores is not None:
            assert np.allclose(a.ranker_scores, b.ranker_scores, atol=1e-6)
    with torch.no_grad():
        tuned.model.pos_emb.weight.add_(0.1)  # an encoder fine-tuned too: states differ, none to share
    assert not ranker.same_encoder(tuned)


def test_the_retrievers_temperature_comes_from_its_recipe(ranker):
    from serving.cascade import retrieval_temperature

    assert retrieval_temperature(ranker) == 0.05  # no saved recipe: the platform's
    ranker.metadata["train_config"] = {"temperature": 0.1}
    try:
        assert retrieval_temperature(ranker) == 0.1
    finally:
        ranker.metadata.pop("train_config")


def _report(ranker: float, base: float, pop: float) -> dict:
    return {"task": "engaged", "finite_scores": True, "ranker": {"auc": ranker}, "base": {"auc": base},
            "popularity": {"auc": pop}}


def test_the_ranker_gate_wants_the_base_head_popularity_and_the_champion_beaten():
    from models.lifecycle.gate import decide_ranker

    ok = decide_ranker(_report(0.70, 0.65, 0.60))
    assert ok.passed and set(ok.checks) == {"finite", "beats_base", "beats_popularity"}
    worse_than_base = decide_ranker(_report(0.64, 0.65, 0.60))
    assert not worse_than_base.passed and "pre-trained head" in worse_than_base.summary
    assert not decide_ranker(_report(0.70, 0.65, 0.72)).passed  # popularity orders better
    champ = decide_ranker(_report(0.70, 0.65, 0.60), margin=0.01, champion_version=3, champion_value=0.695)
    assert not champ.passed and "champion ranker v3" in champ.summary
    assert decide_ranker(_report(0.70, 0.65, 0.60), champion_version=3, champion_value=0.69).passed
    assert not decide_ranker({**_report(float("nan"), 0.65, 0.60)}).passed
