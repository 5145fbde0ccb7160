"""PNG plots for MLflow artifacts and Dagster metadata (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curves(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training losses and validation NDCG@10 / HR@10 per epoch."""
    epochs = list(range(1, len(history) + 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("loss", "next_item_loss", "feedback_loss"):
        if any(key in h for h in history):
            ax1.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax1.legend(fontsize=8)
    split = "valid" if any("valid_ndcg@10" in h for h in history) else "test"  # test: validation: false (a log)
    for key in (f"{split}_ndcg@10", f"{split}_hr@10"):
        if any(key in h for h in history):
            scored = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
            ax2.plot(*zip(*scored), marker="o", label=key)
    ax2.set(xlabel="epoch", title="validation" if split == "valid" else "test (log only, selects nothing)")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def curve_points(history: Sequence[dict[str, Any]], metric: str, split: str = "auto") -> tuple[str, list[tuple[int, float]]]:
    """(split drawn, [(epoch, value)]) of one run. ``auto``: validation where the run had a validation split,
    else the test figures the papers' protocol logs; ``test`` draws the test log of either kind of run (a run with
    a validation split logs it with ``log_test_every``)."""
    if split not in ("auto", "valid", "test"):
        raise ValueError(f"split must be auto, valid or test, not {split!r}")
    if split == "auto":
        split = "valid" if any(f"valid_{metric}" in h for h in history) else "test"
    return split, [(int(h["epoch"]), h[f"{split}_{metric}"]) for h in history if f"{split}_{metric}" in h]


def learning_curves(runs: dict[str, Sequence[dict[str, Any]]], path: Path, metric: str = "hr@10",
                    published: dict[str, float] | None = None, split: str = "auto") -> Path:
    """``metric`` per epoch (``split``: see ``curve_points``), one line per named run; a dashed line of the same
    colour at each run's published figure."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in runs.items():
        drawn, points = curve_points(history, metric, split)
        if not points:
            continue
        (line,) = ax.plot(*zip(*points), marker=".", label=f"{name} ({drawn})")
        if published and name in published:
            ax.axhline(published[name], color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{name} published {published[name]:.4f}")
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} by epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def budget_curves(budgets: Sequence[int], sides: Mapping[str, Sequence[Sequence[float]]], path: Path,
                  metric: str = "hr@10") -> Path:
    """``metric`` of the weights each model would keep under each training budget (x: epochs), one line per model
    at its mean over seeds and a band from its lowest to its highest seed. ``sides[name][i]``: the per-seed values
    at ``budgets[i]``."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, per_budget in sides.items():
        _seed_band(ax, budgets, per_budget, name)
    ax.set(xlabel="training budget (epochs; the best validation epoch within it kept)", ylabel=f"test {metric}",
           title=f"test {metric} by training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def size_curves(models: Mapping[str, tuple[Sequence[int], Sequence[Sequence[float]]]], path: Path,
                metric: str = "AUC", title: str = "ranker quality by size",
                references: Mapping[str, float | None] | None = None) -> Path:
    """A size sweep: ``metric`` against non-embedding parameters (log scale), one line per model at its mean over
    seeds and a band from its lowest to its highest seed. ``models[name] = (params per size, per-size seed values)``;
    ``references``: levels drawn as dashed horizontal lines (a floor such as popularity, a ceiling such as an
    oracle), so the curves read as a share of the room between them."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (params, per_size) in models.items():
        _seed_band(ax, params, per_size, name)
    for i, (name, level) in enumerate((references or {}).items()):
        if level is not None:
            ax.axhline(level, color=f"C{len(models) + i}", linestyle="--", linewidth=1, label=f"{name} ({level:.3f})")
    ax.set_xscale("log")
    ax.set(xlabel="non-embedding parameters", ylabel=metric, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def metric_bars(series: dict[str, dict[str, float]], path: Path,
                keys: Sequence[str] = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr")) -> Path:
    """Grouped bars of HR@K / NDCG@K for each named model (challenger, champion, popularity)."""
    import numpy as np

    keys = [k for k in keys if any(k in m for m in series.values())]
    x = np.arange(len(keys))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, (name, metrics) in enumerate(series.items()):
        ax.bar(x + i * width, [metrics.get(k, 0.0) for k in keys], width, label=name)
    ax.set_xticks(x + width * (len(series) - 1) / 2, keys)
    ax.set(title="held-out ranking metrics")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _seed_band(ax: Any, x: Sequence[float], per_x: Sequence[Sequence[float]], name: str) -> None:
    """One line at the mean over seeds of each x's values (``per_x[i]``: the seeds' values at ``x[i]``) and a
    band from the lowest to the highest seed."""
    import numpy as np

    v = np.asarray(per_x, dtype=float)  # [len(x), seeds]
    label = f"{name} (mean of {v.shape[1]} seeds)" if v.shape[1] > 1 else f"{name} (one seed)"
    (line,) = ax.plot(x, v.mean(axis=1), marker="o", label=label)
    ax.fill_between(x, v.min(axis=1), v.max(axis=1), color=line.get_color(), alpha=0.15)


def md_image(path: Path, alt: str = "") -> str:
    """Markdown with the PNG embedded (Dagster renders it in the asset's metadata)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
