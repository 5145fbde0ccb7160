"""VISTA (models/vista.py): the summariser's exact incremental state, the downstream model's causality and its
use of the whole history, training through ``models.train.train``, persistence and the serving cost."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.data import ItemVocab, build_sequences, leave_one_out, make_batch, older_prefix
from models.recipe import resolve_recipe
from models.recommender import ModelConfig, Recommender, build_model
from models.train import train
from models.vista import Summariser, SummariserConfig, Summary, SummaryState, state_bytes, summarise_events

T0_S = 1_600_000_000
YEAR_S = 365 * 86_400
K, D, V = 8, 16, 50
VOCAB = ItemVocab(1000 + np.arange(V))  # the raw ids of ``_frame``'s catalogue


def vista_config(**changes: object) -> ModelConfig:
    """A small vista ModelConfig over the vista recipe (its defaults live in the recipes)."""
    cfg = resolve_recipe("vista", dim=D, heads=2, vista_tokens=K, max_len=12, dropout=0.0).model_config(V)
    return dataclasses.replace(cfg, **changes)


def random_events(rng: np.random.Generator, n: int, t0: int = T0_S, span_s: int = 3 * YEAR_S):
    """n events of one user: dense item ids 1..V, event codes 1..6, sorted seconds over ``span_s``."""
    return (rng.integers(1, V + 1, n), rng.integers(1, 7, n), np.sort(t0 + rng.integers(0, span_s, n)))


@pytest.fixture(scope="module")
def summariser() -> Summariser:
    torch.manual_seed(0)
    return Summariser(SummariserConfig(num_items=V, dim=D, tokens=K, dropout=0.0)).eval()


def _history(items: np.ndarray, types: np.ndarray, seconds: np.ndarray) -> dict:
    return {"item_ids": items, "event_types": types, "timestamps_ms": seconds * 1000}


# ----------------------------------------------------------------------------------------------------------
# the summariser
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_incremental_update_equals_a_pass_over_all_events(summariser) -> None:
    rng = np.random.default_rng(0)
    users = [random_events(rng, n) for n in (0, 1, 37, 300)]  # an empty user, one event, and longer ones
    full = summarise_events(summariser, *[[u[f] for u in users] for f in range(3)])
    # the same events in four rounds of arrivals, cut at these points (the first user gets none at all; some
    # rounds bring a user nothing)
    cuts = [(0, 0, 0, 0, 0), (0, 0, 1, 1, 1), (0, 5, 20, 30, 37), (0, 150, 150, 299, 300)]
    state = summariser.init_state(len(users))
    for r in range(4):
        parts = [[u[f][c[r]:c[r + 1]] for u, c in zip(users, cuts)] for f in range(3)]
        state = summarise_events(summariser, *parts, state=state)

    assert torch.equal(state.count, torch.tensor([0, 1, 37, 300]))
    assert torch.equal(state.last_time, full.last_time)
    assert torch.isinf(state.log_mass[0]).all() and not torch.isinf(state.log_mass[1:]).any()
    torch.testing.assert_close(state.log_mass[1:], full.log_mass[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.pooled, full.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summariser.tokens(state), summariser.tokens(full), atol=1e-5, rtol=1e-5)
    # the decays are real: a one-week half-life query weighs a three-year history unlike a no-decay one
    assert not torch.allclose(full.pooled[3, 0], full.pooled[3, 3], atol=1e-3)


@torch.no_grad()
def test_decay_favours_recent_events_and_only_it_does(summariser) -> None:
    """One item listened to long ago, another recently: the 7-day queries weigh the recent one; moving the
    whole history in time (the same gaps) changes the pooled values of no query (up to the time features)."""
    old, new = np.array([3] * 20 + [9] * 20), np.full(40, 1)
    t = np.r_[T0_S + np.arange(20) * 3600, T0_S + YEAR_S + np.arange(20) * 3600]
    st = summarise_events(summariser, [old], [new], [t])
    only_new = summarise_events(summariser, [old[20:]], [new[20:]], [t[20:]])
    weekly = torch.arange(K) % 4 == 3  # DECAY_HALF_LIVES_DAYS[3] = 7 days
    torch.testing.assert_close(st.pooled[0, weekly], only_new.pooled[0, weekly], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(st.pooled[0, ~weekly], only_new.pooled[0, ~weekly], atol=1e-3)


@torch.no_grad()
def test_state_is_fixed_size_and_round_trips(summariser) -> None:
    rng = np.random.default_rng(1)
    users = [random_events(rng, n) for n in (10, 10_000)]
    state = summarise_events(summariser, *[[u[f] for u in users] for f in range(3)])
    records = state.to_bytes()
    assert [len(r) for r in records] == [state_bytes(K, D)] * 2  # 2 K D + 4 K + 16 bytes for 10 or 10k events
    back = SummaryState.from_bytes(records, K, D)
    assert torch.equal(back.count, state.count) and torch.equal(back.last_time, state.last_time)
    torch.testing.assert_close(back.log_mass, state.log_mass)
    torch.testing.assert_close(summariser.tokens(back), summariser.tokens(state), atol=2e-3, rtol=2e-3)  # fp16 P
    # and it keeps updating after the round trip exactly as the state it came from
    more = random_events(rng, 5, t0=int(state.last_time.max()) + 1, span_s=1000)
    a = summarise_events(summariser, [more[0]] * 2, [more[1]] * 2, [more[2]] * 2, state=back)
    b = summarise_events(summariser, [more[0]] * 2, [more[1]] * 2, [more[2]] * 2, state=state)
    torch.testing.assert_close(a.pooled, b.pooled, atol=2e-3, rtol=2e-3)
    assert torch.equal(a.count, torch.tensor([15, 10_005]))
    # the tokens, as the online store keeps them: K x D fp16 + T, also constant in history length
    summary = summariser.summarise(state)
    tokens = summary.to_bytes()
    assert [len(r) for r in tokens] == [2 * K * D + 16] * 2
    again = Summary.from_bytes(tokens, K, D)
    torch.testing.assert_close(again.tokens, summary.tokens, atol=2e-3, rtol=2e-3)
    assert torch.equal(again.last_time, summary.last_time) and torch.equal(again.count, summary.count)


def test_summariser_version_is_stable_and_follows_the_weights(summariser) -> None:
    version = summariser.version()
    assert len(version) == 12 and version == summariser.version()
    other = Summariser(summariser.cfg)
    other.load_state_dict(summariser.state_dict())
    assert other.version() == version
    with torch.no_grad():
        other.queries[0, 0] += 1e-3
    assert other.version() != version


# ----------------------------------------------------------------------------------------------------------
# the batch's older prefix
# ----------------------------------------------------------------------------------------------------------


def _frame(users: int = 12, items: int = V, seed: int = 0, lengths: tuple[int, int] = (5, 60)) -> pd.DataFrame:
    """Users who cycle through a personal set of 6 items (learnable from far back); listens, some skips."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        favourites = rng.choice(items, 6, replace=False)
        t = T0_S * 1000 + int(rng.integers(0, 10**9))
        for i in range(int(rng.integers(*lengths))):
            t += int(rng.integers(60_000, 86_400_000))
            rows.append((u, 1000 + int(favourites[i % 6]), "skip" if i % 7 == 6 else "listen", t, float("nan")))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp_ms", "played_ratio"])


def test_make_batch_carries_each_windows_older_prefix_only_when_asked() -> None:
    seqs = build_sequences(_frame())
    split = leave_one_out(seqs, 10)
    plain = make_batch(seqs, split.test)
    assert plain.older is None and plain.older_timestamps is None  # other models' batches are as before
    batch = make_batch(seqs, split.test, older_events=0)
    for name in ("timestamps", "target_ids", "rank_mask", "lengths"):
        assert torch.equal(getattr(batch, name), getattr(plain, name))
    owner = np.searchsorted(seqs.offsets, split.test.start, side="right") - 1
    expected = split.test.start - seqs.offsets[owner]
    assert batch.older["item_id"].lengths().tolist() == expected.tolist()
    first = seqs.offsets[owner]
    want = np.concatenate([seqs.items[a:b] for a, b in zip(first, split.test.start)])
    assert batch.older["item_id"].values().tolist() == want.tolist()
    capped = make_batch(seqs, split.test, older_events=3)
    assert capped.older["item_id"].lengths().tolist() == np.minimum(expected, 3).tolist()
    lo, hi = older_prefix(seqs, split.test.start, 3)
    assert capped.older_timestamps.tolist() == np.concatenate([seqs.timestamps[a:b] for a, b in zip(lo, hi)]).tolist()


# ----------------------------------------------------------------------------------------------------------
# the downstream model
# ----------------------------------------------------------------------------------------------------------


def _model(**changes: object):
    torch.manual_seed(0)
    return build_model(vista_config(**changes)).eval()


@torch.no_grad()
def test_recent_positions_are_causal_and_every_position_sees_the_summary() -> None:
    model = _model()
    seqs = build_sequences(_frame(lengths=(30, 40)))
    ex = leave_one_out(seqs, 12).test
    batch = make_batch(seqs, ex, older_events=0)
    base = model(batch.features, batch.timestamps, batch.query_timestamps, batch.older, batch.older_timestamps)
    # change the last input event of every window: earlier positions do not move, the last one does
    items = batch.features["item_id"].values().clone()
    last = batch.offsets[1:] - 1
    items[last] = items[last] % V + 1
    feats = type(batch.features).from_lengths_sync(keys=["item_id", "event_type"], values=torch.cat(
        [items, batch.features["event_type"].values()]), lengths=torch.cat([batch.lengths, batch.lengths]))
    moved = model(feats, batch.timestamps, batch.query_timestamps, batch.older, batch.older_timestamps)
    earlier = torch.ones(len(items), dtype=torch.bool)
    earlier[last] = False
    torch.testing.assert_close(moved[earlier], base[earlier], atol=1e-6, rtol=0)
    assert not torch.allclose(moved[last], base[last], atol=1e-4)
    # change one older event of every window: every position, the first included, moves
    old_items = batch.older["item_id"].values().clone()
    old_items[batch.older["item_id"].offsets()[:-1]] = old_items[batch.older["item_id"].offsets()[:-1]] % V + 1
    lengths = batch.older["item_id"].lengths()
    older = type(batch.older).from_lengths_sync(keys=["item_id", "event_type"], values=torch.cat(
        [old_items, batch.older["event_type"].values()]), lengths=torch.cat([lengths, lengths]))
    shifted = model(batch.features, batch.timestamps, batch.query_timestamps, older, batch.older_timestamps)
    first = batch.offsets[:-1]
    assert ((shifted[first] - base[first]).norm(dim=1) > 1e-7).all()  # small at initialisation, but not 0
    with pytest.raises(ValueError, match="older events"):
        model(batch.features, batch.timestamps, batch.query_timestamps)  # a vista batch without its prefix


@torch.no_grad()
def test_a_user_without_older_events_reads_no_summary() -> None:
    """Nothing before the window: the K tokens are masked out, so no summariser weight can change the answer."""
    model = _model()
    rec = Recommender(model, VOCAB)
    rng = np.random.default_rng(4)
    short, long = random_events(rng, 10), random_events(rng, 40)  # max_len 12: only the second has older events
    hs = [_history(VOCAB.raw_ids[e[0] - 1], e[1], e[2]) for e in (short, long)]
    _, before, _ = rec.user_embeddings(hs)
    with torch.no_grad():
        for p in model.summariser.parameters():
            p.add_(0.5 * torch.randn_like(p))
    _, after, _ = rec.user_embeddings(hs)
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=0)
    assert not torch.allclose(after[1], before[1], atol=1e-4)


@torch.no_grad()
def test_batch_summaries_equal_per_user_summaries() -> None:
    """The training path (``Batch.older`` through the model) summarises exactly what the serving path does."""
    model = _model()
    seqs = build_sequences(_frame(lengths=(30, 40)))
    ex = leave_one_out(seqs, 12).test
    batch = make_batch(seqs, ex, older_events=0)
    via_batch = model.summarise_older(batch.older, batch.older_timestamps)
    first, stop = older_prefix(seqs, ex.start)
    per_user = [summarise_events(model.summariser, [seqs.items[a:b]], [seqs.event_types[a:b]], [seqs.timestamps[a:b]])
                for a, b in zip(first, stop)]
    tokens = torch.cat([model.summariser.tokens(s) for s in per_user])
    torch.testing.assert_close(via_batch.tokens, tokens, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_user_embeddings_read_the_whole_history_or_a_cached_summary() -> None:
    rec = Recommender(_model(), VOCAB)
    rng = np.random.default_rng(2)
    items, types, seconds = random_events(rng, 200)
    raw = rec.vocab.raw_ids[items - 1]
    h = _history(raw, types, seconds)
    _, user, _ = rec.user_embeddings([h])
    # an older event (outside the last max_len) changes the answer: the whole history is read
    changed = raw.copy()
    changed[0] = rec.vocab.raw_ids[(items[0] % V)]
    _, other, _ = rec.user_embeddings([_history(changed, types, seconds)])
    assert not torch.equal(user, other)  # (small at initialisation; a model reading max_len events gives equal ones)
    # a cached state of the older events gives the same answer; so do its tokens; the older events are then not read
    cut = 200 - rec.config.max_len
    state = rec.summarise([_history(raw[:cut], types[:cut], seconds[:cut])])
    _, cached, _ = rec.user_embeddings([h], summaries=[state])
    torch.testing.assert_close(cached, user, atol=1e-5, rtol=1e-5)
    _, from_tokens, _ = rec.user_embeddings([_history(changed, types, seconds)],
                                            summaries=[rec.model.summariser.summarise(state)])
    torch.testing.assert_close(from_tokens, user, atol=1e-5, rtol=1e-5)
    # an incrementally refreshed state (two arrivals) serves the same user as well
    half = rec.summarise([_history(raw[:70], types[:70], seconds[:70])])
    refreshed = rec.summarise([_history(raw[70:cut], types[70:cut], seconds[70:cut])], half)
    _, again, _ = rec.user_embeddings([h], summaries=[refreshed])
    torch.testing.assert_close(again, user, atol=1e-5, rtol=1e-5)


def test_serving_cost_does_not_grow_with_history_once_summarised() -> None:
    torch.set_num_threads(1)
    rec = Recommender(_model(max_len=50), VOCAB)
    rng = np.random.default_rng(3)
    short = random_events(rng, 60)
    long = random_events(rng, 10_000)
    to_h = lambda e: _history(rec.vocab.raw_ids[e[0] - 1], e[1], e[2])  # noqa: E731
    states = [rec.summarise([to_h(tuple(x[:-50] for x in e))]) for e in (short, long)]

    # The three calls are timed in the same rounds, one after the other, and each by the CPU time of this thread
    # (torch has one intra-op thread: the work runs here): other jobs on a shared box then neither stretch one
    # call's figure (they take the core, not this thread's CPU seconds) nor land on one kind of call only (a
    # busy spell hits a round's three calls alike). The best of the rounds drops what is left (cache misses).
    calls = {"short": lambda: rec.recommend([to_h(short)], k=10, summaries=[states[0]]),
             "long": lambda: rec.recommend([to_h(long)], k=10, summaries=[states[1]]),
             # without the cache: 10,000 events summarised on the spot
             "uncached": lambda: rec.recommend([to_h(long)], k=10)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(18):
        for name, call in calls.items():
            t = time.thread_time()
            call()
            if round_ >= 3:  # the first rounds warm up
                times[name].append(time.thread_time() - t)
    t_short, t_long, t_uncached = (min(times[name]) for name in calls)
    assert t_long < 1.5 * t_short + 2e-3, (t_short, t_long)  # the long one only encodes and sorts its raw ids
    assert t_uncached > t_long, (t_long, t_uncached)


# ----------------------------------------------------------------------------------------------------------
# training, persistence, configs
# ----------------------------------------------------------------------------------------------------------


def test_train_runs_reduces_loss_and_trains_the_summariser(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = resolve_recipe("vista", dim=D, heads=2, vista_tokens=K, max_len=8, epochs=4, batch_size=8, lr=0.005,
                         eval_batch_size=16, vista_train_older=20, dropout=0.0)
    torch.manual_seed(0)
    untrained = build_model(cfg.model_config(V)).summariser.state_dict()
    result = train(_frame(users=24), cfg, progress=False, catalogue=VOCAB.raw_ids)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    assert result.model.summariser is not None
    trained = result.model.summariser.state_dict()
    assert not torch.equal(trained["queries"], untrained["queries"])  # gradients reached the pooling

    rec = result.recommender()
    path = rec.save(tmp_path / "vista")
    back = Recommender.load(path)
    assert back.summariser_version == rec.summariser_version == result.model.summariser.version()
    hist = _frame(users=3, seed=9)
    histories = [{"item_ids": g.item_id.to_numpy(), "event_types": g.event_type.tolist(),
                  "timestamps_ms": g.timestamp_ms.to_numpy()} for _, g in hist.groupby("user_id")]
    assert back.recommend(histories, k=5) == rec.recommend(histories, k=5)
    # a model whose metadata names another summariser is refused
    import json
    config = json.loads((path / "config.json").read_text())
    config["metadata"]["summariser_version"] = "0" * 12
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="summariser"):
        Recommender.load(path)


def test_configs_before_vista_load_as_other_models() -> None:
    cfg = resolve_recipe("hstu").model_config(V)
    assert cfg.vista_tokens == 0 and not cfg.reads_older
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "vista_tokens"}  # saved before VISTA
    assert ModelConfig.from_dict(old) == cfg
    assert build_model(cfg).summariser is None
    assert resolve_recipe("hstu").train_older_events() is None
    assert resolve_recipe("vista").train_older_events() == 0
    with pytest.raises(ValueError, match="vista_tokens"):
        resolve_recipe("vista", vista_tokens=0)


# ----------------------------------------------------------------------------------------------------------
# the candidate's target attention to the tokens (vista_target_attention)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_token_target_attention_scores_per_user_and_item() -> None:
    model = _model(vista_target_attention=True)
    scorer = model.token_scorer
    assert scorer is not None and model.summariser.mass_w is not None
    seqs = build_sequences(_frame(lengths=(30, 40)))
    batch = make_batch(seqs, leave_one_out(seqs, 12).test, older_events=0)
    summary = model.summarise_older(batch.older, batch.older_timestamps)
    items = model.all_item_embeddings()
    assert torch.count_nonzero(scorer(summary, items)) == 0  # W_v starts at 0: an untrained scorer adds nothing
    torch.nn.init.normal_(scorer.value.weight)
    scores = scorer(summary, items)  # [B, V + 1]
    rows = torch.arange(len(summary.count)).repeat_interleave(V + 1)
    pairs = scorer.pairs(summary, rows, items.repeat(len(summary.count), 1)).view(-1, V + 1)
    torch.testing.assert_close(pairs, scores, atol=1e-5, rtol=1e-5)  # one item per row: the same scores
    scorer.CHUNK_CELLS = 7 * K  # a few items per chunk: the catalogue in pieces gives the same scores
    torch.testing.assert_close(scorer(summary, items), scores, atol=1e-6, rtol=1e-6)
    # a user with nothing before the window has no tokens: the prior is 0 for every item
    empty = Summary(summary.tokens, summary.last_time, torch.zeros_like(summary.count))
    assert torch.count_nonzero(scorer(empty, items)) == 0
    assert torch.count_nonzero(scores) > 0


def test_target_attention_trains_and_serves_as_it_is_evaluated(tmp_path: Path) -> None:
    """The token prior is part of every score: training's loss, evaluation's ranking and the served top-k, from
    the whole history or from a cached state, rank alike; a saved model keeps it."""
    from models.evaluate import rank_targets

    torch.set_num_threads(1)
    cfg = resolve_recipe("vista", dim=D, heads=2, vista_tokens=K, max_len=8, epochs=3, batch_size=8, lr=0.005,
                         eval_batch_size=16, dropout=0.0, vista_target_attention=True)
    frame = _frame(users=24, lengths=(30, 60))
    # each user's held-out last event: an item they never heard, so serving (which drops heard items) ranks it too
    rng = np.random.default_rng(5)
    last = frame.groupby("user_id").tail(1).copy()
    last["item_id"] = [int(rng.choice(np.setdiff1d(VOCAB.raw_ids, g.item_id))) for _, g in frame.groupby("user_id")]
    last["timestamp_ms"] += 60_000
    frame = pd.concat([frame, last], ignore_index=True)
    result = train(frame, cfg, progress=False, catalogue=VOCAB.raw_ids)
    model = result.model.eval()
    assert torch.count_nonzero(model.token_scorer.value.weight) > 0  # gradients reached the scorer
    rec = Recommender.load(result.recommender().save(tmp_path / "vista-ta"))
    seqs = build_sequences(frame, vocab=rec.vocab)
    test = leave_one_out(seqs, cfg.max_len).test
    ranked = rank_targets(model, seqs, test)
    checked = 0
    for w in range(len(test)):
        user, target_at = int(np.searchsorted(seqs.offsets, test.start[w], side="right") - 1), int(test.rank_at[w])
        lo = int(seqs.offsets[user])
        h = _history(rec.vocab.raw_ids[seqs.items[lo:target_at] - 1], seqs.event_types[lo:target_at],
                     seqs.timestamps[lo:target_at])
        target = int(rec.vocab.raw_ids[seqs.items[target_at] - 1])
        now_ms = int(seqs.timestamps[target_at]) * 1000
        served = [i for i, _ in rec.recommend([h], k=V, now_ms=now_ms)[0]]
        if target not in set(h["item_ids"].tolist()):  # a re-heard target: evaluation ranks it, serving drops it
            checked += 1
            assert served.index(target) == int(ranked.rank[w]), (w, served.index(target), int(ranked.rank[w]))
        cut = target_at - lo - cfg.max_len
        if cut > 0:  # a cached state of the older events serves the same list
            state = rec.summarise([_history(h["item_ids"][:cut], h["event_types"][:cut], h["timestamps_ms"][:cut] // 1000)])
            assert [i for i, _ in rec.recommend([h], k=V, now_ms=now_ms, summaries=[state])[0]] == served
    assert checked >= 3


def test_configs_before_target_attention_load_without_it() -> None:
    cfg = vista_config()
    assert not cfg.vista_target_attention and build_model(cfg).token_scorer is None
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "vista_target_attention"}
    assert ModelConfig.from_dict(old) == cfg
    # a summariser without the mass feature keeps the version it had before the feature existed: this hash is
    # what the code before it gave for these weights (seed 0), so cached summaries and saved models stay valid
    torch.manual_seed(0)
    plain = Summariser(SummariserConfig(num_items=V, dim=D, tokens=K, dropout=0.0))
    assert plain.version() == "9acec2341a23"
    with_mass = Summariser(SummariserConfig(num_items=V, dim=D, tokens=K, dropout=0.0, mass=True))
    with_mass.load_state_dict({**plain.state_dict(), "mass_w": torch.zeros(D)})
    assert plain.version() != with_mass.version()


def test_recall_objective_trains_the_tokens_to_hold_older_events() -> None:
    """vista_recall_weight: older events, recalled through the token scorer, come to outscore the negatives (the
    recall loss falls well below its start), and the key is refused without the scorer it trains."""
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="vista_recall_weight"):
        resolve_recipe("vista", vista_recall_weight=1.0)
    cfg = resolve_recipe("vista", dim=D, heads=2, vista_tokens=K, max_len=8, epochs=10, batch_size=8, lr=0.01,
                         eval_batch_size=16, dropout=0.0, vista_target_attention=True, vista_recall_weight=1.0,
                         train_windows="all", patience=0)
    result = train(_frame(users=24, lengths=(30, 60)), cfg, progress=False, catalogue=VOCAB.raw_ids)
    recall = [r["recall_loss"] for r in result.history]
    # each user cycles through 6 of the 50 items: tokens that hold them recall an older event among ~50 candidates
    assert recall[-1] < 0.7 * recall[0], recall


def test_a_vista_checkpoint_from_before_the_new_keys_still_resumes() -> None:
    """The resume fingerprint leaves out the target-attention keys while they are off, as a checkpoint written
    before they existed has them; turned on, they are part of it (such a run is another run)."""
    from models.train import _config_fingerprint

    off = json.loads(_config_fingerprint(resolve_recipe("vista")))
    assert "vista_target_attention" not in off and "vista_recall_weight" not in off and "vista_tokens" in off
    on = json.loads(_config_fingerprint(resolve_recipe("vista", vista_target_attention=True, vista_recall_weight=0.5)))
    assert on["vista_target_attention"] is True and on["vista_recall_weight"] == 0.5
