"""models.argus_ranker: the feedback head fine-tuned on point-in-time ranking examples, and the bench's ARGUS path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.argus_ranker import encode_requests, fine_tune_ranker, plan_requests, score_examples
from models.data import ItemVocab
from models.ranker import auc
from models.ranking_data import ratings_examples
from models.recommender import ModelConfig, Recommender, build_model

ITEMS = 40
T0_MS = 1_200_000_000_000


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def untrained_argus(max_len: int = 12, seed: int = 0) -> Recommender:
    """A small ARGUS model as initialised: its feedback head knows nothing yet."""
    torch.manual_seed(seed)
    cfg = ModelConfig(model="hstu", num_items=ITEMS, max_len=max_len, dim=16, blocks=1, heads=1, attn_dim=0,
                      linear_dim=0, ffn_dim=0, dropout=0.0, num_time_buckets=16, hstu_rab=True,
                      hstu_attention="silu", hstu_gating=True, feedback_head=True, event_types=True,
                      vista_tokens=0, vista_target_attention=False)
    return Recommender(build_model(cfg), ItemVocab.build(np.arange(1, ITEMS + 1)))


def synthetic_ratings(users: int = 60, per_user: int = 20, seed: int = 0) -> pd.DataFrame:
    """Each user rates random movies, one or two per second; the even movies get 5 stars, the odd ones 2: a
    like label the head can learn from the item alone."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        t = T0_MS + int(rng.integers(0, 10_000)) * 1000
        for item in rng.choice(np.arange(1, ITEMS + 1), size=per_user, replace=False):
            t += int(rng.integers(0, 2)) * 1000  # same-second ratings too
            rows.append((u, int(item), t, 5.0 if item % 2 == 0 else 2.0))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp_ms", "rating"])


def time_split(examples, share: float = 0.3):  # noqa: ANN001, ANN201
    t = np.sort(examples.examples["t_ms"].unique())
    return examples.split_by_time(int(t[int(len(t) * (1 - share))]))


def test_fine_tuning_learns_a_task_the_unchanged_head_does_not_know() -> None:
    rec = untrained_argus()
    train, test = time_split(ratings_examples(synthetic_ratings()))
    like = test.examples["like"].to_numpy()
    before = score_examples(rec, test)
    tuned = fine_tune_ranker(rec, train, task="like", epochs=15, lr=1e-2, batch_size=128, seed=0)
    after = score_examples(tuned, test)
    ok = ~np.isnan(after)
    assert ok.mean() > 0.8 and np.array_equal(ok, ~np.isnan(before))
    assert auc(like[ok], after[ok]) > auc(like[ok], before[ok]) + 0.2
    assert auc(like[ok], after[ok]) > 0.9
    meta = tuned.metadata["ranker_fine_tune"]
    assert tuned.metadata["ranker_task"] == "like" and meta["encoder"] == "frozen"
    assert 1 <= meta["epochs"] <= 15 and len(meta["valid_curve"]) == 15 and meta["valid_examples"] > 0
    # only the head moved: the pre-trained model is untouched and the user states are the same
    assert rec.same_encoder(tuned) and not torch.equal(rec.model.feedback_head.mlp[0].weight,
                                                        tuned.model.feedback_head.mlp[0].weight)


def test_the_encoder_can_be_fine_tuned_too() -> None:
    rec = untrained_argus()
    train, _ = time_split(ratings_examples(synthetic_ratings(users=20, per_user=10)))
    tuned = fine_tune_ranker(rec, train, task="dislike", epochs=2, encoder_lr=1e-3, seed=0)
    assert tuned.metadata["ranker_task"] == "dislike" and tuned.metadata["ranker_fine_tune"]["encoder"] == "fine-tuned"
    assert not rec.same_encoder(tuned)
    # the item table (retrieval's) is never fine-tuned
    assert torch.equal(rec.item_matrix, tuned.item_matrix)


def test_a_history_holds_only_events_strictly_before_its_time() -> None:
    rec = untrained_argus(max_len=6)  # short windows: long histories get windows of their own
    examples = ratings_examples(synthetic_ratings(users=20))
    plan = plan_requests(rec, examples)
    t_s = examples.examples["t_ms"].to_numpy() // 1000
    for i in np.flatnonzero(plan.example_request >= 0):
        r = plan.example_request[i]
        p = plan.req_pass[r]
        window = slice(plan.pass_lo[p], plan.pass_lo[p] + plan.req_pos[r] + 1)
        assert (plan.known_ts[window] < t_s[i]).all()
        assert plan.req_pos[r] < rec.config.max_len
    # and changing everything at or after an example's time leaves its score as it was
    i = int(np.flatnonzero((plan.example_request >= 0) & (examples.history_lengths() > 8))[0])
    ex = examples.examples.iloc[i]
    events = examples.events.copy()
    later = (events["user_id"] == ex["user_id"]) & (events["timestamp_ms"] >= ex["t_ms"])
    assert later.sum() > 0
    events.loc[later, "item_id"] = 1
    events.loc[later, "event_type"] = "like"
    changed = type(examples)(examples=examples.examples, events=events, labels=examples.labels)
    assert score_examples(rec, changed)[i] == pytest.approx(score_examples(rec, examples)[i], abs=1e-6)


def test_the_fine_tuned_ranker_saves_loads_and_serves_the_same_numbers(tmp_path) -> None:  # noqa: ANN001
    rec = untrained_argus(max_len=8)
    examples = ratings_examples(synthetic_ratings(users=30))
    train, test = time_split(examples)
    tuned = fine_tune_ranker(rec, train, task="like", epochs=3, lr=1e-2, seed=1)
    loaded = Recommender.load(tuned.save(tmp_path / "ranker"))
    assert loaded.metadata["ranker_task"] == "like"
    assert loaded.metadata["ranker_fine_tune"]["epochs"] == tuned.metadata["ranker_fine_tune"]["epochs"]

    fast = score_examples(loaded, test, encode_requests(loaded, test))
    events, ex = test.events, test.examples
    rows = np.flatnonzero(~np.isnan(fast))[:60]
    histories = [{"item_ids": events["item_id"].to_numpy()[a:b], "event_types": events["event_type"].tolist()[a:b],
                  "timestamps_ms": events["timestamp_ms"].to_numpy()[a:b]}
                 for a, b in zip(test.hist_start[rows], test.hist_end[rows])]
    served = np.array([loaded.score_candidates([h], [[int(ex["item_id"].iloc[i])]], now_ms=int(ex["t_ms"].iloc[i]))[0][0]
                       for h, i in zip(histories, rows)])
    np.testing.assert_allclose(served, fast[rows], atol=1e-5)
    again = np.array([tuned.score_candidates([h], [[int(ex["item_id"].iloc[i])]], now_ms=int(ex["t_ms"].iloc[i]))[0][0]
                      for h, i in zip(histories, rows)])
    np.testing.assert_array_equal(served, again)


def test_examples_it_cannot_score_are_skipped() -> None:
    rec = untrained_argus()
    ratings = synthetic_ratings(users=20, per_user=10)
    ratings.loc[ratings.index[::7], "item_id"] = 999  # a movie the model has never seen
    examples = ratings_examples(ratings)
    tuned = fine_tune_ranker(rec, examples, task="like", epochs=1, valid_share=0.0)
    scores = score_examples(tuned, examples)
    unknown = examples.examples["item_id"].to_numpy() == 999
    known_event = np.r_[0, np.cumsum(examples.events["item_id"].to_numpy() != 999)]
    first = known_event[examples.hist_end] == known_event[examples.hist_start]  # no movie it knows before t
    assert np.isnan(scores[unknown | first]).all() and not np.isnan(scores[~unknown & ~first]).any()
    assert tuned.metadata["ranker_fine_tune"]["skipped_examples"] == int((unknown | first).sum())


def test_the_ranking_bench_argus_path_end_to_end(tmp_path, capsys) -> None:  # noqa: ANN001
    from bench.ranking import main

    rng = np.random.default_rng(3)
    lines = []
    for u in range(1, 31):
        t = 880_000_000 + int(rng.integers(0, 100_000))
        for item in rng.choice(np.arange(1, 41), size=16, replace=False):
            t += int(rng.integers(1, 5000))
            lines.append(f"{u}\t{item}\t{int(rng.integers(1, 6))}\t{t}")
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    argv = ["--dataset", "ml-100k", "--data-dir", str(tmp_path), "--model", "argus", "--config", "argus-ml100k",
            "--pretrain-epochs", "1", "--ft-epochs", "2", "--seeds", "0,1", "--bootstrap", "50", "--retrieve", "20"]
    main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["config"] == "argus-ml100k" and out["primary"] == "argus" and out["wall_s"] > 0
    for metric in ("auc", "gauc", "logloss"):
        assert set(out[metric]) == {"like", "dislike"}
    assert out["logloss"]["like"] > 0 and 0 <= out["auc"]["like"] <= 1
    assert 0 <= out["hr@10"] <= 1 and 0 <= out["ndcg@10"] <= out["hr@10"]
    assert out["cascade"]["users"] > 0
    assert set(out["metrics"]["all"]) == {"argus", "argus_pretrained", "popularity", "random"}
    diff = out["differences"]["fine_tuned_minus_pretrained"]["like"]["auc"]
    assert diff["ci_low"] <= diff["diff"] <= diff["ci_high"]
    assert set(out["differences"]["reranked_minus_retrieval"]) == {"hr@10", "ndcg@10"}
    assert 0 < out["counts"]["per_seed"][0]["argus_scorable"] <= 1
