"""HSTU ranker: M-FALCON equals one full forward per candidate, candidates never see each other, the history is
causal, training learns a task that needs the history's actions, and the M-FALCON bench runs small."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from features.events import EVENT_TYPE_CODES
from models.hstu_ranker import HSTURanker, HSTURankerConfig, RequestGroups, event_codes, train_hstu_ranker
from models.ranker import auc
from models.ranking_data import build_ranking_examples

T0 = 1_700_000_000_000
DAY_MS = 86_400_000
TASKS = ("like", "skip")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int = 0, std: float = 0.2, **kw: object) -> HSTURanker:
    """A small ranker with weights drawn wide enough (std) that attention, biases and ranks all matter."""
    torch.manual_seed(seed)
    cfg = replace(HSTURankerConfig(dim=16, blocks=3, heads=3, attn_dim=8, linear_dim=4, history_events=24), **kw)
    model = HSTURanker(cfg, TASKS).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def _request(n: int, m: int, seed: int = 0) -> tuple:
    """A history of n events with gaps from seconds to months before t, and m candidates (some ranked)."""
    rng = np.random.default_rng(seed)
    gaps = np.sort(rng.choice([1_000, 30_000, 3_600_000, DAY_MS, 40 * DAY_MS], size=n) * rng.uniform(1, 3, n))[::-1]
    times = (T0 - gaps).astype(np.int64)  # oldest first
    items = rng.integers(0, 5_000, n)
    types = rng.choice(sorted(EVENT_TYPE_CODES.values()), size=n)
    candidates = rng.integers(0, 5_000, m)
    ranks = np.where(rng.random(m) < 0.5, rng.integers(0, 40, m), -1)
    return items, types, times, T0, candidates, ranks


# ------------------------------------------------------------------------------------------- M-FALCON


@pytest.mark.parametrize("n", [0, 1, 17, 24, 40])  # 40 > history_events: both paths read the last 24
def test_mfalcon_equals_one_full_forward_per_candidate(n: int) -> None:
    model = _model()
    request = _request(n, m=9)
    fast = model.score_mfalcon(*request)
    slow = model.score_naive(*request)
    assert fast.shape == slow.shape == (9, len(TASKS))
    assert fast.abs().max() > 0.1  # not a trivially small output
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_a_candidate_score_does_not_depend_on_the_other_candidates() -> None:
    model = _model(seed=1)
    items, types, times, t, candidates, ranks = _request(20, m=12, seed=1)
    everyone = model.score_mfalcon(items, types, times, t, candidates, ranks)
    for pick in ([3], [0, 7, 11], list(range(12))[::-1]):
        alone = model.score_mfalcon(items, types, times, t, candidates[pick], ranks[pick])
        torch.testing.assert_close(alone, everyone[pick], rtol=0, atol=1e-6)


def test_requests_batched_with_padding_score_as_they_do_alone() -> None:
    model = _model(seed=2)
    requests = [_request(n, m, seed=n) for n, m in ((5, 3), (24, 7), (0, 2))]
    alone = [model.score_mfalcon(*r) for r in requests]
    # The same three requests through RequestGroups.batch (right padding of histories and candidates).
    groups = RequestGroups(
        rows=np.arange(12), offsets=np.array([0, 3, 10, 12]),
        hist_start=np.array([0, 5, 29]), hist_len=np.array([5, 24, 0]), t_ms=np.array([T0, T0, T0]),
        items=np.concatenate([r[4] for r in requests]), ranks=np.concatenate([r[5] for r in requests]),
        ev_item=np.concatenate([r[0] for r in requests]), ev_code=np.concatenate([r[1] for r in requests]),
        ev_ms=np.concatenate([r[2] for r in requests]),
    )
    b, rows = groups.batch(np.array([0, 1, 2]))
    with torch.no_grad():
        logits = model(b)
    assert logits.shape == (3, 7, len(TASKS)) and rows.tolist() == list(range(12))
    torch.testing.assert_close(logits[b.cand_mask], torch.cat(alone), rtol=0, atol=1e-5)


def test_the_history_is_causal_and_its_actions_and_times_matter() -> None:
    model = _model(seed=3)
    items, types, times, t, candidates, ranks = _request(16, m=4, seed=3)
    b = model.request(items, types, times, t, candidates, ranks)
    changed = model.request(np.r_[items[:10], items[10:] + 1], np.r_[types[:10], types[10:] % 6 + 1], times, t,
                            candidates, ranks)
    with torch.no_grad():
        caches = [model.encode_history(*model.tokens(x)[:2], 2 * x.hist_len, x.t_s) for x in (b, changed)]
    for k_a, k_b, v_a, v_b in zip(caches[0].keys, caches[1].keys, caches[0].values, caches[1].values):
        # Tokens of events 0..9 (20 tokens) never see events 10.. (every block: the later ones through attention).
        torch.testing.assert_close(k_a[:, :20], k_b[:, :20], rtol=0, atol=0)
        torch.testing.assert_close(v_a[:, :20], v_b[:, :20], rtol=0, atol=0)
        assert not torch.allclose(k_a[:, 20:], k_b[:, 20:])
    base = model.score_mfalcon(items, types, times, t, candidates, ranks)
    other_actions = model.score_mfalcon(items, types % 6 + 1, times, t, candidates, ranks)
    later_request = model.score_mfalcon(items, types, times, t + 30 * DAY_MS, candidates, ranks)
    assert (base - other_actions).abs().max() > 1e-3
    assert (base - later_request).abs().max() > 1e-3


def test_event_codes_and_shapes() -> None:
    assert event_codes(["listen", "like", "nonsense"]).tolist() == [EVENT_TYPE_CODES["listen"],
                                                                    EVENT_TYPE_CODES["like"], 0]
    model = _model()
    assert model.score_mfalcon(*_request(3, m=1)).shape == (1, len(TASKS))
    assert model.score_naive(*_request(3, m=0)).shape == (0, len(TASKS))
    with pytest.raises(ValueError, match="equal lengths"):
        model.request([1, 2], [1], [T0, T0], T0, [5])


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def liker_examples():
    """40 users over 12 items; even users like items 0-5 and skip 6-11, odd users skip everything. History: 8
    such reactions before T0; then 4 slates of 6 per user, reactions by the same rule. Predicting a like needs
    the candidate *and* the actions of the history (which kind of user this is)."""
    rng = np.random.default_rng(0)
    rows, exposures = [], []
    likes = lambda user, item: user % 2 == 0 and item < 6  # noqa: E731
    for user in range(40):
        for j, item in enumerate(rng.integers(0, 12, 8)):
            rows.append((f"h{user}-{j}", user, int(item), "like" if likes(user, item) else "skip",
                         T0 - (8 - j) * 60_000, None))
        for r in range(4):
            request, now = f"r{user}-{r}", T0 + (r + 1) * 3_600_000 + user
            slate = rng.choice(12, size=6, replace=False).tolist()
            exposures.append({"request_id": request, "user_id": user, "timestamp_ms": now, "items": slate})
            rows += [(f"{request}-{item}", user, item, "like" if likes(user, item) else "skip", now + 1_000, request)
                     for item in slate]
    interactions = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "event_type", "timestamp_ms",
                                               "request_id"])
    return build_ranking_examples(interactions, pd.DataFrame(exposures), window_s=600)


def test_requests_group_a_slate(liker_examples) -> None:  # noqa: ANN001
    groups = RequestGroups.build(liker_examples, history_events=10)
    assert groups.num_groups == 160 and (groups.sizes == 6).all()
    assert sorted(groups.rows.tolist()) == list(range(len(liker_examples)))
    assert groups.hist_len.max() == 10  # later requests have more than 10 events before them: capped
    ids = liker_examples.examples["request_id"].to_numpy()
    for g in range(groups.num_groups):
        assert len(set(ids[groups.rows[groups.offsets[g]:groups.offsets[g + 1]]])) == 1


def test_training_learns_a_task_that_needs_the_history(liker_examples) -> None:  # noqa: ANN001
    cfg = HSTURankerConfig(dim=16, blocks=2, heads=2, attn_dim=8, linear_dim=8, history_events=10)
    model = train_hstu_ranker(liker_examples, cfg, TASKS, epochs=6, batch_size=64, lr=1e-2, seed=0)
    assert model.train_losses[-1] < 0.5 * model.train_losses[0]
    p = model.predict(liker_examples)
    assert p.shape == (len(liker_examples), len(TASKS)) and ((p >= 0) & (p <= 1)).all()
    assert auc(liker_examples.examples["like"].to_numpy(), p[:, 0]) > 0.9
    # predict (batched requests) equals scoring each request alone with M-FALCON
    ex = liker_examples.examples
    ev = liker_examples.events
    i = int(np.flatnonzero(ex["request_id"] == "r7-3")[0])
    rows = np.flatnonzero(ex["request_id"] == "r7-3")
    hist = ev.iloc[max(int(ex["hist_start"][i]), int(ex["hist_end"][i]) - 10): int(ex["hist_end"][i])]
    alone = torch.sigmoid(model.score_mfalcon(hist["item_id"], event_codes(hist["event_type"]), hist["timestamp_ms"],
                                              int(ex["t_ms"][i]), ex["item_id"][rows], ex["rank"][rows]))
    np.testing.assert_allclose(p[rows], alone.numpy(), atol=1e-5)


def test_validation_keeps_the_best_epoch_of_whole_requests(liker_examples) -> None:  # noqa: ANN001
    """valid_share holds out the last requests whole; the kept weights reproduce the best epoch's validation AUC."""
    from models.ranking_data import validation_rows

    cfg = HSTURankerConfig(dim=16, blocks=1, heads=2, attn_dim=8, linear_dim=8, history_events=10)
    model = train_hstu_ranker(liker_examples, cfg, TASKS, epochs=4, batch_size=64, lr=1e-2, seed=0, valid_share=0.25)
    assert len(model.valid_curve) == 4 and model.chosen_epoch == int(np.nanargmax(model.valid_curve)) + 1
    _, valid = validation_rows(liker_examples, np.arange(len(liker_examples)), 0.25)
    held = liker_examples.examples.iloc[valid]
    assert held["request_id"].nunique() * 6 == len(held)  # whole slates of 6
    part = type(liker_examples)(examples=held.reset_index(drop=True), events=liker_examples.events,
                                labels=liker_examples.labels)
    assert auc(part.examples["like"].to_numpy(), model.predict(part)[:, 0]) == pytest.approx(max(model.valid_curve),
                                                                                             abs=1e-6)


# ------------------------------------------------------------------------------------------- benches


def test_mfalcon_bench_runs_small(capsys) -> None:  # noqa: ANN001
    from bench.mfalcon import main

    argv = ["--candidates", "50", "--history", "20", "--repeats", "2"]
    main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "mfalcon" and out["candidates"] == 50 and out["history_events"] == 20
    assert out["threads"] == 1 and out["naive_timed"] == 50 and out["argv"] == argv
    assert out["max_abs_diff"] < 1e-5 and out["speedup"] > 1
    assert out["sizes"]["dim"] == HSTURankerConfig().dim and out["sizes"]["history_events"] == 20


def test_encore_bench_mfalcon_is_wired() -> None:
    from cli.bench import bench

    out = CliRunner().invoke(bench, ["mfalcon", "--help"])
    assert out.exit_code == 0 and "M-FALCON" in out.output and "--naive-sample" in out.output


def test_ranking_bench_takes_the_hstu_ranker(capsys) -> None:  # noqa: ANN001
    from bench.ranking import main

    argv = ["--users", "30", "--items", "60", "--requests", "150", "--slate", "5", "--negatives", "2",
            "--epochs", "1", "--seeds", "0", "--model", "hstu", "--history-events", "8"]
    main(argv)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["models"] == ["hstu"] and out["settings"]["history_events"] == 8
    for subset in out["metrics"].values():
        for task in subset["hstu"].values():
            assert all(v is None or 0.0 <= v <= 1.0 for v in task["auc"]["per_seed"])
