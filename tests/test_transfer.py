"""Cross-domain transfer (models/transfer.py, bench/transfer.py) on three tiny synthetic domains."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bench.transfer import paired_gains, parse_size
from features.datasets import AMAZON_END_MS, EVENT_COLUMNS
from models.data import ItemVocab, build_sequences
from models.recipe import resolve_recipe
from models.recommender import build_model
from models.train import make_split, train
from models.transfer import (ITEM_TABLE, DOMAIN_STRIDE, WarmStart, copy_pretrained, finetune_frame, qualify,
                             run_transfer, three_domain_corpus, unqualify)

DAY_MS = 86_400_000
TINY = dict(dim=8, blocks=1, max_len=8, batch_size=16, negatives=8, epochs=1, eval_every=1, device="cpu",
            eval_batch_size=64)


def domain_frame(name: str, users: int, items: int, seed: int, unique_items: bool = False) -> pd.DataFrame:
    """Sequences in the loader's frame format: each user walks a few steps through a ring of items (a pattern
    worth learning); with ``unique_items`` each user also ends with an item nobody else has (1000 + user)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, users + 1):
        start, length = int(rng.integers(1, items + 1)), int(rng.integers(4, 8))
        seq = [(start + 2 * step - 1) % items + 1 for step in range(length)]
        if unique_items:
            seq.append(1000 + user)
        for pos, item in enumerate(seq):
            rows.append({"event_id": f"amazon-{name}-{user}-{pos}", "user_id": user, "item_id": item,
                         "event_type": "listen", "timestamp_ms": AMAZON_END_MS - (len(seq) - pos) * DAY_MS})
    frame = pd.DataFrame(rows)
    for column in EVENT_COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame[EVENT_COLUMNS].sort_values(["timestamp_ms", "user_id"], kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return {"beauty": domain_frame("beauty", 40, 15, 0, unique_items=True),
            "sports": domain_frame("sports", 30, 12, 1), "toys": domain_frame("toys", 30, 10, 2)}


@pytest.fixture(scope="module")
def corpus(frames):
    return three_domain_corpus(frames, target="beauty", target_share=0.5, seed=0)


def test_target_users_never_reach_pretraining(frames, corpus):
    beauty = corpus.domain_index("beauty")
    assert len(corpus.target_users) == 20
    domain, _ = unqualify(corpus.target_users)
    assert set(domain) == {beauty}
    pre_users = set(corpus.pretrain["user_id"])
    assert not pre_users & set(corpus.target_users)
    # no event of theirs in any form: not by user id, not by event id
    target_events = corpus.events[corpus.events["user_id"].isin(corpus.target_users)]
    assert not set(target_events["event_id"]) & set(corpus.pretrain["event_id"])
    assert len(corpus.pretrain) + len(target_events) == len(corpus.events) == sum(len(f) for f in frames.values())
    # the other domains whole, the target domain's other users whole; ids qualified apart
    for name in ("sports", "toys"):
        index = corpus.domain_index(name)
        assert (unqualify(corpus.pretrain["item_id"].to_numpy())[0] == index).sum() == len(frames[name])
    assert corpus.pretrain["user_id"].nunique() == 20 + 30 + 30
    assert np.array_equal(qualify([7], beauty), [(beauty + 1) * DOMAIN_STRIDE + 7])
    # the draw is the seed's; another seed holds out other users
    again = three_domain_corpus(frames, target="beauty", target_share=0.5, seed=0)
    assert np.array_equal(again.target_users, corpus.target_users)
    assert not np.array_equal(three_domain_corpus(frames, seed=1).target_users, corpus.target_users)
    part = finetune_frame(corpus, 0.5, seed=0)
    assert set(part["user_id"]) <= set(corpus.target_users) and part["user_id"].nunique() == 10
    # whole sequences
    assert len(part) == corpus.events["user_id"].isin(part["user_id"].unique()).sum()
    with pytest.raises(ValueError, match="target domain"):
        three_domain_corpus(frames, target="books")


def test_warm_start_copies_matching_rows_and_counts_unseen(corpus):
    cfg = resolve_recipe("hstu-beauty", **TINY)
    pre = train(corpus.pretrain, cfg, progress=False)
    frame = finetune_frame(corpus, 1.0, seed=0)
    # lr 0: the weights stay as initialised, so the result shows exactly what the warm start wrote
    still = cfg.replace(lr=0.0, seed=3)
    warm = WarmStart(pre.model, pre.vocab)
    tuned = train(frame, still, progress=False, catalogue=corpus.target_items, init=warm)
    fresh = train(frame, still, progress=False, catalogue=corpus.target_items)

    assert np.array_equal(tuned.vocab.raw_ids, corpus.target_items)  # the Beauty catalogue only
    seen = np.isin(corpus.target_items, pre.vocab.raw_ids)
    # every target user's own item (1000 + user) is in no pre-training event
    assert warm.report.items == len(corpus.target_items)
    assert warm.report.unseen == int((~seen).sum()) == len(corpus.target_users)
    assert warm.report.copied == int(seen.sum())
    table, pre_table, fresh_table = (m.state_dict()[ITEM_TABLE] for m in (tuned.model, pre.model, fresh.model))
    for dense, raw in enumerate(tuned.vocab.raw_ids, start=1):
        if raw in pre.vocab.raw_ids:
            assert torch.equal(table[dense], pre_table[pre.vocab.encode([raw])[0]]), raw
        else:  # kept its fresh initialisation: the from-scratch run's row of the same seed
            assert torch.equal(table[dense], fresh_table[dense]), raw
    for key, value in pre.model.state_dict().items():
        if key != ITEM_TABLE:
            assert torch.equal(tuned.model.state_dict()[key], value), key
    assert not torch.equal(tuned.model.encoder.blocks[0].uvqk.weight, fresh.model.encoder.blocks[0].uvqk.weight)


def test_warm_start_refuses_another_architecture(corpus):
    cfg = resolve_recipe("hstu-beauty", **TINY)
    source = build_model(cfg.model_config(5))
    other = build_model(cfg.replace(dim=12).model_config(5))
    vocab = ItemVocab(np.arange(1, 6))
    with pytest.raises(ValueError, match="differs beyond its catalogue"):
        copy_pretrained(other, vocab, source, vocab)


def test_train_hook_is_called_once_and_changes_nothing_unused(corpus):
    frame = finetune_frame(corpus, 1.0, seed=0)
    cfg = resolve_recipe("hstu-beauty", **TINY)
    calls = []

    def record(model, vocab):  # an init that only looks
        calls.append((type(model).__name__, vocab))

    plain = train(frame, cfg, progress=False, catalogue=corpus.target_items)
    looked = train(frame, cfg, progress=False, catalogue=corpus.target_items, init=record)
    assert len(calls) == 1 and calls[0][0] == "SequentialRecommender" and calls[0][1] == plain.vocab
    assert plain.test_metrics == looked.test_metrics
    for key, value in plain.model.state_dict().items():
        assert torch.equal(looked.model.state_dict()[key], value), key


def test_pretraining_cut_short_counts_the_tokens_it_processed(corpus):
    rows = run_transfer(corpus, [{"dim": 8}], [0], 0.5, "hstu-beauty", pretrain_epochs=1, finetune_epochs=1,
                        pretrain_max_steps=2, overrides={k: v for k, v in TINY.items() if k != "dim"},
                        log=lambda _: None)
    pre, full = rows[0], -(-rows[0].windows // 16)
    assert pre.steps == 2 < full
    cfg = resolve_recipe("hstu-beauty", **TINY)
    inputs = make_split(build_sequences(corpus.pretrain), cfg).train.num_inputs  # one full epoch's tokens
    assert pre.tokens == round(inputs * 2 / full) < inputs


def test_run_transfer_end_to_end_with_paired_gains(corpus):
    sizes = [parse_size("dim=8"), parse_size("dim=12")]
    logs: list[str] = []
    overrides = {k: v for k, v in TINY.items() if k not in ("dim", "epochs")}
    rows = run_transfer(corpus, sizes, [0, 1], 0.5, "hstu-beauty", pretrain_epochs=1, finetune_epochs=2,
                        overrides=overrides, log=logs.append)
    assert [(r.size, r.arm, r.seed) for r in rows] == [
        (s, arm, seed) for s in ("dim=8", "dim=12")
        for arm, seed in [("pretrain", 0), ("finetune", 0), ("scratch", 0), ("finetune", 1), ("scratch", 1)]]
    tuned = [r for r in rows if r.arm != "pretrain"]
    # same fine-tuning compute on both arms: same steps and tokens, the same test targets
    for ft, sc in zip(tuned[::2], tuned[1::2]):
        assert ft.steps == sc.steps and ft.tokens == sc.tokens and ft.epochs == sc.epochs == 2
        assert np.array_equal(ft.ranked.event, sc.ranked.event)
        assert ft.warm_start.unseen > 0 and sc.warm_start is None
        assert ft.items == sc.items == len(corpus.target_items)
    pre = [r for r in rows if r.arm == "pretrain"]
    assert pre[0].non_embedding_params < pre[1].non_embedding_params and all(r.compute > 0 for r in pre)
    assert 6 * pre[0].non_embedding_params * pre[0].tokens == pre[0].compute
    assert pre[0].steps == -(-pre[0].windows // 16)  # one full epoch of batches of 16

    stats = paired_gains(rows, draws=500)
    assert stats["sizes"] == ["dim=8", "dim=12"]
    assert [(g["size"], g["metric"]) for g in stats["gains"]] == [
        ("dim=8", "hr@10"), ("dim=8", "ndcg@10"), ("dim=12", "hr@10"), ("dim=12", "ndcg@10")]
    for g in stats["gains"]:
        assert g["seeds"] == 2 and g["users"] == 10
        assert g["gain"] == pytest.approx(g["finetune"] - g["scratch"], abs=1e-9)
        assert g["ci_low"] <= g["gain"] <= g["ci_high"]
    growth = {g["metric"]: g for g in stats["growth"]}
    assert growth["hr@10"]["difference"] == pytest.approx(
        stats["gains"][2]["gain"] - stats["gains"][0]["gain"], abs=1e-9)
    assert all("ranked" not in r.record() for r in rows)  # JSON-ready: the ranks stay in memory
