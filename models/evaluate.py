"""Offline evaluation: full-catalogue ranking of the held-out next item, plus feedback AUC.

For every evaluation window we score *all* V items against the user state just before the target, drop the
items the user already interacted with (the events ``[history_from, target)`` of the window: the whole history
by default, only the model's input window under ``seen_filter: window``; never the target itself:
re-consumption must not be rewarded by filtering the answer away), and take the target's 0-based
rank = number of remaining items scored at least as high (ties count against the target). Then

    hr@k   = mean(rank < k)                     ndcg@k = mean(1 / log2(rank + 2) if rank < k else 0)
    mrr    = mean(1 / (rank + 1))

with k capped at the catalogue size V. No sampled-candidate metrics: they are biased (Krichene & Rendle 2020).

Where the ranked targets carry both reactions (the papers' MovieLens protocol ranks every rating, 1-2 stars
too), the same metrics are also reported for each side (``positive_hr@10``, ``negative_hr@10``, ...): a model
can trade hits on next items the user went on to dislike for hits on ones they liked, which the pooled figure
hides. The ARGUS feedback task is meant to do exactly that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from models.data import Examples, UserSequences, batch_rows, jagged_positions, make_batch
from models.recommender import SequentialRecommender
from models.vista import Summary

DEFAULT_KS = (1, 10, 50, 200)
BY_REACTION = ("hr@10", "ndcg@10", "hr@50", "hr@200", "mrr")  # reported per reaction of the target


def target_gains(ranks: np.ndarray | torch.Tensor, num_items: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Each target's contribution to hr@k for every k, ndcg@k for k > 1 and mrr, from 0-based ranks of any shape:
    the metrics are their means (``ranking_metrics``), and ``bench.compare --users`` resamples them target by target."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    gain = 1.0 / np.log2(r + 2.0)
    out = {f"hr@{k}": (r < min(k, num_items)).astype(np.float64) for k in ks}
    out.update({f"ndcg@{k}": np.where(r < min(k, num_items), gain, 0.0) for k in ks if k > 1})  # ndcg@1 == hr@1
    out["mrr"] = 1.0 / (r + 1.0)
    return out


def ranking_metrics(ranks: np.ndarray | torch.Tensor, num_items: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """0-based target ranks -> hr@k for every k, ndcg@k for k > 1, mrr (means over examples)."""
    gains = target_gains(ranks, num_items, ks)
    if gains["mrr"].size == 0:
        return {k: math.nan for k in gains}
    return {k: float(np.mean(v)) for k, v in gains.items()}


def auc(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """ROC AUC via the Mann-Whitney U statistic with average ranks for ties; NaN if one class is missing."""
    s = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average 1-based rank within each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass(frozen=True)
class RankedTargets:
    """Every ranked target of an evaluation split, in the order of its target event.

    ``event`` is the target's absolute index into the ``UserSequences`` arrays: runs of different models on the
    same data and split rank the same events, so their ranks pair up user by user (``bench.compare --users``).
    """

    event: np.ndarray  # [T] int64, ascending
    rank: np.ndarray  # [T] int64: 0-based rank among the candidates (ties count against the target)
    positive: np.ndarray  # [T] bool: the user reacted positively to the target
    feedback_logits: np.ndarray  # [F] float: ARGUS feedback head's logits (empty without the head)
    feedback_labels: np.ndarray  # [F] bool


@torch.inference_mode()
def rank_targets(
    model: SequentialRecommender,
    seqs: UserSequences,
    examples: Examples,
    *,
    batch_size: int = 256,
    older_events: int = 0,
) -> RankedTargets:
    """Rank each example's target against the full catalogue (``examples``: ``Split.valid`` / ``Split.test``).

    ``older_events`` (vista): how many of the latest events before each window the summary reads; 0 = all, as
    evaluation and serving do. A cap measures how deep into the history the model's answers come from."""
    was_training = model.training
    model.eval()
    num_items = model.cfg.num_items
    device = next(model.parameters(), torch.empty(0)).device  # batches are built on the CPU
    items = model.all_item_embeddings().to(device)  # [V + 1, D], computed once
    events, ranks, positive, fb_logits, fb_labels = [], [], [], [], []
    for rows in batch_rows(examples, batch_size, bucket_by_length=True):
        # vista: every event before the window, summarised (0 = no cap: evaluation reads the whole history)
        older = older_events if model.cfg.reads_older else None
        batch = make_batch(seqs, examples.subset(rows), with_seen=True, older_events=older).to(device)
        if model.cfg.reads_older:  # vista: the summary once, for the blocks and for the token scorer
            summary = model.summarise_older(*batch.older_inputs())
            h = model(batch.features, batch.timestamps, batch.query_timestamps, summary=summary)  # [N, D]
        else:
            h = model(batch.features, batch.timestamps, batch.query_timestamps)  # [N, D]
        user = h[batch.rank_mask]  # [B, D]: exactly one ranked position per window, in row order
        target = batch.target_ids[batch.rank_mask]  # [B]
        scores = user @ items.T  # [B, V + 1]
        if model.cfg.reads_older and model.token_scorer is not None:  # each item also attends to the tokens
            window = jagged_positions(batch.offsets, batch.lengths)[0][batch.rank_mask]  # [B'] windows ranked
            ranked = Summary(summary.tokens[window], summary.last_time[window], summary.count[window])
            scores = scores + model.token_scorer(ranked, items)
        # Read the target's score before masking the history: a re-consumed target keeps its score while
        # every other already-seen item drops out of the ranking.
        target_score = scores.gather(1, target[:, None])  # [B, 1]
        scores[:, 0] = -math.inf  # padding is not an item
        scores[batch.seen_rows, batch.seen_items] = -math.inf
        scores.scatter_(1, target[:, None], -math.inf)  # the target is not its own competitor
        # [B] 0-based rank among unseen items + target. Ties count against the target (>=) and a non-finite
        # target score ranks last: a diverged model (NaN vectors, or every score equal) must read as worthless,
        # not as perfect (every comparison with NaN is False), or early stopping would keep its weights.
        rank = (scores >= target_score).sum(dim=1)
        ranks.append(torch.where(torch.isfinite(target_score[:, 0]), rank, torch.full_like(rank, num_items)).cpu())
        rank_at = examples.rank_at[rows]
        events.append(rank_at[rank_at >= 0])  # feedback-only windows rank nothing
        positive.append(batch.target_positive[batch.rank_mask].cpu())
        if model.feedback_head is not None and bool(batch.feedback_mask.any()):
            fb = batch.feedback_mask
            fb_logits.append(model.feedback_logits(h[fb], items[batch.target_ids[fb]]).float().cpu())
            fb_labels.append(batch.target_positive[fb].cpu())
    model.train(was_training)

    cat = lambda xs, dtype: np.concatenate([np.asarray(x) for x in xs]).astype(dtype) if xs else np.zeros(0, dtype)  # noqa: E731
    event = cat(events, np.int64)
    order = np.argsort(event, kind="stable")
    return RankedTargets(event=event[order], rank=cat(ranks, np.int64)[order], positive=cat(positive, bool)[order],
                         feedback_logits=cat(fb_logits, np.float64), feedback_labels=cat(fb_labels, bool))


def evaluate(
    model: SequentialRecommender,
    seqs: UserSequences,
    examples: Examples,
    *,
    batch_size: int = 256,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Metrics over ``examples`` (one ranked target each, e.g. ``Split.valid`` / ``Split.test``)."""
    ranked = rank_targets(model, seqs, examples, batch_size=batch_size)
    return split_metrics(ranked, model.cfg.num_items, feedback=model.feedback_head is not None, ks=ks)


def split_metrics(ranked: RankedTargets, num_items: int, *, feedback: bool, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """A split's metrics from its ranked targets: the ranking metrics, ``count``, the figures per reaction of the
    target and, with a feedback head (``feedback``), its AUC. ``evaluate`` is ``rank_targets`` then this."""
    metrics = ranking_metrics(ranked.rank, num_items, ks)
    metrics["count"] = float(len(ranked.rank))
    metrics.update(by_reaction(torch.from_numpy(ranked.rank), torch.from_numpy(ranked.positive), num_items))
    if feedback:
        metrics["feedback_auc"] = auc(ranked.feedback_logits, ranked.feedback_labels) if len(ranked.feedback_labels) else math.nan
    return metrics


def by_reaction(ranks: torch.Tensor, positive: torch.Tensor, num_items: int) -> dict[str, float]:
    """``positive_<metric>``, ``negative_<metric>`` and ``positive_share`` of the ranked targets; empty unless
    both reactions occur (then the split says nothing the pooled figures do not)."""
    positive = positive.bool()
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == len(positive):
        return {}
    out = {"positive_share": n_pos / len(positive)}
    for side, mask in (("positive", positive), ("negative", ~positive)):
        side_metrics = ranking_metrics(ranks[mask], num_items)
        out.update({f"{side}_{k}": side_metrics[k] for k in BY_REACTION})
    return out


def popularity_ranks(seqs: UserSequences, examples: Examples) -> np.ndarray:
    """0-based ranks of the targets under a most-popular baseline (history filtered like ``evaluate``).

    Popularity counts every positive event of the data set, held-out ones included, so it is a slightly
    optimistic floor: a trained model must beat it. Ties count against the target, as in ``evaluate``: counts
    are integers, so most targets share their count with other items, and breaking those ties in the target's
    favour would lift the floor."""
    counts = np.bincount(seqs.items[seqs.positive], minlength=seqs.vocab.num_embeddings).astype(np.float64)
    counts[0] = -np.inf
    ranked = np.flatnonzero(examples.rank_at >= 0)  # feedback-only windows have nothing to rank
    ranks = np.empty(len(ranked), np.int64)
    for out, i in enumerate(ranked):
        t, lo = examples.rank_at[i], examples.history_from[i]
        s = counts.copy()
        target = seqs.items[t]
        s[seqs.items[lo:t]] = -np.inf
        s[target] = counts[target]
        ranks[out] = int((s >= counts[target]).sum()) - 1  # every item at least as popular, but the target
    return ranks


__all__ = ["BY_REACTION", "DEFAULT_KS", "RankedTargets", "auc", "by_reaction", "evaluate", "popularity_ranks", "rank_targets",
           "ranking_metrics", "split_metrics", "target_gains"]
