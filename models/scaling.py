"""Scaling study: the points of a sweep (backbone x size x data fraction x seed), each trained and measured alone.

A study is a grid of :class:`PointSpec`; each point is one training run of the settings' recipe with the
backbone's switches, width ``d`` and ``b`` blocks, on a fraction of the users, for a fixed number of epochs,
and records

- N: non-embedding parameters (encoder + heads; Kaplan et al. state their laws in these: the item table
  grows with the catalogue, not with the model's capacity to model sequences), and all parameters,
- D: training tokens, the history positions processed over all epochs (each window's inputs),
- C ~ 6 N D, the training compute,
- the evaluation loss: the *exact* full-catalogue softmax cross-entropy of the held-out users' next events at
  temperature T, and NDCG@10 / HR@10 of their last events;
- with ARGUS's feedback task (backbone ``argus``): the held-out log loss and AUC of P(positive | next item).

Every point is evaluated on the same held-out users (``HELDOUT_SHARE`` of them, never trained on by any point),
whatever fraction of the others it trained on: a sequential model has no user table, a history is only its
input, so the evaluation set (and the catalogue it ranks) is the same for every point and differences in loss
are differences of the models. The loss reads every next event of each held-out user's last ``max_len + 1``
(tens of targets per user, so its noise is small); NDCG@10 and HR@10 rank each held-out user's last event. Points are
independent and named by their spec (:meth:`PointSpec.key`), so a sweep is resumable one point at a time
(the Dagster ``scaling_point`` partitions). The fits live in ``models.scaling_laws``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models.data import build_sequences, iterate_batches, with_targets

# The backbones a study compares, as recipe switches over the settings' recipe. The HSTU ablations remove one
# ingredient of the published block each (the large-recommendation-models study's question: where does HSTU's
# scaling come from?).
BACKBONES: dict[str, dict[str, Any]] = {
    "hstu": {"model": "hstu"},
    "sasrec": {"model": "sasrec"},
    "gpt": {"model": "gpt"},
    "llama": {"model": "llama"},
    "hstu-no-rab": {"model": "hstu", "hstu_rab": False},
    "hstu-softmax": {"model": "hstu", "hstu_attention": "softmax"},
    "hstu-no-gating": {"model": "hstu", "hstu_gating": False},
    # ARGUS: HSTU with its second task, P(positive reaction | history, next item); its feedback loss is fitted too
    "argus": {"model": "hstu", "feedback_weight": 0.5},
}

_SIZE = re.compile(r"^d(\d+)b(\d+)$")
_KEY = re.compile(r"^(?P<backbone>[a-z0-9-]+?)-d(?P<dim>\d+)b(?P<blocks>\d+)-f(?P<fraction>[0-9.]+)"
                  r"-e(?P<epochs>\d+)-s(?P<seed>\d+)$")


def parse_size(size: str) -> tuple[int, int]:
    """``"d32b2"`` -> (width 32, 2 blocks)."""
    m = _SIZE.match(size)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"size {size!r}: expected d<width>b<blocks>, e.g. d32b2")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class PointSpec:
    """One point of a sweep; its key names it everywhere (Dagster partition, MLflow run, points file)."""

    backbone: str
    dim: int
    blocks: int
    fraction: float
    epochs: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.backbone}-d{self.dim}b{self.blocks}-f{self.fraction:g}-e{self.epochs}-s{self.seed}"

    @property
    def size(self) -> str:
        return f"d{self.dim}b{self.blocks}"

    @classmethod
    def from_key(cls, key: str) -> "PointSpec":
        m = _KEY.match(key)
        if not m or m.group("backbone") not in BACKBONES:
            raise ValueError(f"not a scaling point key: {key!r} (expected <backbone>-d<w>b<n>-f<fraction>-e<epochs>"
                             f"-s<seed>, backbone one of {sorted(BACKBONES)})")
        return cls(backbone=m.group("backbone"), dim=int(m.group("dim")), blocks=int(m.group("blocks")),
                   fraction=float(m.group("fraction")), epochs=int(m.group("epochs")), seed=int(m.group("seed")))


def grid(scaling: Any) -> list[PointSpec]:
    """The points of the settings' study (``ScalingSettings``): every backbone at every size on all the data,
    and the ``fraction_backbones`` also at every smaller data fraction (the L(N, D) surface and the
    compute-optimal frontier need both axes; the backbone comparison needs only N)."""
    unknown = sorted(set(scaling.backbones) - set(BACKBONES))
    if unknown:
        raise ValueError(f"unknown backbones {unknown}: choose from {sorted(BACKBONES)}")
    sizes = [parse_size(s) for s in scaling.sizes]
    points = []
    for backbone in scaling.backbones:
        fractions = scaling.data_fractions if backbone in scaling.fraction_backbones else [max(scaling.data_fractions)]
        for fraction in sorted(set(fractions)):
            for dim, blocks in sizes:
                for seed in scaling.seeds:
                    points.append(PointSpec(backbone, dim, blocks, float(fraction), scaling.epochs, seed))
    return points


HELDOUT_SHARE = 0.2  # of the users: never trained on by any point, the evaluation set of all of them
HELDOUT_SEED = 12345  # the held-out users are the same for every point of every study on the same corpus


def split_users(df: pd.DataFrame, share: float = HELDOUT_SHARE, seed: int = HELDOUT_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the training users' events, the held-out users' events): a fixed draw of ``share`` of the users."""
    held = df["user_id"].isin(drawn_users(df, share, seed, at_least=1))
    return df[~held], df[held]


def heldout_windows(seqs: Any, max_len: int) -> Any:
    """Each held-out user's last ``max_len + 1`` events as one window whose every positive target counts: the
    loss is measured on about ``max_len`` next events per user (a low-noise estimate), not on one."""
    from models.data import Examples, RANK_ALL_POSITIVES

    end = seqs.offsets[1:]
    start = np.maximum(seqs.offsets[:-1], end - (max_len + 1))
    keep = end - start >= 2
    start, end = start[keep], end[keep]
    return Examples(start, end, np.full(len(start), RANK_ALL_POSITIVES, np.int64), start + 1, start.copy())


@torch.inference_mode()
def eval_loss(model: Any, seqs: Any, examples: Any, temperature: float, batch_size: int = 256) -> dict[str, float]:
    """Mean full-catalogue softmax cross-entropy of every ranked target of ``examples`` (cosine logits / T) and,
    with ARGUS's feedback head, the mean log loss and AUC of P(positive | history, next item) on the same
    positions."""
    from models.evaluate import auc

    model.eval()
    items = model.all_item_embeddings()  # [V + 1, D]
    total, n, fb_logits, fb_labels = 0.0, 0, [], []
    for batch in iterate_batches(seqs, examples, batch_size):
        h = model(batch.features, batch.timestamps, batch.query_timestamps)  # [N, D]
        user, target = h[batch.rank_mask], batch.target_ids[batch.rank_mask]
        logits = user @ items.T / temperature  # [targets, V + 1]
        logits[:, 0] = -math.inf  # padding is never a candidate
        total += float(F.cross_entropy(logits, target, reduction="sum"))
        n += len(target)
        if model.feedback_head is not None:
            fb = batch.feedback_mask
            fb_logits.append(model.feedback_logits(h[fb], items[batch.target_ids[fb]]).float())
            fb_labels.append(batch.target_positive[fb])
    out = {"eval_loss": total / max(n, 1), "eval_targets": float(n)}
    if fb_logits:
        logits, labels = torch.cat(fb_logits), torch.cat(fb_labels)
        out["feedback_loss"] = float(F.binary_cross_entropy_with_logits(logits, labels.float()))
        out["feedback_auc"] = float(auc(logits.numpy(), labels.numpy()))
    return out


def user_fraction(df: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """The events of a deterministic ``fraction`` of the users. Subsets are nested: each fraction's users
    include every smaller fraction's (one permutation, cut at different lengths), so D grows by adding data."""
    if fraction >= 1.0:
        return df
    return df[df["user_id"].isin(drawn_users(df, fraction, seed, at_least=2))]


def drawn_users(df: pd.DataFrame, share: float, seed: int, *, at_least: int) -> np.ndarray:
    """The first ``share`` (at least ``at_least``) of one seeded permutation of the users: draws of one seed are
    nested, a smaller share's users among a larger one's."""
    users = np.random.default_rng(seed).permutation(np.sort(df["user_id"].unique()))
    return users[: max(at_least, int(round(len(users) * share)))]


def point_recipe(spec: PointSpec, recipe: str, overrides: dict[str, Any] | None = None) -> Any:
    """The resolved ``TrainConfig`` of a point: the study's recipe, its overrides, the backbone's switches and
    the point's size. One head, no early stop, and the next-item task alone unless the backbone adds ARGUS's."""
    from models.recipe import resolve_recipe

    return resolve_recipe(recipe, **{**(overrides or {}), "heads": 1, "feedback_weight": 0.0, "patience": 0,
                                     **BACKBONES[spec.backbone], "dim": spec.dim, "blocks": spec.blocks,
                                     "epochs": spec.epochs, "seed": spec.seed})


def run_point(df: pd.DataFrame, spec: PointSpec, recipe: str, overrides: dict[str, Any] | None = None,
              *, subset_seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Train one point on ``spec.fraction`` of the training users of ``df``; measure it on the held-out users
    (``split_users``; see the module docstring). Returns the point's record (plain JSON types)."""
    from models.evaluate import rank_targets, split_metrics
    from models.train import make_split, train

    cfg = point_recipe(spec, recipe, overrides)
    train_users, heldout = split_users(df)
    part = user_fraction(train_users, spec.fraction, seed=subset_seed)
    t0 = time.perf_counter()
    # the whole catalogue, so the vocabulary (and what evaluation ranks) is the same at every fraction
    result = train(part, cfg, progress=progress, catalogue=np.sort(df["item_id"].unique()))
    train_s = time.perf_counter() - t0
    seqs = with_targets(build_sequences(heldout, vocab=result.vocab), cfg.targets)
    losses = eval_loss(result.model, seqs, heldout_windows(seqs, cfg.max_len), cfg.temperature,
                       batch_size=cfg.eval_batch_size)
    test = split_metrics(rank_targets(result.model, seqs, make_split(seqs, cfg).test, batch_size=cfg.eval_batch_size),
                         len(result.vocab), feedback=False)  # each held-out user's last event, whole catalogue
    n = result.model.non_embedding_params()
    tokens = result.tokens_processed()  # input positions of the training windows, every epoch run
    return {
        **asdict(spec), "key": spec.key, "size": spec.size,
        "params": n, "params_all": int(result.num_params), "tokens": tokens, "compute": 6.0 * n * tokens,
        "events": len(part), "users": int(part["user_id"].nunique()), "heldout_users": int(heldout["user_id"].nunique()),
        **losses, "ndcg@10": float(test["ndcg@10"]), "hr@10": float(test["hr@10"]),
        "best_epoch": int(result.best_epoch), "train_s": train_s, "wall_s": time.perf_counter() - t0,
    }


def run_points(df: pd.DataFrame, specs: Sequence[PointSpec], recipe: str, overrides: dict[str, Any] | None = None,
               *, log: Callable[[str], None] = print, on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """Several points in this process, in order (the bench's road; Dagster runs one partition per point)."""
    points = []
    for i, spec in enumerate(specs, 1):
        point = run_point(df, spec, recipe, overrides)
        log(f"[{i}/{len(specs)}] {spec.key}: N={point['params']} D={point['tokens']} "
            f"loss={point['eval_loss']:.4f} ndcg@10={point['ndcg@10']:.4f} ({point['wall_s']:.0f} s)")
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


def power_law_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of y = a * x^b in log-log space; returns a, b (the exponent) and r2."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return {"a": math.nan, "b": math.nan, "r2": math.nan, "points": int(ok.sum())}
    lx, ly = np.log(x[ok]), np.log(y[ok])
    b, log_a = np.polyfit(lx, ly, 1)
    pred = log_a + b * lx
    ss_res, ss_tot = float(((ly - pred) ** 2).sum()), float(((ly - ly.mean()) ** 2).sum())
    return {"a": float(math.exp(log_a)), "b": float(b), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "points": int(ok.sum())}


CORPUS_COLUMNS = ["user_id", "item_id", "event_type", "timestamp_ms", "played_ratio"]
# The simulated world's history ends here, not "now": the same settings give the same corpus on every day and
# machine, so the points of a study trained on different days stay comparable (and are not retrained).
SIMULATED_END_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def load_corpus(settings: Any) -> pd.DataFrame:
    """The events a study trains on (``scaling.dataset``, see ``ScalingSettings``), in time order per user."""
    sc = settings.scaling
    if sc.dataset == "simulator":
        from features.simulator import MusicWorld

        df = MusicWorld(settings.simulator.model_copy(update={"users": sc.world_users})).history_frame(
            end_ms=SIMULATED_END_MS)
    elif sc.dataset == "platform":
        from pathlib import Path

        from features.feature_repo import interactions_source
        from features.offline_store import read_interactions

        df = read_interactions(Path(interactions_source(settings).path), columns=CORPUS_COLUMNS)
        if df.empty:
            raise ValueError("scaling.dataset is platform but the offline store holds no interactions yet: "
                             "replay and ingest first (encore run, or encore ingest)")
    else:
        from features.datasets import DATASETS, load_frame

        if sc.dataset not in DATASETS:
            raise ValueError(f"scaling.dataset {sc.dataset!r}: use simulator, platform or one of {sorted(DATASETS)}")
        if sc.dataset_dir is None:
            raise ValueError(f"scaling.dataset {sc.dataset!r} needs scaling.dataset_dir (its files' folder)")
        df = load_frame(sc.dataset, sc.dataset_dir)
    return df[CORPUS_COLUMNS].sort_values(["user_id", "timestamp_ms"], kind="stable").reset_index(drop=True)
