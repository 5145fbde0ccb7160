"""Wukong, DLRM and the HSTU ranker as served rankers: after save -> load, scoring served histories (the online
store's last events, as dicts) gives what ``predict`` gives on the same examples, attributes included; the
cascade reranks with them; the registry's pyfunc and the one loader read the artefact."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from features.attributes import attributes_as_of
from models.hstu_ranker import HSTURankerConfig
from models.ranker import item_popularity_before
from models.ranking_data import RankingExamples, build_ranking_examples, candidate_examples, with_attributes
from models.ranking_recipe import resolve_ranking_recipe
from models.served_ranker import (
    ATTRIBUTE_COLUMNS,
    SERVING_RANK,
    ItemCounts,
    ServedRanker,
    attribute_columns,
    load_artifact,
    ranker_scores,
    train_served_ranker,
)
from serving.cascade import rerank
from tests.conftest import attribute_frames, simulated_slates

T0 = 1_700_000_000_000
USERS, ITEMS = 30, 60
KEPT = 8  # the online store keeps each user's last KEPT events (ingest.history_length)
# Small sizes; the shipped Wukong / DLRM recipes' item vectors off (a variant below turns them on with its own table)
SIZES = {"dim": 8, "item_buckets": 128, "user_buckets": 64, "history_len": 5, "mlp_hidden": 16, "epochs": 1,
         "item_vectors": False}
HSTU = HSTURankerConfig(dim=16, blocks=1, heads=2, attn_dim=8, linear_dim=8, history_events=KEPT, item_buckets=128,
                        head_hidden=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def examples() -> RankingExamples:
    """30 users, 60 items; 120 served slates of 6 with the simulator's reactions (+2 sampled negatives each)."""
    interactions, exposures = simulated_slates(users=USERS, items=ITEMS, requests=120, slate=6, seed=0,
                                               sessions_per_user=2, events_per_session=8, t0_ms=T0)
    return build_ranking_examples(interactions, exposures, window_s=3600, sampled_negatives=2,
                                  catalogue=np.arange(ITEMS), seed=0)


def served_request(examples: RankingExamples, seed: int = 1,
                   at: int | None = None) -> tuple[list[dict], list[list[int]], int]:
    """Ten users asked about six candidates each at one instant (``at``; default: after every event): the
    histories as the online store holds them then (each user's last KEPT events, oldest first, as dicts with the
    user's id)."""
    events = examples.events
    now = int(events["timestamp_ms"].max()) + 5_000 if at is None else at
    events = events[events["timestamp_ms"] < now]
    rng = np.random.default_rng(seed)
    users = rng.choice(USERS, size=10, replace=False)
    histories = []
    for u in users:
        mine = events[events["user_id"] == u].tail(KEPT)
        histories.append({"user_id": int(u), "item_ids": mine["item_id"].tolist(),
                          "event_types": mine["event_type"].tolist(), "timestamps_ms": mine["timestamp_ms"].tolist()})
    candidates = [rng.choice(ITEMS, size=6, replace=False).tolist() for _ in users]
    return histories, candidates, now


def offline_twin(examples: RankingExamples, histories: list[dict], candidates: list[list[int]],
                 now: int) -> RankingExamples:
    """The same (user, candidate, t) rows as training examples over the full events table, at the serving rank."""
    users = np.repeat([h["user_id"] for h in histories], [len(c) for c in candidates])
    twin = candidate_examples(examples, users, np.concatenate(candidates), np.full(len(users), now))
    twin.examples["rank"] = SERVING_RANK
    return twin


@pytest.mark.parametrize("variant", ["wukong", "dlrm", "hstu", "wukong+vectors", "hstu+vectors"])
def test_a_saved_ranker_scores_served_histories_as_predict_scores_the_same_examples(examples, variant, tmp_path):
    """``+vectors``: frozen item vectors (some items unknown to them); Wukong's with the engaged history, which
    must read the same engaged events from the served window as training read from the offline table."""
    from models.ranker import ItemVectors

    train, _ = examples.split_by_time(T0 + 60_000 * 90)
    family = variant.split("+")[0]
    vectors = None
    extra: dict = {}
    if variant.endswith("+vectors"):
        ids = np.arange(ITEMS - 10, dtype=np.int64)
        vectors = ItemVectors(ids, np.random.default_rng(3).normal(size=(len(ids), 4)).astype(np.float32), "test")
        extra = {"item_vectors": True} | ({"history": "engaged"} if family == "wukong" else {})
    recipe = resolve_ranking_recipe(family, **(SIZES | extra))
    trained = train_served_ranker(recipe, train, "engaged", max_history=KEPT, hstu=HSTU, item_vectors=vectors)
    assert trained.model.tasks[0] == "engaged" and trained.family == family
    if vectors is not None:
        assert trained.metadata["ranker_train"]["item_vectors"] == "test"
    loaded = load_artifact(trained.save(tmp_path / family))
    assert isinstance(loaded, ServedRanker) and loaded.family == family and loaded.events_read == KEPT
    assert loaded.same_encoder(loaded) is False and loaded.metadata["ranker_family"] == family

    histories, candidates, now = served_request(examples)
    served = loaded.score_candidates(histories, candidates, now_ms=now)
    twin = offline_twin(examples, histories, candidates, now)
    # predict on the full events table: popularity before t (= the frozen counts: every event is before now)
    # and the whole history (the length feature capped at KEPT, the items the last history_len)
    expected = trained.model.predict(twin)[:, 0]
    assert [len(p) for p in served] == [6] * 10
    np.testing.assert_allclose(np.concatenate(served), expected, atol=1e-5)
    assert np.all((expected > 0) & (expected < 1)) and np.std(expected) > 0
    np.testing.assert_allclose(ranker_scores(loaded, twin), expected, atol=1e-5)  # what the gate re-scores with

    # the frozen counts stand still: an hour later only the time features move, never the item's count
    later = loaded.score_candidates(histories, candidates, now_ms=now + 3_600_000)
    assert len(later) == 10 and all(np.all(np.isfinite(p)) for p in later)


@pytest.mark.parametrize("family", ["wukong", "dlrm"])
def test_the_gate_scores_examples_as_they_are_served_with_the_frozen_item_counts(examples, family):
    """The ranking evaluation and the gate (``ranker_scores``) used to score test examples with the popularity
    before each example and its logged rank (the training features), not with the frozen counts the served
    model reads: the gate measured another model. At an instant in the middle of the log, where the two
    counts differ, they now give exactly what ``score_candidates`` gives the same requests."""
    train, _ = examples.split_by_time(T0 + 60_000 * 90)
    ranker = train_served_ranker(resolve_ranking_recipe(family, **SIZES), train, "engaged", max_history=KEPT)
    mid = int(examples.events["timestamp_ms"].median())
    histories, candidates, _ = served_request(examples, seed=4, at=mid)
    twin = offline_twin(examples, histories, candidates, mid)
    frozen = ranker.counts.lookup(twin.examples["item_id"].to_numpy())
    assert (frozen > item_popularity_before(twin)).any()  # the counts the gate used to read are not served
    served = np.concatenate(ranker.score_candidates(histories, candidates, now_ms=mid))
    np.testing.assert_allclose(ranker_scores(ranker, twin), served, atol=1e-5)
    assert not np.allclose(ranker.score_examples(twin), served, atol=1e-5)  # the training features' scores
    shown = twin.examples.assign(rank=np.arange(len(twin)) % 6)  # a logged rank is not read either
    np.testing.assert_allclose(ranker_scores(ranker, replace(twin, examples=shown)), served, atol=1e-5)


def test_item_counts_are_frozen_before_their_instant_and_unknown_items_count_zero(examples):
    events = examples.events
    cut = int(events["timestamp_ms"].median())
    counts = ItemCounts.of_events(events, cut)
    before = events[events["timestamp_ms"] < cut]
    for item in (0, 7, 33):
        assert counts.lookup(np.array([item]))[0] == int((before["item_id"] == item).sum())
    assert counts.lookup(np.array([10_000]))[0] == 0


def test_attributes_are_read_through_the_bound_reader_and_match_training(examples, tmp_path):
    from models.lifecycle.pyfunc import predict_frame

    users, items = attribute_frames(USERS, ITEMS)
    train, _ = examples.split_by_time(T0 + 60_000 * 90)
    entity = train.examples[["user_id", "item_id", "t_ms"]]
    train = with_attributes(train, attributes_as_of(entity, users, items))
    recipe = resolve_ranking_recipe("wukong", attributes=True, **SIZES)
    loaded = load_artifact(train_served_ranker(recipe, train, "engaged", max_history=KEPT).save(tmp_path / "w"))
    histories, candidates, now = served_request(examples, seed=2)
    with pytest.raises(ValueError, match="bind a reader"):
        loaded.score_candidates(histories, candidates, now_ms=now)
    reads: list[int] = []

    def reader(user_ids: np.ndarray, item_ids: np.ndarray) -> pd.DataFrame:  # the latest rows, as online
        reads.append(len(user_ids))
        return attributes_as_of(pd.DataFrame({"user_id": user_ids, "item_id": item_ids, "t_ms": now}), users, items)

    loaded.bind_attributes(reader)
    served = np.concatenate(loaded.score_candidates(histories, candidates, now_ms=now))
    assert reads == [60]  # one read for the whole micro-batch
    twin = offline_twin(examples, histories, candidates, now)
    twin = with_attributes(twin, attributes_as_of(twin.examples[["user_id", "item_id", "t_ms"]], users, items))
    np.testing.assert_allclose(served, loaded.score_examples(twin), atol=1e-5)

    # the pyfunc model (no reader bound: MLflow loads it without a store) reads them from its input's columns
    unbound = load_artifact(tmp_path / "w")
    per_request = [twin.examples.iloc[6 * r: 6 * (r + 1)] for r in range(len(histories))]
    frame = pd.DataFrame({"user_id": [h["user_id"] for h in histories], "item_ids": [h["item_ids"] for h in histories],
                          "event_types": [h["event_types"] for h in histories],
                          "timestamps_ms": [h["timestamps_ms"] for h in histories], "candidates": candidates,
                          "now_ms": now})
    for name in ATTRIBUTE_COLUMNS:
        frame[name] = [attribute_columns(rows)[name] for rows in per_request]
    got = predict_frame(unbound, frame)
    np.testing.assert_allclose(np.concatenate(got["scores"].tolist()), served, atol=1e-6)
    assert reads == [60]  # the columns were read, not the reader
    with pytest.raises(ValueError, match="pass all of them or none"):
        predict_frame(unbound, frame.drop(columns=["album"]))


def test_the_cascade_reranks_with_a_served_ranker_and_the_pyfunc_scores_candidates(examples, tmp_path):
    from models.lifecycle.pyfunc import predict_frame

    train, _ = examples.split_by_time(T0 + 60_000 * 90)
    ranker = load_artifact(train_served_ranker(resolve_ranking_recipe("hstu", **SIZES), train, "engaged",
                                               hstu=HSTU).save(tmp_path / "h"))
    histories, candidates, now = served_request(examples, seed=3)
    passes: list[tuple[int, ...]] = []  # M-FALCON: one forward for the micro-batch, each history encoded once
    hook = ranker.model.register_forward_hook(lambda m, args, out: passes.append(tuple(out.shape)))
    ranker.score_candidates(histories, candidates, now_ms=now)
    hook.remove()
    assert passes == [(10, 6, len(ranker.model.tasks))]  # [requests, candidates, tasks] in one call
    retrieved = [[(i, 0.5 - 0.01 * n) for n, i in enumerate(c)] for c in candidates]
    out = rerank(ranker, histories, retrieved, k=[3] * 10, weights={"feedback": 1.0, "retrieval": 0.0}, now_ms=now)
    p = ranker.score_candidates(histories, candidates, now_ms=now)
    for ranked, probs, c in zip(out, p, candidates):
        best = np.argsort(-np.log(probs.astype(np.float64)), kind="stable")[:3]
        assert [i for i, _ in ranked.items] == [c[j] for j in best]
        np.testing.assert_allclose(ranked.ranker_scores, probs[best], atol=1e-6)
    frame = pd.DataFrame({"user_id": [h["user_id"] for h in histories[:2]],
                          "item_ids": [h["item_ids"] for h in histories[:2]],
                          "event_types": [h["event_types"] for h in histories[:2]],
                          "timestamps_ms": [h["timestamps_ms"] for h in histories[:2]],
                          "candidates": candidates[:2], "now_ms": now})
    got = predict_frame(ranker, frame)
    assert got["items"].tolist() == candidates[:2]
    np.testing.assert_allclose(np.concatenate(got["scores"].tolist()), np.concatenate(p[:2]), atol=1e-6)


def test_the_run_summary_names_a_ranker_without_a_pre_trained_head() -> None:
    from cli.run import _ranker_line

    line = _ranker_line({"version": 1, "task": "engaged", "auc": 0.7, "base_auc": None, "popularity_auc": 0.6,
                         "gate": "passed"})
    assert line == "v1  engaged AUC 0.7000 (popularity 0.6000); gate: passed"
    argus = _ranker_line({"version": 2, "task": "engaged", "auc": 0.7, "base_auc": 0.65, "popularity_auc": 0.6})
    assert "pre-trained head 0.6500, popularity 0.6000" in argus
