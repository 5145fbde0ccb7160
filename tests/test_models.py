"""Fast tests of the model code (models/*): data, HSTU/SASRec, loss, evaluation, training, inference."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.data import (
    ItemVocab,
    Examples,
    UserSequences,
    build_sequences,
    leave_one_out,
    make_batch,
    temporal_split,
    tile_windows,
    with_targets,
)
from torchrec import KeyedJaggedTensor
from models.evaluate import auc, by_reaction, evaluate, popularity_ranks, rank_targets, ranking_metrics, split_metrics, target_gains
from models.recommender import ModelConfig, Recommender, SequentialRecommender, build_model, table_dim
from models.train import NegativeDraw, NegativeLogits, RecommenderTrain, make_optimizer, make_split, negative_pool_size, sampled_softmax_loss, train
from models.recipe import BASE_RECIPE, resolve_recipe

MODELS = ["hstu", "sasrec"]


def model_config(**sizes: object) -> ModelConfig:
    """A ModelConfig over the root recipe's defaults (``base.yaml``, the one place they live), sizes changed."""
    return dataclasses.replace(resolve_recipe(BASE_RECIPE).model_config(0), **sizes)
T0_MS = 1_700_000_000_000


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------


def synthetic_events(users: int = 40, items: int = 30, length: int = 25, seed: int = 0) -> pd.DataFrame:
    """Learnable toy world: each user walks the catalogue in steps of +1 (mod items) from a random start;
    every 4th event is a skip of a random item (negative feedback in the history, never a target)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        cur = int(rng.integers(items))
        t = T0_MS + int(rng.integers(0, 10**8))
        for i in range(length):
            t += int(rng.integers(1_000, 3_600_000))
            if i % 4 == 3:
                rows.append((u, 100 + int(rng.integers(items)), "skip", t, 0.05))
            else:
                cur = (cur + 1) % items
                rows.append((u, 100 + cur, "listen", t, float("nan") if i % 2 else 0.9))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp_ms", "played_ratio"])


def tiny_model(kind: str, num_items: int = 30, feedback: bool = False, max_len: int = 20) -> SequentialRecommender:
    torch.manual_seed(0)
    return build_model(model_config(model=kind, num_items=num_items, max_len=max_len, dim=16, blocks=2, heads=2, dropout=0.0, feedback_head=feedback))


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return synthetic_events()


@pytest.fixture(scope="module")
def seqs(events):
    return build_sequences(events)


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


def test_vocab_roundtrip_and_unknowns():
    vocab = ItemVocab.build([50, 7, 7, 1000])
    assert len(vocab) == 3 and vocab.num_embeddings == 4
    enc = vocab.encode([7, 50, 1000, 999])
    assert enc.tolist() == [1, 2, 3, 0]  # sorted raw ids -> 1..V, unknown -> 0
    assert vocab.decode(enc[:3]).tolist() == [7, 50, 1000]
    assert ItemVocab.from_json(vocab.to_json()) == vocab


def test_build_sequences_sorts_stably_and_marks_targets():
    df = pd.DataFrame(
        {
            "user_id": [2, 1, 1, 1, 1, 2],
            "item_id": [10, 11, 12, 13, 14, 15],
            "event_type": ["listen", "like", "listen", "skip", "listen", "dislike"],
            "timestamp_ms": [T0_MS + 5, T0_MS + 3000, T0_MS + 1000, T0_MS + 1000, T0_MS + 9000, T0_MS + 1],
            "played_ratio": [np.nan, np.nan, 0.9, 0.0, 0.3, np.nan],
        }
    )
    s = build_sequences(df)
    assert s.user_ids.tolist() == [1, 2]
    u1 = slice(s.offsets[0], s.offsets[1])
    # ties at the same ms keep the frame's order (12 before 13)
    assert s.vocab.decode(s.items[u1]).tolist() == [12, 13, 11, 14]
    # listen 0.9 -> positive, skip -> negative, like -> positive, listen 0.3 -> negative
    assert s.positive[u1].tolist() == [True, False, True, False]
    assert s.timestamps[u1][0] == (T0_MS + 1000) // 1000
    u2 = slice(s.offsets[1], s.offsets[2])
    assert s.vocab.decode(s.items[u2]).tolist() == [15, 10]  # dislike at +1ms, listen at +5ms
    assert s.positive[u2].tolist() == [False, True]  # listen with unknown ratio is a completed play


def test_build_sequences_rejects_unknown_event_type():
    df = pd.DataFrame({"user_id": [1], "item_id": [1], "event_type": ["purchase"], "timestamp_ms": [T0_MS]})
    with pytest.raises(ValueError, match="unknown event types"):
        build_sequences(df)


def test_leave_one_out_targets_are_last_positives(seqs):
    split = leave_one_out(seqs, max_len=10)
    for u in range(seqs.num_users):
        lo, hi = seqs.offsets[u], seqs.offsets[u + 1]
        pos = [i for i in range(lo + 1, hi) if seqs.positive[i]]
        t = split.test.rank_at[(split.test.history_from == lo) & (split.test.rank_at >= 0)]
        v = split.valid.rank_at[(split.valid.history_from == lo) & (split.valid.rank_at >= 0)]
        assert t.tolist() == [pos[-1]] and v.tolist() == [pos[-2]]
        tr = split.train.end[split.train.history_from == lo]
        assert tr.tolist() == [pos[-2]]  # training stops before the validation target
    # every held-out event between the validation and the test target is feedback-scored exactly once, even
    # where it does not fit in the ranking window (then a feedback-only window covers it)
    vb = make_batch(seqs, split.valid)
    assert int(vb.feedback_mask.sum()) == int((split.test.rank_at[split.test.rank_at >= 0] - split.valid.rank_at[split.valid.rank_at >= 0]).sum())
    assert len(split.valid) > split.valid.num_ranked  # the tiny windows (max_len 10) needed extra windows
    assert int(vb.rank_mask.sum()) == split.valid.num_ranked
    # windows never exceed max_len inputs
    for ex in (split.train, split.valid, split.test):
        assert ((ex.end - 1 - ex.start) <= 10).all()
    # the test window ranks exactly its target; negatives are never ranked in training
    b = make_batch(seqs, split.train)
    assert bool(b.target_positive[b.rank_mask].all())
    assert int(b.rank_mask.sum()) < int(b.lengths.sum())  # skips are in the history but not targets


def test_tiled_windows_make_every_training_event_a_target_once(seqs):
    split = leave_one_out(seqs, max_len=4)
    tiled = tile_windows(split.train, max_len=4)
    assert ((tiled.end - 1 - tiled.start) <= 4).all() and ((tiled.end - tiled.start) >= 2).all()
    for lo, end in zip(split.train.history_from.tolist(), split.train.end.tolist()):
        mine = tiled.history_from == lo
        targets = sorted(i for s, e in zip(tiled.start[mine], tiled.end[mine]) for i in range(s + 1, e))
        assert targets == list(range(lo + 1, end))  # each event after the user's first, once, up to the cut
    newest = tiled.subset(np.isin(tiled.end, split.train.end))
    assert sorted(newest.start.tolist()) == sorted(split.train.start.tolist())  # the newest = the recipe's window
    recipe = dataclasses.replace(resolve_recipe(BASE_RECIPE), max_len=4, train_windows="all")
    assert len(make_split(seqs, recipe).train) == len(tiled)


def test_all_events_are_targets_under_the_papers_protocol(seqs):
    # the published SASRec/HSTU MovieLens protocol: every event is an interaction to predict
    every = with_targets(seqs, "all")
    split = leave_one_out(every, max_len=10)
    ranked = split.test.rank_at[split.test.rank_at >= 0]
    assert ranked.tolist() == (seqs.offsets[1:] - 1).tolist()  # the last event of every user
    valid = split.valid.rank_at[split.valid.rank_at >= 0]
    assert valid.tolist() == (seqs.offsets[1:] - 2).tolist() and not seqs.positive[valid].any()  # skips, here
    b = make_batch(every, split.train)
    assert int(b.rank_mask.sum()) == int(b.lengths.sum())  # every position ranks its next event
    assert not bool(b.target_positive[b.rank_mask].all())  # the feedback labels are unchanged
    assert with_targets(seqs, "positive").target is seqs.positive
    with pytest.raises(ValueError, match="unknown target rule"):
        with_targets(seqs, "liked")


@pytest.mark.parametrize("kind", MODELS)
def test_item_only_models_ignore_event_types(seqs, kind):
    torch.manual_seed(0)
    model = build_model(model_config(model=kind, num_items=len(seqs.vocab), max_len=20, dim=16, dropout=0.0, event_types=False)).eval()
    batch = make_batch(seqs, leave_one_out(seqs, 20).test)
    a = model(batch.features, batch.timestamps, batch.query_timestamps)
    values = batch.features.values().clone()
    n = len(values) // 2
    values[n:] = 1  # every event type replaced
    other = KeyedJaggedTensor.from_lengths_sync(keys=batch.features.keys(), values=values, lengths=batch.features.lengths())
    assert torch.allclose(a, model(other, batch.timestamps, batch.query_timestamps))
    model.cfg.event_types = True  # the same weights reading event types do see them
    assert not torch.allclose(a, model(other, batch.timestamps, batch.query_timestamps))


def test_the_papers_split_trains_on_all_but_the_last_event_and_has_no_validation(seqs):
    # the reference's ignore_last_n=1: each user's last rating is the test, the one before it trains
    every = with_targets(seqs, "all")
    split = leave_one_out(every, max_len=10, validation=False)
    assert len(split.valid) == 0
    ranked = split.test.rank_at[split.test.rank_at >= 0]
    assert ranked.tolist() == (seqs.offsets[1:] - 1).tolist()
    assert split.train.end.tolist() == ranked.tolist()  # the last training target is the second-to-last event
    assert ((split.train.end - split.train.start) == 11).all()  # the most recent max_len + 1 events
    assert split.train.num_inputs == 10 * len(split.train)  # tokens per epoch: a window's inputs, not the user's events
    with pytest.raises(ValueError, match="needs split: loo"):
        train(seqs, resolve_recipe(BASE_RECIPE, split="temporal", validation=False, epochs=1), progress=False)


def test_without_validation_all_epochs_run_and_the_final_weights_are_tested(events):
    cfg = resolve_recipe(BASE_RECIPE, model="hstu", max_len=20, dim=16, blocks=1, negatives=16, batch_size=16, epochs=4, patience=1,
                      eval_every=2, targets="all", validation=False)
    result = train(events, cfg, progress=False)
    assert len(result.history) == 4 and result.best_epoch == 4  # patience cannot stop a run with no validation
    assert [("test_ndcg@10" in h) for h in result.history] == [False, True, False, True]  # a log, picks nothing
    assert result.history[-1]["test_ndcg@10"] == pytest.approx(result.test_metrics["ndcg@10"])
    assert result.valid_metrics == {}


def test_logging_test_figures_beside_validation_selects_nothing(events):
    """log_test_every scores the test split every N epochs (and the last) for the curve; selection stays on
    validation, and the run trains exactly as without it."""
    cfg = resolve_recipe(BASE_RECIPE, model="hstu", max_len=20, dim=16, blocks=1, negatives=16, batch_size=16, epochs=5, patience=0,
                      eval_every=1, targets="all", lr=5e-3)
    plain = train(events, cfg, progress=False)
    logged = train(events, cfg.replace(log_test_every=2), progress=False)
    assert [("test_ndcg@10" in h) for h in logged.history] == [False, True, False, True, True]
    assert not any("test_ndcg@10" in h for h in plain.history)
    assert [h["valid_ndcg@10"] for h in logged.history] == [h["valid_ndcg@10"] for h in plain.history]
    assert logged.best_epoch == plain.best_epoch
    assert logged.test_metrics == pytest.approx(plain.test_metrics)
    best = logged.history[logged.best_epoch - 1]
    if "test_ndcg@10" in best:  # the selected epoch was logged: the final test is that epoch's weights
        assert best["test_ndcg@10"] == pytest.approx(logged.test_metrics["ndcg@10"])


@pytest.mark.parametrize("patience, epochs_run, test_logged", [(2, 4, [4]), (0, 6, [5, 6])])
def test_early_stopping_keeps_the_best_validation_weights(events, monkeypatch, patience, epochs_run, test_logged):
    """Validation NDCG@10 scripted as 0.1, 0.3, 0.2, 0.2, 0.2, 0.25: epoch 2 is best. Patience 2 stops after two
    evaluations without a new best (epoch 4); patience 0 runs every epoch. Either way the returned model holds
    epoch 2's weights, whatever the later epochs did. The test split is scored by the real evaluator; the curve's
    test log (every 5 epochs) also scores the epoch a run stops on and the last."""
    import models.train as train_module

    scripted, snapshots, valid_rankings = iter([0.1, 0.3, 0.2, 0.2, 0.2, 0.25]), {}, []

    def snapshotting_rank(model, seqs, examples, batch_size):  # noqa: ANN001 - the ranker's signature
        ranked = rank_targets(model, seqs, examples, batch_size=batch_size)
        if examples is split_of["valid"]:
            snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
            valid_rankings.append(ranked)  # kept alive, so identity tells them apart
        return ranked

    def scripted_valid(ranked, num_items, *, feedback):  # noqa: ANN001 - the summary's signature
        if any(ranked is r for r in valid_rankings):
            return {"ndcg@10": next(scripted), "hr@10": 0.0}
        return split_metrics(ranked, num_items, feedback=feedback)

    split_of: dict = {}
    real_make_split = train_module.make_split

    def remembering_make_split(seqs, cfg):  # noqa: ANN001
        split = real_make_split(seqs, cfg)
        split_of["valid"] = split.valid
        return split

    monkeypatch.setattr(train_module, "rank_targets", snapshotting_rank)
    monkeypatch.setattr(train_module, "split_metrics", scripted_valid)
    monkeypatch.setattr(train_module, "make_split", remembering_make_split)
    cfg = resolve_recipe(BASE_RECIPE, model="hstu", max_len=20, dim=16, blocks=1, negatives=16, batch_size=16, epochs=6,
                      patience=patience, eval_every=1, targets="all", lr=5e-3, log_test_every=5)
    result = train(events, cfg, progress=False)

    assert len(result.history) == epochs_run and result.best_epoch == 2
    assert [int(h["epoch"]) for h in result.history if "test_ndcg@10" in h] == test_logged
    assert result.valid_metrics["ndcg@10"] == 0.3
    final = result.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in snapshots[2].items())
    assert not all(torch.equal(final[k], v) for k, v in snapshots[epochs_run].items())  # training moved on
    assert set(result.test_metrics) >= {"hr@10", "ndcg@10", "mrr"}
    assert result.ranked["valid"] is valid_rankings[1]  # epoch 2's ranking, the weights kept, not ranked again


def test_temporal_split_respects_time(seqs):
    t_test = int(np.quantile(seqs.timestamps, 0.8))
    t_valid = int(np.quantile(seqs.timestamps, 0.6))
    split = temporal_split(seqs, 50, test_time_s=t_test, valid_time_s=t_valid)
    assert len(split.test) > 0 and len(split.valid) > 0
    assert (seqs.timestamps[split.train.end - 1] < t_valid).all()  # every training target precedes the cut
    assert (seqs.timestamps[split.test.rank_at] >= t_test).all()
    assert seqs.positive[split.test.rank_at].all()
    for lo, t in zip(split.test.history_from, split.test.rank_at):  # ... and it is the *first* positive after it
        between = np.arange(lo + 1, t)
        assert not (seqs.positive[between] & (seqs.timestamps[between] >= t_test)).any()


def test_batches_are_jagged_and_padded_only_to_batch_max(seqs):
    ex = Examples(
        start=seqs.offsets[:2].copy(),
        end=seqs.offsets[:2] + np.array([4, 6]),  # 3 and 5 inputs
        rank_at=np.array([-1, -1]),
        feedback_from=seqs.offsets[:2] + 1,
        history_from=seqs.offsets[:2].copy(),
    )
    batch = make_batch(seqs, ex)
    assert batch.lengths.tolist() == [3, 5]
    assert batch.features.keys() == ["item_id", "event_type"]
    assert batch.features["item_id"].values().numel() == 8  # no padding in the input
    assert batch.offsets.tolist() == [0, 3, 8]

    # Each block sees the padded length: HSTUBlock gets n as an argument, SASRecBlock a [B, n, D] tensor.
    padded_to = []
    for kind in MODELS:
        model = tiny_model(kind, num_items=len(seqs.vocab), max_len=50)
        for block in model.encoder.blocks:
            block.register_forward_pre_hook(
                lambda mod, args: padded_to.append(args[2] if kind == "hstu" else args[0].shape[1])
            )
        model(batch.features, batch.timestamps, batch.query_timestamps)
    assert len(padded_to) == 4 and all(p == 5 for p in padded_to), padded_to  # batch max (5), never max_len (50)


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------


def _history_batch(seqs, rows=(0, 1, 2), length=12):
    start = seqs.offsets[list(rows)]
    ex = Examples(start, start + length + 1, np.full(len(rows), -1), start + 1, start.copy())
    return make_batch(seqs, ex)


@pytest.mark.parametrize("kind", MODELS)
def test_forward_shapes_and_normalisation(seqs, kind):
    model = tiny_model(kind, num_items=len(seqs.vocab))
    batch = _history_batch(seqs)
    out = model(batch.features, batch.timestamps, batch.query_timestamps)
    assert out.shape == (int(batch.lengths.sum()), 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(out)), atol=1e-5)
    items = model.all_item_embeddings()
    assert items.shape == (len(seqs.vocab) + 1, 16)
    assert torch.allclose(items[1:].norm(dim=-1), torch.ones(len(seqs.vocab)), atol=1e-5)


def test_widths_fbgemm_cannot_shard_are_stored_padded_and_the_padding_stays_out_of_the_model(seqs):
    # d = 50 (the ML-1M paper configs): FBGEMM's fused kernel under DMP needs rows divisible by 4, so the tables
    # are stored 52 wide and lookups keep 50 columns. The spare columns must not reach the output or learn.
    assert [table_dim(d) for d in (48, 49, 50, 52)] == [48, 52, 52, 52]
    torch.manual_seed(0)
    model = build_model(model_config(model="hstu", num_items=len(seqs.vocab), max_len=20, dim=50, dropout=0.0))
    item_table = model.embeddings.embeddings["item"].weight
    assert item_table.shape == (len(seqs.vocab) + 1, 52)
    batch = _history_batch(seqs)
    out = model(batch.features, batch.timestamps, batch.query_timestamps)
    assert out.shape == (int(batch.lengths.sum()), 50)
    assert model.all_item_embeddings().shape == (len(seqs.vocab) + 1, 50)
    loss, _ = RecommenderTrain(model, negatives=8, temperature=0.05).forward(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert item_table.grad[:, :50].abs().sum() > 0
    assert item_table.grad[:, 50:].abs().sum() == 0
    before = item_table[:, 50:].detach().clone()
    make_optimizer(model, resolve_recipe(BASE_RECIPE)).step()
    assert torch.equal(item_table[:, 50:], before)


@pytest.mark.parametrize("kind", MODELS)
def test_causality_future_items_do_not_change_the_past(seqs, kind):
    model = tiny_model(kind, num_items=len(seqs.vocab)).eval()
    batch = _history_batch(seqs, rows=(0, 1))
    base = model(batch.features, batch.timestamps, batch.query_timestamps)
    j = 7  # change the item and event type of position 7 of the first sequence
    values = batch.features.values().clone()
    n_total = int(batch.lengths.sum())
    values[j] = (values[j] % len(seqs.vocab)) + 1
    values[n_total + j] = 3 if values[n_total + j] != 3 else 4
    changed = type(batch.features).from_lengths_sync(batch.features.keys(), values, batch.features.lengths())
    out = model(changed, batch.timestamps, batch.query_timestamps)
    assert torch.allclose(out[:j], base[:j], atol=1e-6)  # the past is untouched
    assert not torch.allclose(out[j:12], base[j:12], atol=1e-4)  # the present and future do see it
    assert torch.allclose(out[12:], base[12:], atol=1e-6)  # other users are untouched


def test_hstu_uses_time_gaps(seqs):
    model = tiny_model("hstu", num_items=len(seqs.vocab)).eval()
    batch = _history_batch(seqs, rows=(0,))
    a = model(batch.features, batch.timestamps, batch.query_timestamps)
    later = batch.query_timestamps.clone()
    later[-1] += 86_400 * 30  # the request comes a month later
    b = model(batch.features, batch.timestamps, later)
    assert torch.allclose(a[:-1], b[:-1]) and not torch.allclose(a[-1], b[-1])


def test_sampled_softmax_masks_negatives_equal_to_the_positive():
    torch.manual_seed(0)
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    user, pos = norm(torch.randn(4, 8)), norm(torch.randn(4, 8))
    pos_ids = torch.tensor([1, 2, 3, 4])
    pool_ids = torch.tensor([2, 9, 10, 11])  # 2 is row 1's positive
    pool = norm(torch.randn(4, 8))
    pool[0] = pos[1]  # a hit carries the positive's own embedding
    neg_index = torch.tensor([[0, 1, 2], [0, 1, 3], [3, 3, 1], [2, 0, 1]])  # each row its own negatives
    masked = sampled_softmax_loss(user, pos, pool, pos_ids, pool_ids, neg_index, 0.05)
    # reference: compute row by row, dropping the hit from row 1's negatives
    losses = []
    for m in range(4):
        ids, emb = pool_ids[neg_index[m]], pool[neg_index[m]]
        keep = ids != pos_ids[m]
        logits = torch.cat([(user[m] * pos[m]).sum()[None], user[m] @ emb[keep].T]) / 0.05
        losses.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(masked, torch.stack(losses).mean(), atol=1e-5)
    unmasked = sampled_softmax_loss(user, pos, pool, pos_ids, torch.tensor([99, 9, 10, 11]), neg_index, 0.05)
    assert not torch.allclose(masked, unmasked)


def test_negative_logits_gradients_match_the_dense_computation():
    # The sparse backward must equal autograd through (user @ pool.T).gather, duplicates in a row included
    # (an item drawn twice as a negative gets both gradients): gradcheck in float64, then the dense reference.
    g = torch.Generator().manual_seed(0)
    user = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    pool = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randint(0, 4, (6, 7), generator=g)  # 7 draws from 4 items: duplicates guaranteed
    assert torch.autograd.gradcheck(NegativeLogits.apply, (user, pool, index))
    weights = torch.randn(6, 7, dtype=torch.float64, generator=g)
    (NegativeLogits.apply(user, pool, index) * weights).sum().backward()
    sparse_grads = user.grad.clone(), pool.grad.clone()
    user.grad = pool.grad = None
    ((user @ pool.T).gather(1, index) * weights).sum().backward()
    assert torch.allclose(sparse_grads[0], user.grad) and torch.allclose(sparse_grads[1], pool.grad)


def test_negative_logits_in_row_chunks_equal_one_matmul(monkeypatch):
    import models.train as train_mod

    g = torch.Generator().manual_seed(1)
    user, pool = torch.randn(37, 8, generator=g), torch.randn(11, 8, generator=g)
    index = torch.randint(0, 11, (37, 5), generator=g)
    monkeypatch.setattr(train_mod, "NEG_ROW_CHUNK", 8)  # 37 rows: four full chunks and a partial one
    assert torch.allclose(NegativeLogits.apply(user, pool, index), (user @ pool.T).gather(1, index))


def test_bias_lookup_gradient_is_autograds():
    from models.hstu import BiasLookup

    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.randint(0, 9, (3, 6, 6), generator=g)  # many positions read the same bucket
    assert torch.autograd.gradcheck(BiasLookup.apply, (w, idx))
    grad = torch.randn(3, 6, 6, dtype=torch.float64, generator=g)
    (BiasLookup.apply(w, idx) * grad).sum().backward()
    ours = w.grad.clone()
    w.grad = None
    (w[idx] * grad).sum().backward()
    assert torch.allclose(ours, w.grad)


def test_negatives_are_drawn_per_position_from_the_whole_catalogue():
    # the reference draws R uniform negatives for every position; a small catalogue is the pool itself
    assert negative_pool_size(3_706, 128, 128, 200) == 3_706
    big = negative_pool_size(1_000_000, 128, 128, 200)
    assert 8 * 128 <= big < 1_000_000
    draw = NegativeDraw.draw(50, 8, num_windows=4, window_len=6, pool_size=50, generator=torch.Generator().manual_seed(0))
    assert draw.pool_ids.tolist() == list(range(1, 51)) and draw.index.shape == (4, 6, 8)
    ids = draw.pool_ids[draw.index.long()]
    assert not torch.equal(ids[0, 0], ids[0, 1]) and not torch.equal(ids[0, 0], ids[1, 0])  # not shared
    pooled = NegativeDraw.draw(1000, 8, 2, 3, pool_size=64, generator=torch.Generator().manual_seed(0))
    assert len(pooled.pool_ids) == 64 and int(pooled.index.max()) < 64 and int(pooled.pool_ids.min()) >= 1


@pytest.mark.parametrize("kind", MODELS)
def test_loss_decreases_on_a_learnable_task(seqs, kind):
    torch.manual_seed(0)
    model = build_model(model_config(model=kind, num_items=len(seqs.vocab), max_len=20, dim=16, blocks=1, dropout=0.0, feedback_head=True))
    cfg = resolve_recipe(BASE_RECIPE, lr=5e-3)
    task = RecommenderTrain(model, negatives=16, temperature=0.1, feedback_weight=0.5)
    opt = make_optimizer(model, cfg)
    split = leave_one_out(seqs, 20)
    batch = make_batch(seqs, split.train)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss, out = task(batch, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(out["next_item_loss"]))
        assert "feedback_loss" in out
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_a_batch_without_ranked_positions_adds_zero_loss_not_nan(seqs):
    import dataclasses

    torch.manual_seed(0)
    model = build_model(model_config(model="hstu", num_items=len(seqs.vocab), max_len=20, dim=16, blocks=1, feedback_head=True))
    task = RecommenderTrain(model, negatives=16, temperature=0.1, feedback_weight=0.5)
    batch = make_batch(seqs, leave_one_out(seqs, 20).train)
    full, _ = task(batch, torch.Generator().manual_seed(0))
    assert float(full) > 0
    # every target a feedback-only event: nothing to rank (possible with targets: positive)
    no_ranked = dataclasses.replace(batch, rank_mask=torch.zeros_like(batch.rank_mask))
    loss, out = task(no_ranked, torch.Generator().manual_seed(0))
    assert float(out["next_item_loss"]) == 0.0 and math.isfinite(float(loss))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------


def test_ranking_metrics_by_hand():
    m = ranking_metrics(np.array([0, 1, 9, 10, 60]), num_items=100, ks=(1, 10, 50, 200))
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["hr@50"] == pytest.approx(4 / 5)
    assert m["hr@200"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 61) / 5)
    # K is capped at the catalogue: with 50 items, hr@200 counts ranks < 50
    assert ranking_metrics(np.array([49, 60]), num_items=50)["hr@200"] == pytest.approx(0.5)
    # the metrics are the means of each target's gain (bench.compare --users resamples the gains): any shape
    gains = target_gains(np.array([[0, 1, 9, 10, 60]]), num_items=100)
    assert gains["hr@10"].tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]] and gains["mrr"][0, 1] == pytest.approx(1 / 2)
    assert gains["ndcg@10"][0, 1] == pytest.approx(1 / math.log2(3)) and gains["ndcg@10"][0, 3] == 0.0
    assert {k: float(v.mean()) for k, v in gains.items()} == pytest.approx(m)


def test_auc_by_hand():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # ties count half
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


class _FixedScorer(torch.nn.Module):
    """Stub model: one user vector, item i scores -i (so item 1 ranks first)."""

    def __init__(self, num_items: int):
        super().__init__()
        self.cfg = model_config(num_items=num_items)
        self.feedback_head = None

    def forward(self, features, timestamps, query_timestamps):
        n = features["item_id"].values().numel()
        return torch.ones(n, 1)

    def all_item_embeddings(self):
        return -torch.arange(self.cfg.num_items + 1, dtype=torch.float32)[:, None]


def _one_user(items: list[int]) -> UserSequences:
    """One user listening to ``items`` a second apart; catalogue 1..10 (dense ids == raw ids)."""
    df = pd.DataFrame(
        {
            "user_id": [1] * len(items),
            "item_id": items,
            "event_type": ["listen"] * len(items),
            "timestamp_ms": [T0_MS + i * 1000 for i in range(len(items))],
            "played_ratio": [np.nan] * len(items),
        }
    )
    return build_sequences(df, vocab=ItemVocab(np.arange(1, 11)))


def _relistening_user() -> tuple[UserSequences, Examples]:
    """One user: items 1, 3, 5 (seen), then target 5 again (re-listen)."""
    return _one_user([1, 3, 5, 5]), Examples(np.array([0]), np.array([4]), np.array([3]), np.array([3]), np.array([0]))


def test_evaluate_filters_history_but_not_the_target():
    s, ex = _relistening_user()
    m = evaluate(_FixedScorer(10), s, ex, ks=(1, 10))
    # scores: item k -> -k. Unfiltered, 4 items (1..4) beat item 5. Items 1 and 3 are seen: rank 2 (items 2, 4).
    assert m["mrr"] == pytest.approx(1 / 3)
    assert m["hr@1"] == 0.0 and m["hr@10"] == 1.0


@pytest.mark.parametrize("seen_filter, rank", [("history", 1), ("window", 3)])
def test_seen_filter_window_keeps_items_older_than_the_models_input_in_the_ranking(seen_filter, rank):
    # items 1..4, then the target 6; the model reads the last max_len = 2 events (3, 4). Item k scores -k, so
    # the unseen items below 6 beat the target: 5 alone when the whole history is filtered, 1, 2 and 5 when only
    # the input window is (the reference's protocol)
    s = _one_user([1, 2, 3, 4, 6])
    split = make_split(s, resolve_recipe(BASE_RECIPE, max_len=2, validation=False, seen_filter=seen_filter))
    m = evaluate(_FixedScorer(10), s, split.test, ks=(1, 10))
    assert m["count"] == 1 and m["mrr"] == pytest.approx(1 / (rank + 1))
    with pytest.raises(ValueError, match="seen_filter 'everything': expected one of history, window"):
        make_split(s, resolve_recipe(BASE_RECIPE, seen_filter="everything"))


def test_metrics_by_reaction_split_the_ranked_targets_by_the_users_reaction():
    ranks = torch.tensor([0, 20, 5, 300])
    m = by_reaction(ranks, torch.tensor([True, True, False, False]), num_items=1000)
    assert m["positive_share"] == 0.5
    assert m["positive_hr@10"] == 0.5 and m["positive_hr@50"] == 1.0 and m["positive_hr@200"] == 1.0
    assert m["negative_hr@10"] == 0.5 and m["negative_hr@50"] == 0.5 and m["negative_hr@200"] == 0.5
    assert m["negative_mrr"] == pytest.approx((1 / 6 + 1 / 301) / 2)
    assert by_reaction(ranks, torch.ones(4, dtype=torch.bool), 1000) == {}  # one reaction only: nothing to split


def test_evaluate_reports_the_ranking_of_liked_and_disliked_targets_apart():
    # two users, each ending on item 6 (item k scores -k); the first listens to it, the second dislikes it.
    # Targets "all": a disliked next item is ranked too.
    rows = [(1, i, "listen") for i in (1, 2, 6)] + [(2, i, "listen") for i in (3, 4)] + [(2, 6, "dislike")]
    df = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                       "event_type": [r[2] for r in rows],
                       "timestamp_ms": [T0_MS + i * 1000 for i in range(len(rows))], "played_ratio": np.nan})
    s = with_targets(build_sequences(df, vocab=ItemVocab(np.arange(1, 11))), "all")
    m = evaluate(_FixedScorer(10), s, make_split(s, resolve_recipe(BASE_RECIPE, validation=False, targets="all")).test, ks=(1, 10))
    # user 1 saw 1, 2: items 3, 4, 5 beat 6 (rank 3); user 2 saw 3, 4: items 1, 2, 5 beat it (rank 3)
    assert m["count"] == 2 and m["positive_share"] == 0.5
    assert m["positive_mrr"] == pytest.approx(1 / 4) and m["negative_mrr"] == pytest.approx(1 / 4)
    listens_only = with_targets(build_sequences(df[df.event_type == "listen"], vocab=ItemVocab(np.arange(1, 11))), "all")
    assert "positive_share" not in evaluate(_FixedScorer(10), listens_only,
                                            make_split(listens_only, resolve_recipe(BASE_RECIPE, validation=False)).test)


class _ConstantScorer(_FixedScorer):
    """Stub model that scores every item the same: ``user`` (NaN: a diverged model) times 1."""

    def __init__(self, num_items: int, user: float):
        super().__init__(num_items)
        self.user = user

    def forward(self, features, timestamps, query_timestamps):
        return torch.full((features["item_id"].values().numel(), 1), self.user)

    def all_item_embeddings(self):
        return torch.ones(self.cfg.num_items + 1, 1)


@pytest.mark.parametrize("user, rank", [(1.0, 7), (math.nan, 10)])
def test_evaluate_counts_ties_against_the_target_and_ranks_a_diverged_model_last(user, rank):
    # 7 unseen items (2, 4, 6..10) tie with the target; NaN ranks it last
    s, ex = _relistening_user()
    m = evaluate(_ConstantScorer(10, user), s, ex, ks=(1, 10))
    assert m["mrr"] == pytest.approx(1 / (rank + 1))
    assert m["hr@1"] == 0.0 and m["hr@10"] == float(rank < 10)


def test_popularity_baseline_counts_ties_against_the_target_as_evaluate_does():
    # every rated item is rated once, so the unseen rated items tie with the target: user 1 (saw 1, 2; target 3)
    # has 4 and 5 level with it, user 2 (saw 4; target 5) has 1, 2 and 3; the never-rated items 6..10 rank below
    rows = [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    df = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "event_type": "listen",
                       "timestamp_ms": [T0_MS + i * 1000 for i in range(len(rows))], "played_ratio": np.nan})
    s = build_sequences(df, vocab=ItemVocab(np.arange(1, 11)))
    assert popularity_ranks(s, make_split(s, resolve_recipe(BASE_RECIPE, validation=False)).test).tolist() == [2, 3]


# ----------------------------------------------------------------------------------------------------------
# training + inference
# ----------------------------------------------------------------------------------------------------------


def test_train_end_to_end_and_checkpoint_resume(events, tmp_path):
    cfg = resolve_recipe(BASE_RECIPE, model="hstu", max_len=20, dim=16, blocks=1, negatives=16, batch_size=16, epochs=2, patience=0,
                      feedback_weight=0.5, checkpoint_dir=str(tmp_path / "ck"))
    seen = []
    first = train(events, cfg, progress=False, on_epoch=lambda e, m: seen.append(e))
    assert seen == [1, 2] and len(first.history) == 2
    assert {"hr@10", "ndcg@10", "mrr", "feedback_auc"} <= set(first.test_metrics)
    assert first.num_params == sum(p.numel() for p in first.model.parameters())
    resumed = train(events, cfg.replace(epochs=3), progress=False, on_epoch=lambda e, m: seen.append(e))
    assert seen == [1, 2, 3]  # only the new epoch ran
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="another config"):
        train(events, cfg.replace(dim=8, epochs=3), progress=False)


def test_train_keeps_the_ranking_its_metrics_are_the_means_of(events):
    # result.ranked holds each held-out split ranked by the weights kept: the reported metrics are its means, and a
    # fresh ranking of the kept weights gives the same ranks (so bench.quality --history need not rank again); the
    # validation ranks come from the best epoch, which here is not the last one
    cfg = resolve_recipe(BASE_RECIPE, model="hstu", max_len=20, dim=16, blocks=1, negatives=16, batch_size=16, epochs=6, patience=0,
                      lr=0.02, feedback_weight=0.5)
    result = train(events, cfg, progress=False)
    seqs = with_targets(build_sequences(events, vocab=result.vocab), cfg.targets)
    split = make_split(seqs, cfg)
    assert set(result.ranked) == {"valid", "test"}
    for name, examples, metrics in (("valid", split.valid, result.valid_metrics), ("test", split.test, result.test_metrics)):
        kept = result.ranked[name]
        fresh = rank_targets(result.model, seqs, examples, batch_size=cfg.eval_batch_size)
        assert np.array_equal(kept.event, fresh.event) and np.array_equal(kept.rank, fresh.rank)
        assert split_metrics(kept, len(result.vocab), feedback=True) == pytest.approx(metrics, nan_ok=True)
    assert result.best_epoch < cfg.epochs, "the test needs a best epoch before the last to check the kept ranking"


def test_a_catalogue_adds_never_seen_items_as_negatives_and_candidates(events):
    # the published MovieLens protocol ranks every movie of the item file, rated or not: items 900 and 901 have no
    # events, yet they get rows, are drawn as negatives (their rows move from the initialisation) and are ranked
    from models.train import seed_everything

    cfg = resolve_recipe(BASE_RECIPE, model="hstu", max_len=20, dim=16, blocks=1, negatives=16, batch_size=16, epochs=2, patience=0,
                      validation=False, targets="all")
    catalogue = np.array([900, 901, 100])  # 100 also has events: listed once in the vocabulary
    result = train(events, cfg, progress=False, catalogue=catalogue)
    assert len(result.vocab) == events["item_id"].nunique() + 2
    unseen = torch.from_numpy(result.vocab.encode([900, 901]))
    assert (unseen > 0).all()
    seed_everything(cfg.seed)  # what train() built before its first step
    initial = build_model(cfg.model_config(len(result.vocab))).item_embeddings(unseen)
    with torch.no_grad():
        trained = result.model.item_embeddings(unseen)
    assert not torch.allclose(initial, trained)
    # the control: with a zero learning rate nothing moves, so `initial` is what train() starts from
    still = train(events, cfg.replace(lr=0.0), progress=False, catalogue=catalogue).model
    with torch.no_grad():
        frozen = still.item_embeddings(unseen)
    torch.testing.assert_close(frozen, initial)
    # a model trained without the catalogue ranks fewer items, so every hit rate is at most as hard to get
    assert len(train(events, cfg, progress=False).vocab) == len(result.vocab) - 2
    with pytest.raises(ValueError, match="prebuilt sequences"):
        train(build_sequences(events), cfg, progress=False, catalogue=catalogue)


def test_quality_bench_ranks_the_item_files_catalogue(tmp_path):
    # ML-1M laid out as GroupLens ships it: movies.dat lists movie 99, which nobody rated; the bench ranks it too
    from bench.quality import main as quality

    rng = np.random.default_rng(0)
    lines = [f"{u}::{int(m)}::4::{978300000 + 60 * t}" for u in range(1, 21)
             for t, m in enumerate(rng.choice(np.arange(1, 31), size=12, replace=False))]
    (tmp_path / "ratings.dat").write_text("\n".join(lines) + "\n")
    (tmp_path / "movies.dat").write_text("".join(f"{m}::Movie {m} (2000)::Drama\n" for m in [*range(1, 31), 99]))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("max_len: 8\ndim: 16\nblocks: 1\nnegatives: 16\nbatch_size: 64\nepochs: 1\npatience: 0\n"
                   "validation: false\ntargets: all\n")
    out = quality(["--dataset", "ml-1m", "--dataset-dir", str(tmp_path), "--config", str(cfg)])
    assert (out["items"], out["unrated_items"]) == (31, 1)


@pytest.mark.parametrize(("dataset", "drop"), [("ml-100k", 1), ("ml-100k", 2), ("ml-20m", 1)])
def test_drop_last_removes_the_events_leave_one_out_would_hold_out(tmp_path, dataset, drop):
    # bench.drop_last writes a MovieLens copy whose sequences are the original's without each user's last `drop`
    # events, in the order models.data gives them: by time, equal times in file order (user 1's last two ratings
    # share a second, so file order decides which one is last). It finds the files where the loaders do (here in
    # data_dir/<name>), keeps a header line and copies the item file
    import gzip

    from bench.drop_last import main as drop_last
    from features.datasets import load_frame

    sep, ratings, items = {"ml-100k": ("\t", "u.data", "u.item"), "ml-20m": (",", "ratings.csv", "movies.csv")}[dataset]
    rng = np.random.default_rng(0)
    rows = [(u, int(m), 1 + t % 5, 880000000 + 60 * t) for u in range(2, 12)
            for t, m in enumerate(rng.choice(np.arange(1, 40), size=8, replace=False))]
    rows += [(1, m, 4, 880000000 + 60 * t) for t, m in enumerate([5, 6, 7, 8, 9])]
    rows += [(1, 11, 3, 880009999), (1, 10, 5, 880009999)]  # a tie at the end: 10 is user 1's last
    lines = (["userId,movieId,rating,timestamp"] if dataset == "ml-20m" else []) + [sep.join(map(str, r)) for r in rows]
    src = tmp_path / "src" / dataset
    src.mkdir(parents=True)
    (src / f"{ratings}.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    item_lines = {"ml-100k": [f"{m}|Movie {m} (1995)|01-Jan-1995||url|0" for m in range(1, 41)],
                  "ml-20m": ["movieId,title,genres", *(f"{m},Movie {m} (1995),Drama" for m in range(1, 41))]}[dataset]
    (src / items).write_text("\n".join(item_lines) + "\n")
    out = tmp_path / "out"
    counts = drop_last(["--dataset", dataset, "--dataset-dir", str(tmp_path / "src"), "--out", str(out), "--drop", str(drop)])
    assert counts == {"ratings": len(rows), "dropped": 11 * drop, "kept": len(rows) - 11 * drop, "users": 11}
    assert (out / items).read_text() == (src / items).read_text()  # the same catalogue

    def per_user(folder):
        seqs = build_sequences(load_frame(dataset, folder))
        raw = seqs.vocab.decode(seqs.items)
        return {int(u): raw[a:b].tolist() for u, a, b in zip(seqs.user_ids, seqs.offsets[:-1], seqs.offsets[1:])}

    before, after = per_user(tmp_path / "src"), per_user(out)
    assert before.keys() == after.keys() and all(after[u] == before[u][:-drop] for u in before)
    assert before[1][-2:] == [11, 10] and after[1][-1] == (11 if drop == 1 else 9)
    with pytest.raises(SystemExit):
        drop_last(["--dataset", dataset, "--dataset-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("kind", MODELS)
def test_bf16_autocast_trains_and_keeps_the_logits_in_fp32(events, kind):
    # autocast "auto" is bf16 on CUDA only; "bf16" forces it on the CPU, which exercises the same code path here
    from models.train import autocast

    assert not torch.is_autocast_enabled("cpu")
    with autocast("auto", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="unknown autocast mode"):
        autocast("fp8", torch.device("cpu"))
    cfg = resolve_recipe(BASE_RECIPE, model=kind, max_len=20, dim=16, blocks=1, negatives=16, batch_size=16, epochs=3, patience=0,
                      autocast="bf16", device="cpu")
    seqs = build_sequences(events)
    model = build_model(cfg.model_config(len(seqs.vocab)))
    batch = make_batch(seqs, leave_one_out(seqs, 20).train)
    linear_dtypes = []
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, o: linear_dtypes.append(o.dtype))
    with autocast("bf16", torch.device("cpu")):
        loss, _ = RecommenderTrain.from_config(model, cfg)(batch, torch.Generator().manual_seed(0))
    assert linear_dtypes and set(linear_dtypes) == {torch.bfloat16}  # the encoder's matmuls ran in bf16
    assert loss.dtype == torch.float32  # the sampled softmax in fp32
    result = train(events, cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("kind", MODELS)
def test_training_beats_untrained_model(kind):
    # 100 items: a user's history covers a fifth of the catalogue, so history filtering cannot make hr@10 easy
    ev = synthetic_events(users=60, items=100)
    cfg = resolve_recipe(BASE_RECIPE, model=kind, max_len=20, dim=16, blocks=1, negatives=16, batch_size=16, epochs=30, lr=5e-3, patience=0, dropout=0.0)
    result = train(ev, cfg, progress=False)
    seqs = build_sequences(ev)
    untrained = evaluate(build_model(cfg.model_config(len(seqs.vocab))), seqs, leave_one_out(seqs, cfg.max_len).test)
    assert untrained["hr@10"] < 0.25
    assert result.test_metrics["hr@10"] > max(0.4, 2 * untrained["hr@10"]), (result.test_metrics, untrained)


def test_configs_load():
    names = [p.stem for p in (Path(__file__).parents[1] / "models" / "configs").glob("*.yaml")]
    assert {"default", "hstu-ml1m", "hstu-large-ml1m", "sasrec-ml1m", "hstu-ml100k", "hstu-large-ml100k", "sasrec-ml100k"} <= set(names)
    for name in names:
        cfg = resolve_recipe(name)
        build_model(cfg.model_config(num_items=10))  # every config builds
    large = resolve_recipe("hstu-large-ml1m")
    assert (large.blocks, large.heads, large.attn_dim, large.linear_dim, large.dim) == (8, 2, 25, 25, 50)
    assert resolve_recipe("default", epochs=1).epochs == 1
    with pytest.raises(ValueError, match="unknown recipe keys"):
        resolve_recipe("default", nope=1)


def test_config_base_chain(tmp_path):
    # a shipped variant states only what it changes: the large size is hstu-ml1m with four keys changed
    small, large = asdict(resolve_recipe("hstu-ml1m")), asdict(resolve_recipe("hstu-large-ml1m"))
    assert {k for k in small if small[k] != large[k]} == {"blocks", "heads", "attn_dim", "linear_dim"}
    # a sweep file anywhere can start from a shipped name, or from a file beside it; later keys win
    (tmp_path / "wide.yaml").write_text("base: hstu-ml1m\ndim: 64\nepochs: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "wide-deep.yaml").write_text("base: ../wide.yaml\nblocks: 4\n")
    cfg = resolve_recipe(tmp_path / "sub" / "wide-deep.yaml", epochs=5)
    assert (cfg.dim, cfg.blocks, cfg.epochs, cfg.max_len) == (64, 4, 5, 200)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="recipe base cycle: a.yaml -> b.yaml -> a.yaml"):
        resolve_recipe(tmp_path / "a.yaml")
    (tmp_path / "typo.yaml").write_text("base: hstu-ml1m\nblock: 4\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['block'\]"):
        resolve_recipe(tmp_path / "typo.yaml")
    (tmp_path / "orphan.yaml").write_text("base: no-such-config\n")
    with pytest.raises(FileNotFoundError):
        resolve_recipe(tmp_path / "orphan.yaml")


@pytest.mark.parametrize("kind", MODELS)
def test_save_load_roundtrip_gives_identical_scores(seqs, kind, tmp_path):
    model = tiny_model(kind, num_items=len(seqs.vocab), feedback=True)
    rec = Recommender(model, seqs.vocab)
    histories = [
        {"item_ids": [100, 101, 102], "event_types": ["listen", "skip", "like"], "timestamps_ms": [T0_MS, T0_MS + 5000, T0_MS + 9000]},
        {"item_ids": [105, 106], "event_types": [1, 1], "timestamps_ms": [T0_MS, T0_MS + 1000]},
    ]
    before = rec.recommend(histories, k=5)
    rec.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "vocab.json", "state_dict.pt"}
    torch.load(tmp_path / "m" / "state_dict.pt", weights_only=True)  # pickle-free
    after = Recommender.load(tmp_path / "m").recommend(histories, k=5)
    assert [[i for i, _ in r] for r in before] == [[i for i, _ in r] for r in after]
    assert np.allclose([[s for _, s in r] for r in before], [[s for _, s in r] for r in after], atol=1e-6)


def test_recommend_semantics(seqs):
    rec = Recommender(tiny_model("hstu", num_items=len(seqs.vocab)), seqs.vocab)
    histories = [
        {"item_ids": [100, 101, 424242], "event_types": ["listen", "listen", "like"], "timestamps_ms": [T0_MS, T0_MS + 1, T0_MS + 2]},
        {"item_ids": [], "event_types": [], "timestamps_ms": []},
        {"item_ids": [999999], "event_types": ["listen"], "timestamps_ms": [T0_MS]},  # only unknown items
        {"item_ids": [100, 101]},  # types and times optional
    ]
    out = rec.recommend(histories, k=len(seqs.vocab))
    assert out[1] == [] and out[2] == []  # empty -> caller falls back to popularity
    ids = [i for i, _ in out[0]]
    assert 100 not in ids and 101 not in ids and len(ids) == len(seqs.vocab) - 2  # seen items excluded
    scores = [s for _, s in out[0]]
    assert scores == sorted(scores, reverse=True)
    # the unknown item is ignored: same result as without it (timestamps of the known items unchanged)
    alone = rec.recommend([{"item_ids": [100, 101], "event_types": ["listen", "listen"], "timestamps_ms": [T0_MS, T0_MS + 1]}], k=len(seqs.vocab))[0]
    assert np.allclose([s for _, s in alone], scores, atol=1e-6)  # batch-size independent up to float noise
    assert [i for i, _ in alone][:5] == ids[:5]
    with_seen = rec.recommend(histories[:1], k=len(seqs.vocab), exclude_seen=False)[0]
    assert {100, 101} <= {i for i, _ in with_seen}


def test_score_candidates_is_the_feedback_head_on_one_history_pass(seqs):
    rec = Recommender(tiny_model("hstu", num_items=len(seqs.vocab), feedback=True), seqs.vocab)
    h = {"item_ids": [100, 101, 102], "event_types": ["listen", "skip", "like"], "timestamps_ms": [T0_MS, T0_MS + 5, T0_MS + 9]}
    empty = {"item_ids": [999999], "event_types": ["listen"], "timestamps_ms": [T0_MS]}
    out = rec.score_candidates([h, empty, h], [[103, 104, 424242], [103], []], now_ms=T0_MS + 60_000)
    assert out[1] is None  # no known item: no user state, the caller keeps the retrieval order
    assert out[2] is not None and len(out[2]) == 0
    p = out[0]
    assert p.shape == (3,) and np.isnan(p[2]) and np.all((p[:2] > 0) & (p[:2] < 1))
    # the same as the head on the user state recommend() uses, candidate by candidate
    rows, users, _ = rec.user_embeddings([h], T0_MS + 60_000)
    for j, item in enumerate([103, 104]):
        e = rec.item_matrix[torch.from_numpy(rec.vocab.encode([item]))]
        with torch.inference_mode():
            assert abs(torch.sigmoid(rec.model.feedback_logits(users, e)).item() - p[j]) < 1e-6
    # scores do not depend on the other candidates or histories of the batch
    alone = rec.score_candidates([h], [[104]], now_ms=T0_MS + 60_000)[0]
    assert abs(alone[0] - p[1]) < 1e-6
    with pytest.raises(ValueError, match="no feedback head"):
        Recommender(tiny_model("hstu", num_items=len(seqs.vocab)), seqs.vocab).score_candidates([h], [[103]])


# ----------------------------------------------------------------------------------------------------------
# distributed (DistributedModelParallel, 2 processes on gloo)
# ----------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_model_parallel_two_ranks(events, tmp_path):
    """Two ranks on a MovieLens folder: ratings.dat, with movies.dat beside it listing three movies nobody rated;
    those join the catalogue as they do for encore train (events CSVs: tests/test_distributed_training.py)."""
    import os
    import subprocess
    import sys

    data = tmp_path / "ratings.dat"
    data.write_text("".join(f"{r.user_id}::{r.item_id}::4::{r.timestamp_ms // 1000}\n" for r in events.itertuples()))
    rated = sorted(events["item_id"].unique())
    listed = [*rated, *range(max(rated) + 1, max(rated) + 4)]
    (tmp_path / "movies.dat").write_text("".join(f"{i}::Movie {i} (2000)::Drama\n" for i in listed))
    out = tmp_path / "dmp_model"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "models.distributed", "--config", "default", "--data", str(data), "--epochs", "2", "--max-steps", "3",
        "--out", str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'model.embeddings.item': 'row_wise'" in proc.stdout, proc.stdout
    assert "dense in sync True" in proc.stdout, proc.stdout
    rec = Recommender.load(out)  # the gathered shards form an ordinary, servable model
    assert rec.config.num_items == events["item_id"].nunique() + 3  # the unrated movies are candidates too
    recs = rec.recommend([{"item_ids": [100, 101], "event_types": ["listen", "listen"], "timestamps_ms": [T0_MS, T0_MS + 1]}], k=5)
    assert len(recs[0]) == 5


def test_ann_index_agrees_with_the_exact_scan_and_filters_history():
    """Large catalogues use an HNSW index (faiss); on a small one forced onto it, results match exactly."""
    import pandas as pd

    from models.recommender import Recommender
    from models.recipe import resolve_recipe
    from models.train import train

    rng = np.random.default_rng(0)
    rows = [{"user_id": u, "item_id": int(rng.integers(0, 300)), "event_type": "listen", "timestamp_ms": 1_700_000_000_000 + 1000 * t,
             "played_ratio": 1.0} for u in range(40) for t in range(12)]
    result = train(pd.DataFrame(rows), resolve_recipe("default").replace(epochs=1, dim=16), progress=False)
    exact = result.recommender()
    approx = Recommender(exact.model, exact.vocab, ann_min_items=1)
    assert approx.index is not None and exact.index is None
    history = {"item_ids": [r["item_id"] for r in rows[:12]], "timestamps_ms": [r["timestamp_ms"] for r in rows[:12]]}
    e = exact.recommend([history], k=20)[0]
    a = approx.recommend([history], k=20)[0]
    assert [i for i, _ in a] == [i for i, _ in e]
    assert not set(i for i, _ in a) & set(history["item_ids"])


def test_learning_curves_from_quality_histories(tmp_path):
    # bench.quality --history files -> one PNG; runs without validation draw their test log
    import json

    from bench.curves import main as curves

    runs = []
    for name, split in (("hstu-ml1m", "test"), ("sasrec-ml100k", "valid")):
        history = [{"epoch": float(e), "loss": 3.0 / e, **({f"{split}_hr@10": 0.1 * e} if e % 2 == 0 else {})} for e in range(1, 7)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"config": name, "history": history}))
        runs.append(str(path))
    out = curves([*runs, "--published", "hstu-ml1m=0.3097", "--out", str(tmp_path / "img" / "curves.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        curves([*runs, "--published", "hstu-ml1m", "--out", str(tmp_path / "x.png")])


def test_learning_curves_draw_validation_or_the_test_log():
    from models.plots import curve_points

    selected = [{"epoch": 1.0, "valid_hr@10": 0.2}, {"epoch": 2.0, "valid_hr@10": 0.3, "test_hr@10": 0.25}]
    final = [{"epoch": 1.0}, {"epoch": 2.0, "test_hr@10": 0.24}]
    assert curve_points(selected, "hr@10") == ("valid", [(1, 0.2), (2, 0.3)])
    assert curve_points(selected, "hr@10", "test") == ("test", [(2, 0.25)])
    assert curve_points(final, "hr@10") == ("test", [(2, 0.24)])
    with pytest.raises(ValueError, match="auto, valid or test"):
        curve_points(final, "hr@10", "train")


def test_learning_curves_keep_every_run_of_a_shared_config_apart():
    from bench.curves import name_runs

    runs = {Path("hstu.json"): {"config": "hstu-ml1m", "history": [1]},
            Path("hstu-shuf1.json"): {"config": "models/configs/hstu-ml1m.yaml", "history": [2]},
            Path("sasrec.json"): {"config": "sasrec-ml1m", "history": [3]}}
    histories, lines = name_runs(runs, {"hstu-ml1m": 0.3097, "sasrec-ml1m": 0.2853})
    assert histories == {"hstu-ml1m (hstu)": [1], "hstu-ml1m (hstu-shuf1)": [2], "sasrec-ml1m": [3]}
    assert lines == {"hstu-ml1m (hstu)": 0.3097, "sasrec-ml1m": 0.2853}


def test_compare_pairs_seeds_and_replays_the_trainers_epoch_choice(tmp_path, capsys):
    # bench.compare: runs pair by seed; a budget keeps the first epoch with the best validation NDCG@10 among
    # the epochs it allows (models/train.py's rule) and reads that epoch's test log
    import json

    from scipy import stats

    from bench.compare import kept_at_budget, main as compare

    def history(valid, test):
        return [{"epoch": float(2 * i + 2), "valid_ndcg@10": v, "test_hr@10": t} for i, (v, t) in enumerate(zip(valid, test))]

    # epochs 2, 4, 6, 8: validation ties at 4 and 8 (the first stays), so budget 4..8 keeps epoch 4
    h = history([0.1, 0.3, 0.2, 0.3], [0.05, 0.20, 0.25, 0.30])
    assert kept_at_budget(h, 2)["hr@10"] == 0.05
    assert kept_at_budget(h, 8) == {"hr@10": 0.20, "valid_ndcg@10": 0.3, "epoch": 4.0}
    with pytest.raises(ValueError, match="log_test_every"):
        kept_at_budget([{"epoch": 2.0, "valid_ndcg@10": 0.1}], 10)

    hr_a, hr_b = [0.21, 0.20, 0.23], [0.20, 0.19, 0.20]
    side = {}
    for name, hrs in (("hstu", hr_a), ("sasrec", hr_b)):
        side[name] = []
        for seed, hr in zip((3, 1, 2), hrs):  # file order must not matter: pairing is by seed
            path = tmp_path / f"{name}-s{seed}.json"
            path.write_text(json.dumps({"config": f"models/configs/{name}-ml100k.yaml", "seed": seed, "hr@10": hr,
                                        "history": history([0.1, 0.2], [hr - 0.1, hr])}))
            side[name].append(str(path))
    out = compare([*side["hstu"], "--against", *side["sasrec"], "--budgets", "2", "4", "--metrics", "hr@10"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == out and last["a"] == "hstu-ml100k" and last["seeds"] == [1, 2, 3]
    at4 = last["budgets"]["4"][0]
    assert at4["ahead"] == 3 and at4["diff"] == pytest.approx(0.05 / 3)
    assert at4["p_t"] == pytest.approx(stats.ttest_rel(hr_a, hr_b).pvalue)
    assert last["budgets"]["2"][0]["mean_a"] == pytest.approx(sum(hr_a) / 3 - 0.1)

    png = tmp_path / "budget.png"
    compare([*side["hstu"], "--against", *side["sasrec"], "--budgets", "2", "4", "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # seeds that do not pair
        compare([*side["hstu"], "--against", *side["sasrec"][:2]])
    with pytest.raises(SystemExit):  # a plot by budget needs budgets
        compare([*side["hstu"], "--against", *side["sasrec"], "--plot", str(png)])


def test_compare_users_bootstraps_seeds_and_held_out_users_together(tmp_path, capsys):
    # --users pairs the configs target by target from the runs' ranks; the bootstrap interval must cover the
    # difference, and a difference carried by a handful of users must not read as significant however many
    # seeds agree on it (the seeds share the users)
    import json

    from bench.compare import main as compare

    rng = np.random.default_rng(0)
    users = 400
    valid_events = np.arange(users) * 10 + 5
    test_events = valid_events + 3  # each user's test target follows their validation target
    base = rng.integers(0, 300, size=users)

    def write(name, seed, test_ranks, valid_ranks):
        path = tmp_path / f"{name}-s{seed}.json"
        path.write_text(json.dumps({"config": f"{name}.yaml", "seed": seed, "hr@10": float((test_ranks < 10).mean()),
                                    "ranks": {"test": {"event": test_events.tolist(), "rank": test_ranks.tolist()},
                                              "valid": {"event": valid_events.tolist(), "rank": valid_ranks.tolist()}}}))
        return str(path)

    # clear: a is 5 places better for every user, on both splits (no seed noise at all)
    a = [write("a", s, np.maximum(base - 5, 0), base) for s in (1, 2, 3)]
    b = [write("b", s, base, base) for s in (1, 2, 3)]
    out = compare([*a, "--against", *b, "--users", "--metrics", "hr@10", "mrr"])
    rows = {(r["split"], r["metric"]): r for r in out["users"]}
    assert set(rows) == {(s, m) for s in ("test", "valid", "valid - test") for m in ("hr@10", "mrr")}
    mrr = rows["test", "mrr"]
    want = float(np.mean(1 / (np.maximum(base - 5, 0) + 1) - 1 / (base + 1)))
    assert mrr["diff"] == pytest.approx(want) and mrr["ci_low"] <= want <= mrr["ci_high"] and mrr["p"] < 0.01
    assert mrr["se_seeds"] == 0.0 and mrr["se_users"] > 0
    assert rows["valid", "mrr"]["diff"] == 0.0 and rows["valid", "mrr"]["p"] == 1.0
    assert rows["valid - test", "mrr"]["diff"] == pytest.approx(-want)
    assert "| test | mrr |" in capsys.readouterr().out

    # a lead that lives in 3 users of 400, repeated by all 5 seeds (every seed ahead, by the same amount):
    # resampling the users finds it is no evidence
    lucky = base.copy()
    lucky[:3] = 0
    worse = base.copy()
    worse[:3] = 50
    a = [write("a", s, lucky, base) for s in range(1, 6)]
    b = [write("b", s, worse, base) for s in range(1, 6)]
    out = compare([*a, "--against", *b, "--users", "--metrics", "mrr"])
    assert out["budgets"]["kept"] == []  # these files carry no mrr figure: only the per-target rows speak
    assert next(r for r in out["users"] if r["split"] == "test")["p"] > 0.05

    # runs that rank different targets cannot pair
    other = tmp_path / "c-s1.json"
    other.write_text(json.dumps({"config": "c.yaml", "seed": 1, "ranks": {"test": {"event": [1, 2], "rank": [0, 1]}}}))
    with pytest.raises(SystemExit):
        compare([a[0], "--against", str(other), "--users"])
    # nor runs over catalogues of different sizes (k is capped at the catalogue, as evaluate() caps it)
    small = json.loads(Path(a[0]).read_text()) | {"items": 50}
    other.write_text(json.dumps(small))
    with pytest.raises(SystemExit):
        compare([b[0], "--against", str(other), "--users"])


def test_quality_bench_reports_the_window_protocol_and_the_history_filtered_figures(tmp_path):
    # a seen_filter: window config: the JSON's main figures filter only the input window; history_filtered
    # ranks the same weights with every earlier item filtered, so it can only be at least as good (fewer
    # competitors per target), and strictly better here: max_len 8 leaves most of a user's items in the ranking
    from bench.quality import main as quality

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("max_len: 8\ndim: 16\nblocks: 1\nnegatives: 16\nbatch_size: 64\nepochs: 1\npatience: 0\n"
                   "validation: false\nseen_filter: window\ntargets: all\n")
    out = quality(["--config", str(cfg)])
    window, history = out, out["history_filtered"]
    assert all(history[k] >= window[k] for k in ("hr@10", "hr@50", "hr@200", "ndcg@10", "mrr"))
    assert history["mrr"] > window["mrr"]
    # targets: all ranks skips and dislikes too, so the figures also come per reaction, and they add up
    split = out["by_reaction"]
    share = split["positive_share"]
    assert 0 < share < 1
    for k in ("hr@10", "hr@50", "ndcg@10", "mrr"):
        assert share * split[f"positive_{k}"] + (1 - share) * split[f"negative_{k}"] == pytest.approx(out[k], abs=2e-4)


def test_quality_history_is_rewritten_every_epoch_so_a_stopped_run_keeps_its_curve(tmp_path, monkeypatch):
    # the run is stopped during its second epoch's test pass (as a kill or Ctrl-C would): the file holds the
    # first epoch, marked unfinished; a run that ends replaces it with every epoch and the final figures
    import json

    import models.train
    from bench.quality import main as quality

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("max_len: 8\ndim: 16\nblocks: 1\nnegatives: 16\nbatch_size: 64\nepochs: 3\npatience: 0\n"
                   "validation: false\ntargets: all\n")
    path = tmp_path / "history.json"
    real_evaluate, calls = models.train.evaluate, []

    def stopped_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(models.train, "evaluate", stopped_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        quality(["--config", str(cfg), "--history", str(path)])
    partial = json.loads(path.read_text())
    assert partial["finished"] is False and partial["config"] == str(cfg)
    assert [h["epoch"] for h in partial["history"]] == [1.0] and "test_hr@10" in partial["history"][0]

    monkeypatch.setattr(models.train, "evaluate", real_evaluate)
    quality(["--config", str(cfg), "--history", str(path)])
    done = json.loads(path.read_text())
    assert done["finished"] is True and [h["epoch"] for h in done["history"]] == [1.0, 2.0, 3.0]
    assert 0.0 <= done["hr@10"] <= 1.0 and not list(tmp_path.glob("*.tmp"))
    # every test target's rank under the kept weights, in event order; their hits are the reported HR@10
    ranks = done["ranks"]
    assert set(ranks) == {"test"}  # validation: false, nothing else ranked
    events, test_ranks = np.array(ranks["test"]["event"]), np.array(ranks["test"]["rank"])
    assert len(test_ranks) == len(events) > 0 and np.all(np.diff(events) > 0)
    assert round(float((test_ranks < 10).mean()), 4) == done["hr@10"]


_REALLOC_PROBE = """
import resource, sys, torch
from models.cpu_memory import retain_freed_memory
from models.hstu import HSTU, HSTUConfig
if sys.argv[1] == "tuned":
    assert retain_freed_memory()
elif sys.argv[1] == "declined":  # a GPU trainer, or a config with retain_cpu_memory: false
    assert not retain_freed_memory("cuda") and not retain_freed_memory("cpu", enabled=False)
torch.manual_seed(0)
B, n = 128, 200  # an ML-1M batch for HSTU-large: [128, 2, 200, 200] attention maps, 40 MB each
model = HSTU(HSTUConfig(dim=50, blocks=1, heads=2, attn_dim=25, linear_dim=25, max_len=200, dropout=0.2, num_time_buckets=128,
                         rab=True, attention="silu", gating=True))
x = torch.randn(B * n, 50, requires_grad=True)
offsets = torch.arange(0, B * n + 1, n)
t = torch.arange(B * n) * 60
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, offsets, t, t + 60).square().sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="glibc malloc tuning is Linux-only")
def test_training_steps_reuse_freed_tensor_memory_instead_of_mapping_it_again():
    """By default glibc munmaps every freed activation above 32 MiB and the next step page-faults it back in (and
    the kernel zeroes it); after ``retain_freed_memory`` (models.train calls it) a step reuses the last one's pages."""
    import os
    import subprocess
    import sys

    def faults_per_step(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
        out = subprocess.run([sys.executable, "-c", _REALLOC_PROBE, mode], capture_output=True, text=True, env=env,
                             cwd=Path(__file__).resolve().parent.parent, check=True)
        return int(out.stdout.split()[-1])

    default, tuned = faults_per_step("default"), faults_per_step("tuned")
    assert default > 20_000  # the control: left alone, malloc maps the attention maps afresh every step
    assert tuned < default / 4, (default, tuned)  # measured: 0-9k against 76k-110k
    declined = faults_per_step("declined")
    assert declined > 20_000 and declined > 4 * tuned, (declined, tuned)  # asked not to, it leaves malloc alone
