"""The ARGUS ranker in the ranking bench (``bench.ranking --model argus``): pre-train, fine-tune, rank, rerank.

Per seed, on the bench's time-ordered split of the MovieLens ratings (the last ``--test-share`` of the rating
times are the test period, as for the other rankers):

1. **Pre-train** the ``--config`` recipe (``argus-ml100k``: next item + feedback, event types in the tokens)
   with ``models.train`` on the ratings *before the cutoff only*, with the seed (``--pretrain-epochs`` caps the
   recipe's epochs; the recipe's own validation still picks the epoch).
2. **Today's feedback head** (``argus_pretrained``): the pre-trained head, unchanged, scores every test example.
   It predicts the positive reaction (rating >= 3), so it scores ``like`` with p and ``dislike`` with 1 - p
   (rating <= 2 is exactly "not positive" on integer ratings).
3. **The fine-tuned ranker** (``argus``): ``models.argus_ranker.fine_tune_ranker`` on the training period's
   ranking examples, one head per task, each scored on the same test examples.
   Examples neither can score (a movie first rated after the cutoff, a history with no movie known before it)
   get the task's training positive rate, for both: every scorer is measured on every test example, as
   Wukong and DLRM are. ``counts.argus_scorable`` says how many could be scored.
4. **The cascade**, at the cutoff: for each user with a history before it and at least one movie rated >= 4
   after it (the held-out positive targets), retrieval is the pre-trained model's top ``--retrieve`` (200,
   seen movies excluded); the fine-tuned ranker reorders them by p(like). HR@10 and NDCG@10 over the targets
   (NDCG: the DCG of the hits over the ideal DCG of min(targets, 10) hits), retrieval alone and reranked.

Intervals: every seed scores the same test examples and the same cascade users, so each difference (fine-tuned
minus pre-trained AUC and GAUC per task; reranked minus retrieval HR@10 and NDCG@10) is bootstrapped over
seeds and test users together, as ``bench.compare --users`` does: each resample draws seeds and users with
replacement, independently (an AUC is recomputed with each example weighted by its user's draw count).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd

from bench.compare import bootstrap

PRETRAINED, FINE_TUNED = "argus_pretrained", "argus"
CASCADE_K = 10


# ----------------------------------------------------------------------------------------------------------
# Metrics that resample users
# ----------------------------------------------------------------------------------------------------------


def logloss(labels: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else math.nan


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC under each row of ``weights`` [D, N] (example weights; ties count one half): [D].

    Mann-Whitney with weights: the weighted share of (positive, negative) pairs in the right order. One sort
    of the scores serves every row."""
    order = np.argsort(scores, kind="stable")
    y, s, w = np.asarray(labels)[order].astype(np.float64), np.asarray(scores)[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * (1 - y), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def per_user_auc(labels: np.ndarray, scores: np.ndarray, user_index: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(AUC of each user, its example count), NaN where a user lacks a class: the terms of GAUC."""
    frame = pd.DataFrame({"y": np.asarray(labels, np.float64), "s": np.asarray(scores, np.float64), "g": user_index})
    frame["rp"] = frame.groupby("g", sort=False)["s"].rank(method="average") * frame["y"]
    per = frame.groupby("g").agg(n=("y", "size"), pos=("y", "sum"), rp=("rp", "sum"))
    neg = per["n"] - per["pos"]
    with np.errstate(invalid="ignore", divide="ignore"):
        value = (per["rp"] - per["pos"] * (per["pos"] + 1) / 2) / (per["pos"] * neg)
    value[(per["pos"] == 0) | (neg == 0)] = np.nan
    out_auc, out_n = np.full(num_users, np.nan), np.zeros(num_users)
    out_auc[per.index.to_numpy()] = value.to_numpy()
    out_n[per.index.to_numpy()] = per["n"].to_numpy()
    return out_auc, out_n


def _interval(draws: np.ndarray, users_only: np.ndarray, seeds_only: np.ndarray, diff: float) -> dict[str, float]:
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    p = min(1.0, 2 * min(float(np.nanmean(draws <= 0)), float(np.nanmean(draws >= 0))))
    return {"diff": round(diff, 4), "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4),
            "se_users": round(float(np.nanstd(users_only)), 4), "se_seeds": round(float(np.nanstd(seeds_only)), 4),
            "p": round(p, 4)}


def auc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray, user_index: np.ndarray, num_users: int,
                   rng: np.random.Generator, draws: int, chunk: int = 100) -> dict[str, dict[str, float]]:
    """AUC and GAUC of a minus b, two-way bootstrap over seeds and users: a, b [seeds, N] scores of the same
    test examples (labels [N], each example's user ``user_index`` [N])."""
    k = a.shape[0]
    seed_w = rng.multinomial(k, np.full(k, 1.0 / k), size=draws).astype(float)  # [draws, k]
    user_w = rng.multinomial(num_users, np.full(num_users, 1.0 / num_users), size=draws).astype(float)  # [draws, U]
    full = np.ones((1, len(labels)))
    d_auc = np.empty((draws, k))  # per draw of users, per seed
    d_full = np.empty(k)
    d_gauc, g_full = np.empty((draws, k)), np.empty(k)
    for s in range(k):
        d_full[s] = (weighted_auc(labels, a[s], full) - weighted_auc(labels, b[s], full))[0]
        for lo in range(0, draws, chunk):
            w = user_w[lo : lo + chunk][:, user_index]
            d_auc[lo : lo + chunk, s] = weighted_auc(labels, a[s], w) - weighted_auc(labels, b[s], w)
        (ua, n), (ub, _) = per_user_auc(labels, a[s], user_index, num_users), per_user_auc(labels, b[s], user_index, num_users)
        ok = ~np.isnan(ua)
        wn = user_w[:, ok] * n[ok]
        d_gauc[:, s] = (wn @ (ua[ok] - ub[ok])) / wn.sum(axis=1)
        g_full[s] = float(np.sum(n[ok] * (ua[ok] - ub[ok])) / n[ok].sum())
    out = {}
    for name, per_draw, at_full in (("auc", d_auc, d_full), ("gauc", d_gauc, g_full)):
        both = (seed_w * per_draw).sum(axis=1) / k
        out[name] = _interval(both, per_draw.mean(axis=1), seed_w @ at_full / k, float(at_full.mean()))
    return out


def seeded_auc_difference(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]],
                          rng: np.random.Generator, draws: int, chunk: int = 100) -> dict[str, float]:
    """AUC of a minus b when each seed has its own test examples (the simulator's logging policy is seeded):
    ``parts`` holds per seed (labels [N_s], a [N_s], b [N_s], user_index [N_s], num_users). Each draw resamples
    the seeds, and within each seed its users; the difference is the mean over the drawn seeds."""
    k = len(parts)
    seed_w = rng.multinomial(k, np.full(k, 1.0 / k), size=draws).astype(float)  # [draws, k]
    per_draw, at_full = np.empty((draws, k)), np.empty(k)
    for s, (labels, a, b, user_index, num_users) in enumerate(parts):
        full = np.ones((1, len(labels)))
        at_full[s] = (weighted_auc(labels, a, full) - weighted_auc(labels, b, full))[0]
        user_w = rng.multinomial(num_users, np.full(num_users, 1.0 / num_users), size=draws).astype(float)
        for lo in range(0, draws, chunk):
            w = user_w[lo : lo + chunk][:, user_index]
            per_draw[lo : lo + chunk, s] = weighted_auc(labels, a, w) - weighted_auc(labels, b, w)
    both = (seed_w * per_draw).sum(axis=1) / k
    return _interval(both, per_draw.mean(axis=1), seed_w @ at_full / k, float(at_full.mean()))


# ----------------------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------------------


def pretrain(examples, cutoff_ms: int, config: str, seed: int, epochs: int | None):  # noqa: ANN001, ANN201
    """The recipe trained on the events before the cutoff (no test-period event): a Recommender."""
    from models.recipe import resolve_recipe
    from models.train import train

    events = examples.events
    before = events[events["timestamp_ms"].to_numpy(np.int64) < cutoff_ms]
    cfg = resolve_recipe(config, seed=seed, **({"epochs": epochs} if epochs else {}))
    return train(before, cfg, progress=False).recommender()


def _filled(p: np.ndarray, fill: float) -> np.ndarray:
    return np.where(np.isnan(p), fill, p).astype(np.float64)


def _candidate_scores(ranker, examples, users: list[int], histories: list[dict], candidates: list[list[int]],  # noqa: ANN001
                      cutoff_ms: int, attribute_frames=None) -> list:  # noqa: ANN001
    """p(like) of each user's candidates at the cutoff: through ``score_candidates``, as serving does; a ranker
    with side features scores them as examples instead (their context and attributes read as for the test
    examples: surface ``organic``, the cutoff's hour and weekday, attributes as of the cutoff)."""
    from models.argus_ranker import SideRecommender, score_examples

    if not isinstance(ranker, SideRecommender):
        return ranker.score_candidates(histories, candidates, now_ms=cutoff_ms)
    from features.attributes import attributes_as_of
    from models.ranking_data import attribute_entities, candidate_examples, with_attributes

    lengths = [len(c) for c in candidates]
    rows = candidate_examples(examples, np.repeat(users, lengths), np.concatenate(candidates),
                              np.full(sum(lengths), cutoff_ms))
    if ranker.side.cfg.attributes:
        rows = with_attributes(rows, attributes_as_of(attribute_entities(rows), *attribute_frames))
    return np.split(score_examples(ranker, rows), np.cumsum(lengths)[:-1])


def cascade_gains(pre, ranker, examples, test, cutoff_ms: int, retrieve: int,  # noqa: ANN001
                  attribute_frames=None) -> dict[str, Any]:  # noqa: ANN001
    """Per cascade user: HR@10 and NDCG@10 of retrieval alone and reranked (see the module docstring)."""
    ex = test.examples
    liked = ex[ex["like"] == 1]
    targets = liked.groupby("user_id")["item_id"].apply(lambda s: set(s.tolist()))
    events = examples.events
    before = events[events["timestamp_ms"].to_numpy(np.int64) < cutoff_ms]
    by_user = {u: g for u, g in before.groupby("user_id", sort=True)}
    users = [int(u) for u in targets.index if u in by_user]
    histories = [{"item_ids": by_user[u]["item_id"].to_numpy(np.int64), "event_types": by_user[u]["event_type"].tolist(),
                  "timestamps_ms": by_user[u]["timestamp_ms"].to_numpy(np.int64)} for u in users]
    retrieved = pre.recommend(histories, k=retrieve, exclude_seen=True, now_ms=cutoff_ms)
    keep = [i for i, r in enumerate(retrieved) if r]  # a history with no known movie has no state
    users, histories, retrieved = [users[i] for i in keep], [histories[i] for i in keep], [retrieved[i] for i in keep]
    candidates = [[i for i, _ in r] for r in retrieved]
    p_like = _candidate_scores(ranker, examples, users, histories, candidates, cutoff_ms, attribute_frames)
    ideal = 1.0 / np.log2(np.arange(CASCADE_K) + 2)
    out: dict[str, list[float]] = {f"{m}_{side}": [] for m in ("hr@10", "ndcg@10") for side in ("retrieval", "reranked")}
    out["hr@200"] = []
    for u, cand, p in zip(users, candidates, p_like):
        wanted = targets[u]
        cand = np.asarray(cand)
        reranked = cand[np.argsort(-np.nan_to_num(p, nan=-1.0), kind="stable")]
        for side, order in (("retrieval", cand), ("reranked", reranked)):
            hits = np.array([i in wanted for i in order[:CASCADE_K]], float)
            out[f"hr@10_{side}"].append(float(hits.any()))
            out[f"ndcg@10_{side}"].append(float(hits @ ideal[: len(hits)] / ideal[: min(len(wanted), CASCADE_K)].sum()))
        out["hr@200"].append(float(any(i in wanted for i in cand)))
    return {"users": users, **{k: np.asarray(v) for k, v in out.items()}}


def run_argus_seed(args, seed: int, examples, train, test, tasks) -> dict[str, Any]:  # noqa: ANN001
    """Pre-train, fine-tune and score one seed; the per-example scores and per-user gains for the intervals."""
    from models.argus_ranker import encode_requests, fine_tune_ranker, score_examples
    from models.ranker import auc, gauc

    timing: dict[str, float] = {}
    began = time.perf_counter()
    cutoff_ms = int(test.examples["t_ms"].min())
    pre = pretrain(examples, cutoff_ms, args.pretrain_recipe, seed, args.pretrain_epochs)
    timing["pretrain"] = time.perf_counter() - began

    began = time.perf_counter()
    train_states, test_states = encode_requests(pre, train), encode_requests(pre, test)
    p_pre = score_examples(pre, test, test_states)
    timing["encode"] = time.perf_counter() - began

    began = time.perf_counter()
    scores: dict[str, dict[str, np.ndarray]] = {PRETRAINED: {}, FINE_TUNED: {}}
    rankers, chosen = {}, {}
    for task in tasks:
        fill = float(train.examples[task].mean())
        scores[PRETRAINED][task] = _filled(p_pre if task != "dislike" else 1 - p_pre, fill)
        ranker = fine_tune_ranker(pre, train, task=task, epochs=args.ft_epochs, lr=args.ft_lr, batch_size=args.ft_batch_size,
                                  seed=seed, encoder_lr=args.ft_encoder_lr, valid_share=args.ft_valid_share,
                                  states=None if args.ft_encoder_lr > 0 else train_states, side=args.recipe.side_config())
        states = test_states if pre.same_encoder(ranker) else None
        scores[FINE_TUNED][task] = _filled(score_examples(ranker, test, states), fill)
        rankers[task] = ranker
        chosen[task] = ranker.metadata["ranker_fine_tune"]["epochs"]
    timing["fine_tune"] = time.perf_counter() - began

    began = time.perf_counter()
    groups = test.examples["request_id"].astype(str).to_numpy()  # the user, on MovieLens
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_task in scores.items():
        metrics[name] = {}
        for task in tasks:
            y = test.examples[task].to_numpy()
            metrics[name][task] = {"auc": auc(y, by_task[task]), "gauc": gauc(y, by_task[task], groups),
                                   "logloss": logloss(y, by_task[task])}
    cascade = (cascade_gains(pre, rankers["like"], examples, test, cutoff_ms, args.retrieve,
                             getattr(args, "attribute_frames", None)) if "like" in tasks else None)
    timing["cascade"] = time.perf_counter() - began
    return {"metrics": metrics, "scores": scores, "cascade": cascade, "scorable": float(test_states.plan.scorable.mean()),
            "fine_tune_epochs": chosen, "seconds": {k: round(v, 2) for k, v in timing.items()}}


# ----------------------------------------------------------------------------------------------------------
# Over seeds
# ----------------------------------------------------------------------------------------------------------


def differences(runs: list[dict[str, Any]], test, tasks, *, draws: int, seed: int = 0) -> dict[str, Any]:  # noqa: ANN001
    """Fine-tuned minus pre-trained (AUC, GAUC per task) and reranked minus retrieval (HR@10, NDCG@10), each
    with its seeds-and-users 95% interval."""
    rng = np.random.default_rng(seed)
    users, user_index = np.unique(test.examples["user_id"].to_numpy(np.int64), return_inverse=True)
    out: dict[str, Any] = {"fine_tuned_minus_pretrained": {}, "reranked_minus_retrieval": {}}
    for task in tasks:
        labels = test.examples[task].to_numpy(np.float64)
        a = np.stack([r["scores"][FINE_TUNED][task] for r in runs])
        b = np.stack([r["scores"][PRETRAINED][task] for r in runs])
        out["fine_tuned_minus_pretrained"][task] = auc_difference(labels, a, b, user_index.reshape(-1), len(users), rng, draws)
    if all(r["cascade"] is not None for r in runs):
        cascade_users = [r["cascade"]["users"] for r in runs]
        if any(u != cascade_users[0] for u in cascade_users):
            raise ValueError("the seeds' cascades hold different users: not the same data and split")
        for metric in ("hr@10", "ndcg@10"):
            d = np.stack([r["cascade"][f"{metric}_reranked"] - r["cascade"][f"{metric}_retrieval"] for r in runs])
            if d.shape[1] == 0:
                continue
            b = bootstrap(d, rng, draws)
            out["reranked_minus_retrieval"][metric] = {"diff": round(float(d.mean()), 4),
                                                       **{k: round(v, 4) for k, v in b.items()}}
    return out


def cascade_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    per = [r["cascade"] for r in runs]
    out: dict[str, Any] = {"users": len(per[0]["users"])}
    for key in ("hr@10_retrieval", "ndcg@10_retrieval", "hr@10_reranked", "ndcg@10_reranked", "hr@200"):
        values = [round(float(c[key].mean()), 4) if len(c[key]) else None for c in per]
        ok = [v for v in values if v is not None]
        out[key] = {"mean": round(float(np.mean(ok)), 4) if ok else None,
                    "sd": round(float(np.std(ok, ddof=1)), 4) if len(ok) > 1 else None, "per_seed": values}
    return out
