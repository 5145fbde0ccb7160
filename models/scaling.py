"""Scaling study: train a sweep of model sizes and data fractions, fit power laws, plot them.

For each data fraction f (a deterministic subset of users) and each width d, one model is trained with the
settings' recipe. Each point records

- N: trainable parameters (embedding tables included: at these sizes they dominate, as in HSTU's tables),
- C: training compute ~ 6 * N * tokens, tokens = history positions processed over all epochs,
- evaluation loss: the *full* softmax cross-entropy of the held-out (validation) target over the whole
  catalogue at temperature T (exact, not sampled, so points are comparable), and test NDCG@10.

Fits are power laws y = a * x^b by least squares in log-log space (``log y = log a + b log x``), reported
with R^2; with only a handful of CPU-sized points a saturating form (y = E + A x^-alpha) is not identifiable.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models.data import build_sequences, iterate_batches


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


@torch.inference_mode()
def eval_loss(model: Any, seqs: Any, examples: Any, temperature: float, batch_size: int = 256) -> float:
    """Mean full-catalogue softmax cross-entropy of the held-out targets (cosine logits / T)."""
    model.eval()
    items = model.all_item_embeddings()
    total, n = 0.0, 0
    for batch in iterate_batches(seqs, examples, batch_size):
        h = model(batch.features, batch.timestamps, batch.query_timestamps)
        user, target = h[batch.rank_mask], batch.target_ids[batch.rank_mask]
        logits = user @ items.T / temperature
        logits[:, 0] = -math.inf
        total += float(F.cross_entropy(logits, target, reduction="sum"))
        n += len(target)
    return total / max(n, 1)


def user_fraction(df: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    if fraction >= 1.0:
        return df
    users = np.sort(df["user_id"].unique())
    keep = np.random.default_rng(seed).choice(users, size=max(2, int(round(len(users) * fraction))), replace=False)
    return df[df["user_id"].isin(keep)]


def sweep(df: pd.DataFrame, base: Any, dims: Sequence[int], fractions: Sequence[float],
          log: Callable[[str], None] = print, on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """Train one model per (fraction, dim) from the ``TrainConfig`` ``base``; returns one row per point."""
    from models.train import make_split, train

    points = []
    for fraction in fractions:
        part = user_fraction(df, fraction, seed=base.seed)
        for dim in dims:
            cfg = base.replace(dim=int(dim), patience=0)
            t0 = time.perf_counter()
            result = train(part, cfg, progress=False)
            seqs = build_sequences(part, vocab=result.vocab)
            split = make_split(seqs, cfg)
            # input events of the training windows (each window's last event is only a target), every epoch
            tokens = int(result.extra["train_tokens"]) * len(result.history)
            point = {
                "fraction": float(fraction), "dim": int(dim), "params": int(result.num_params),
                "compute": 6.0 * result.num_params * tokens, "tokens": tokens, "events": len(part),
                "eval_loss": eval_loss(result.model, seqs, split.valid, cfg.temperature),
                "ndcg@10": float(result.test_metrics.get("ndcg@10", math.nan)),
                "hr@10": float(result.test_metrics.get("hr@10", math.nan)),
                "wall_s": time.perf_counter() - t0,
            }
            log(f"scaling point fraction={fraction} dim={dim}: params={point['params']} "
                f"eval_loss={point['eval_loss']:.4f} ndcg@10={point['ndcg@10']:.4f}")
            points.append(point)
            if on_point is not None:
                on_point(point)
    return points


def fit_all(points: list[dict]) -> dict[str, dict[str, float]]:
    x_params = [p["params"] for p in points]
    x_compute = [p["compute"] for p in points]
    return {
        "eval_loss~params": power_law_fit(x_params, [p["eval_loss"] for p in points]),
        "eval_loss~compute": power_law_fit(x_compute, [p["eval_loss"] for p in points]),
        "ndcg@10~params": power_law_fit(x_params, [p["ndcg@10"] for p in points]),
        "ndcg@10~compute": power_law_fit(x_compute, [p["ndcg@10"] for p in points]),
    }


def plot(points: list[dict], fits: dict[str, dict[str, float]], path: Path) -> Path:
    from models.plots import _save, plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for ax, (y, x) in zip(axes, (("eval_loss", "params"), ("ndcg@10", "compute"))):
        for fraction in sorted({p["fraction"] for p in points}):
            pts = [p for p in points if p["fraction"] == fraction]
            ax.scatter([p[x] for p in pts], [p[y] for p in pts], label=f"data {fraction:g}")
        fit = fits[f"{y}~{x}"]
        if fit["b"] == fit["b"]:
            xs = np.geomspace(min(p[x] for p in points), max(p[x] for p in points), 50)
            ax.plot(xs, fit["a"] * xs ** fit["b"], "k--", label=f"{fit['a']:.3g}·x^{fit['b']:.3f} (R²={fit['r2']:.2f})")
        ax.set(xscale="log", yscale="log", xlabel=x, ylabel=y, title=f"{y} vs {x}")
        ax.legend(fontsize=7)
    return _save(fig, path)


def run_study(df: pd.DataFrame, train_settings: Any, scaling: Any, *, out_dir: Path, tracking_uri: str | None,
              experiment: str, artifact_root: Path | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole study: sweep, fits, plot, files under ``out_dir``, and one MLflow run (a child run per point)."""
    from models.lifecycle.tracking import study_run
    from models.recipe import recipe_from_settings

    # the backbone alone (next-item loss only), whatever task the platform's recipe adds: the fits are of its loss
    base = recipe_from_settings(train_settings, model=scaling.model, blocks=scaling.blocks, epochs=scaling.epochs,
                                heads=1, feedback_weight=0.0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"dims": list(scaling.dims), "fractions": list(scaling.data_fractions), "model": scaling.model,
              "blocks": scaling.blocks, "epochs": scaling.epochs}
    with (study_run(tracking_uri, experiment, run_name=f"scaling-{scaling.model}", params=params,
                    artifact_root=artifact_root) if tracking_uri else contextlib.nullcontext()) as run:

        def on_point(point: dict) -> None:
            if run is not None:
                run.log_point(f"d{point['dim']}-f{point['fraction']:g}",
                              {"dim": point["dim"], "fraction": point["fraction"]},
                              {k: v for k, v in point.items() if k not in ("dim", "fraction")})

        points = sweep(df, base, scaling.dims, scaling.data_fractions, log=log, on_point=on_point)
        fits = fit_all(points)
        pd.DataFrame(points).to_csv(out_dir / "points.csv", index=False)
        (out_dir / "fits.json").write_text(json.dumps(fits, indent=2))
        png = plot(points, fits, out_dir / "scaling.png")
        if run is not None:
            run.log_result({f"{k.replace('~', '_vs_')}_{m}": v for k, f in fits.items()
                            for m, v in f.items() if m in ("b", "r2")}, out_dir, "scaling")
    return {"points": points, "fits": fits, "plot": str(png), "run_id": run.run_id if run is not None else "",
            "dir": str(out_dir), "fits_markdown": _fits_md(fits), "points_markdown": _points_md(points)}


def _fits_md(fits: dict[str, dict[str, float]]) -> str:
    lines = ["| fit | a | exponent b | R² | points |", "|---|---|---|---|---|"]
    for k, f in fits.items():
        lines.append(f"| {k} | {f['a']:.4g} | {f['b']:.4f} | {f['r2']:.3f} | {f['points']} |")
    return "\n".join(lines)


def _points_md(points: list[dict]) -> str:
    lines = ["| data | dim | params | compute | eval loss | NDCG@10 | s |", "|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['fraction']:g} | {p['dim']} | {p['params']} | {p['compute']:.3g} | {p['eval_loss']:.4f} "
                     f"| {p['ndcg@10']:.4f} | {p['wall_s']:.1f} |")
    return "\n".join(lines)
