"""Evaluation of a trained recommender and the promotion gate's decision.

``evaluate_recommender`` scores a saved ``Recommender`` on the leave-one-out (or temporal) split of a data set
snapshot, next to the most-popular baseline, and measures the sanity signals the gate needs: non-finite
weights or scores, the spread of the top-k scores, coverage of the catalogue across a sample of users, and
the latency of one-user requests. ``decide`` turns a challenger's report, the champion's metric on the same
data and the ``PromotionSettings`` into a pass/fail with one human-readable reason per failed check.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from features.events import EVENT_TYPE_CODES
from models.data import build_sequences
from models.evaluate import evaluate, popularity_ranks, ranking_metrics

_EVENT_NAMES = {code: name for name, code in EVENT_TYPE_CODES.items()}


def _split_of(rec: Any, seqs: Any) -> Any:
    from models.recipe import BASE_RECIPE, resolve_recipe
    from models.train import make_split

    # the split the model was trained with: its saved recipe (over the root, for a key an older model lacks),
    # else the root's with the model's history length
    train_cfg = dict((rec.metadata or {}).get("train_config") or {}) or {"max_len": rec.config.max_len}
    return make_split(seqs, resolve_recipe(BASE_RECIPE, **train_cfg))


def evaluate_recommender(rec: Any, events: pd.DataFrame, *, sample_users: int = 64, k: int = 10,
                         seed: int = 0) -> dict[str, Any]:
    """Held-out metrics (valid + test), popularity baseline, sanity signals and latency of ``rec``."""
    seqs = build_sequences(events, vocab=rec.vocab)
    split = _split_of(rec, seqs)
    num_items = rec.config.num_items
    report: dict[str, Any] = {"num_items": num_items, "users": int(len(seqs.user_ids))}
    for name in ("valid", "test"):
        ex = getattr(split, name)
        report[name] = evaluate(rec.model, seqs, ex) if len(ex) else {}
        report[f"popularity_{name}"] = ranking_metrics(popularity_ranks(seqs, ex), num_items) if len(ex) else {}
    report["sanity"] = sanity_signals(rec, seqs, sample_users=sample_users, k=k, seed=seed)
    return report


def sample_histories(seqs: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Raw histories (as the service and the pyfunc receive them) of ``n`` users of ``seqs``."""
    rng = np.random.default_rng(seed)
    users = rng.choice(len(seqs.user_ids), size=min(n, len(seqs.user_ids)), replace=False)
    out = []
    for u in np.sort(users):
        lo, hi = seqs.offsets[u], seqs.offsets[u + 1]
        out.append({
            "item_ids": [int(i) for i in seqs.vocab.decode(seqs.items[lo:hi])],
            "event_types": [_EVENT_NAMES.get(int(c), "listen") for c in seqs.event_types[lo:hi]],
            "timestamps_ms": [int(t) * 1000 for t in seqs.timestamps[lo:hi]],
        })
    return out


def sanity_signals(rec: Any, seqs: Any, *, sample_users: int = 64, k: int = 10, seed: int = 0) -> dict[str, float]:
    finite_params = all(bool(torch.isfinite(p).all()) for p in rec.model.state_dict().values()
                        if torch.is_floating_point(p))
    histories = sample_histories(seqs, sample_users, seed)
    results = rec.recommend(histories, k=k)
    scores = np.array([s for r in results for _, s in r], dtype=np.float64)
    items = {i for r in results for i, _ in r}
    latencies = []
    threads = torch.get_num_threads()
    # One-user requests on one thread, as a serving worker runs them: an intra-op pool left spinning by
    # training in the same process would otherwise be measured instead of the model.
    torch.set_num_threads(1)
    try:
        for h in histories[:3]:  # warm-up: first calls pay for lazy initialisation
            rec.recommend([h], k=k)
        for h in histories[: min(len(histories), 32)]:
            # best of 3 per user (as timeit does): the model's cost, not a scheduler hiccup on a busy machine
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                rec.recommend([h], k=k)
                times.append((time.perf_counter() - t0) * 1000)
            latencies.append(min(times))
    finally:
        torch.set_num_threads(threads)
    lists = {tuple(i for i, _ in r) for r in results if r}
    return {
        "finite_params": float(finite_params),
        "finite_scores": float(bool(len(scores)) and bool(np.isfinite(scores).all())),
        "answered_share": float(np.mean([bool(r) for r in results])) if results else 0.0,
        "score_mean": float(np.nanmean(scores)) if len(scores) else math.nan,
        "score_std": float(np.nanstd(scores)) if len(scores) else 0.0,
        "coverage": len(items) / max(rec.config.num_items, 1),
        "distinct_lists_share": len(lists) / max(len(results), 1),
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies else math.nan,
        "latency_p95_ms": float(np.percentile(latencies, 95)) if latencies else math.nan,
        "sample_users": float(len(histories)),
    }


@dataclass
class GateDecision:
    passed: bool
    metric: str
    challenger_value: float
    champion_version: int | None
    champion_value: float | None
    popularity_value: float | None
    checks: dict[str, bool] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # one per failed check

    @property
    def summary(self) -> str:
        if not self.passed:
            return "blocked: " + "; ".join(self.reasons)
        if self.champion_version is None:
            return f"passed: first model ({self.metric}={self.challenger_value:.4f}, no champion yet)"
        return (f"passed: {self.metric} {self.challenger_value:.4f} beats champion v{self.champion_version} "
                f"{self.champion_value:.4f}")

def _checklist() -> tuple[dict[str, bool], list[str], Callable[[str, bool, str], None]]:
    """(checks, reasons, check): ``check(name, ok, why)`` records each check and the reason of each failure."""
    checks: dict[str, bool] = {}
    reasons: list[str] = []

    def check(name: str, ok: bool, why: str) -> None:
        checks[name] = bool(ok)
        if not ok:
            reasons.append(why)

    return checks, reasons, check


def decide(report: dict[str, Any], promotion: Any, *, champion_version: int | None = None,
           champion_value: float | None = None) -> GateDecision:
    """Apply ``PromotionSettings`` to a challenger's evaluation report (and the champion's metric)."""
    metric, split = promotion.metric, promotion.split
    value = float(report.get(split, {}).get(metric, math.nan))
    pop = report.get(f"popularity_{split}", {}).get(metric)
    s = report.get("sanity", {})
    checks, reasons, check = _checklist()
    check("finite", s.get("finite_params", 0) == 1 and s.get("finite_scores", 0) == 1 and value == value,
          f"non-finite weights, scores or {metric} (NaN)")
    check("score_distribution", s.get("score_std", 0.0) >= promotion.min_score_std,
          f"top-k scores collapsed (std {s.get('score_std', 0.0):.2e} < {promotion.min_score_std:.0e})")
    check("coverage", s.get("coverage", 0.0) >= promotion.min_coverage,
          f"catalogue coverage {s.get('coverage', 0.0):.3f} < {promotion.min_coverage}")
    check("latency", s.get("latency_p95_ms", math.inf) <= promotion.latency_budget_ms,
          f"p95 latency {s.get('latency_p95_ms', math.inf):.1f} ms > budget {promotion.latency_budget_ms} ms")
    if promotion.beat_popularity and pop is not None:
        check("beats_popularity", value > pop,
              f"{split} {metric} {value:.4f} does not beat most-popular {pop:.4f}")
    if champion_value is not None:
        check("beats_champion", value > champion_value + promotion.margin,
              f"{split} {metric} {value:.4f} does not beat champion v{champion_version} {champion_value:.4f} "
              f"by margin {promotion.margin}")
    return GateDecision(passed=not reasons, metric=f"{split}_{metric}", challenger_value=value,
                        champion_version=champion_version, champion_value=champion_value,
                        popularity_value=None if pop is None else float(pop), checks=checks, reasons=reasons)


def decide_ranker(report: dict[str, Any], *, margin: float = 0.0, champion_version: int | None = None,
                  champion_value: float | None = None) -> GateDecision:
    """The rankers' gate on a ranker's test report (``ranker``/``base``/``popularity`` AUCs of one task).

    A fine-tuned ranker must not be worse than the pre-trained head it started from (else the fine-tuning
    only added a version), must beat the popularity order, and must beat the champion ranker re-scored on the
    same examples by ``margin``. AUC, not GAUC, decides: a small test period has few requests with both a
    positive and a negative, and GAUC over those few is noisy; GAUC is reported beside it."""
    value = float(report.get("ranker", {}).get("auc", math.nan))
    base = report.get("base", {}).get("auc")
    pop = report.get("popularity", {}).get("auc")
    checks, reasons, check = _checklist()
    check("finite", bool(report.get("finite_scores")) and value == value, "non-finite scores or AUC (NaN)")
    if base is not None and base == base:
        check("beats_base", value >= base, f"test AUC {value:.4f} is below the pre-trained head's {base:.4f}")
    if pop is not None and pop == pop:
        check("beats_popularity", value > pop, f"test AUC {value:.4f} does not beat the popularity order {pop:.4f}")
    if champion_value is not None:
        check("beats_champion", value > champion_value + margin,
              f"test AUC {value:.4f} does not beat champion ranker v{champion_version} {champion_value:.4f} "
              f"by margin {margin}")
    return GateDecision(passed=not reasons, metric=f"test_{report.get('task', '')}_auc", challenger_value=value,
                        champion_version=champion_version, champion_value=champion_value,
                        popularity_value=None if pop is None else float(pop), checks=checks, reasons=reasons)


def summaries_check(tags: dict[str, str], backfills: dict[str, dict]) -> tuple[bool, str] | None:
    """The VISTA tie (issue #36): a version whose model summarises older events (tag ``model`` = vista, or a
    ``summariser_version`` tag) is served from cached summaries of its own summariser, so it may be promoted
    only once those are backfilled. ``tags``: the version's tags; ``backfills``: summariser version -> record
    (``Registry.summary_backfills``). None for a model that reads no summaries; else (passed, why)."""
    version = tags.get("summariser_version")
    if version is None and tags.get("model") != "vista":
        return None
    if not version:
        return False, "a vista model without a summariser_version tag: not tied to any cached summaries"
    if version in backfills:
        return True, f"summaries of summariser {version} backfilled"
    if backfills:
        return False, (f"summariser version mismatch: cached summaries exist for {sorted(backfills)} but not for "
                       f"this model's summariser {version}: materialise user_summaries partition {version} first")
    return False, f"no cached summaries of summariser {version}: materialise user_summaries partition {version} first"


def with_summaries(decision: GateDecision, check: tuple[bool, str] | None) -> GateDecision:
    """``decision`` with the ``summaries_check`` result added (unchanged for a model that reads no summaries)."""
    if check is None:
        return decision
    ok, why = check
    checks = {**decision.checks, "summaries_backfilled": ok}
    reasons = decision.reasons + ([] if ok else [why])
    return dataclasses.replace(decision, passed=decision.passed and ok, checks=checks, reasons=reasons)
