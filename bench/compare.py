"""Paired comparison of two configs over seeds, from ``bench.quality --history FILE`` runs.

    python -m bench.compare hstu-ml100k-s*.json --against sasrec-ml100k-s*.json
    python -m bench.compare hstu-ml100k-s*.json --against sasrec-ml100k-s*.json --budgets 10 20 30 40 50

Runs pair by their ``seed``: two models trained from the same seed see the same batches and negatives, so the
difference of a pair carries less noise than the difference of two means. Without ``--budgets`` each run's
reported test figures are compared (the weights it kept). With ``--budgets E ...`` the question is what a
shorter training budget would have given: for each E, the test figures of the epoch the trainer would have kept
had the run ended after E epochs, that is the first epoch with the highest validation NDCG@10 among epochs <= E
(the rule of ``models/train.py``). That needs the test split logged on the validated epochs: run
``bench.quality`` with ``log_test_every`` equal to ``eval_every`` in the config.

For each metric: both means, the mean paired difference (first minus second), in how many seeds the first is
ahead, and the two-sided p of the paired t-test and of Wilcoxon's signed-rank test (scipy). A table per budget,
then as the LAST line one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DEFAULT_METRICS = ("hr@10", "ndcg@10", "hr@50", "hr@200", "mrr", "valid_ndcg@10")
SELECT_BY = "valid_ndcg@10"  # what models/train.py keeps the best epoch by


@dataclass
class Paired:
    metric: str
    n: int  # seeds
    mean_a: float
    mean_b: float
    diff: float  # mean of (a - b) over seeds
    ahead: int  # seeds where a > b
    tied: int
    p_t: float  # paired t-test, two-sided
    p_wilcoxon: float  # signed-rank test, two-sided


def load_runs(paths: Sequence[Path]) -> dict[int, dict[str, Any]]:
    """seed -> run; two runs of one seed on one side would make the pairing ambiguous."""
    runs: dict[int, dict[str, Any]] = {}
    for path in paths:
        run = json.loads(path.read_text())
        if "seed" not in run:
            raise ValueError(f"{path}: no 'seed' (not a bench.quality --history file?)")
        seed = int(run["seed"])
        if seed in runs:
            raise ValueError(f"{path}: seed {seed} appears twice on the same side")
        runs[seed] = run
    return runs


def kept_at_budget(history: Sequence[dict[str, float]], budget: int) -> dict[str, float]:
    """The logged figures of the epoch the trainer keeps when it stops after ``budget`` epochs, with the test
    metrics under their bare names (``hr@10``, ...) and the validation ones as logged (``valid_ndcg@10``)."""
    validated = [e for e in history if e["epoch"] <= budget and SELECT_BY in e]
    if not validated:
        raise ValueError(f"no validated epoch within the first {budget} epochs")
    best = max(validated, key=lambda e: e[SELECT_BY])  # max keeps the first of equals: the trainer's strict ">"
    if not any(k.startswith("test_") for k in best):
        raise ValueError(f"epoch {int(best['epoch'])} was validated but its test split was not logged: "
                         "set log_test_every equal to eval_every in the config")
    picked = {k.removeprefix("test_"): v for k, v in best.items() if k.startswith("test_")}
    picked.update({k: v for k, v in best.items() if k.startswith("valid_")})
    picked["epoch"] = best["epoch"]
    return picked


def paired(metric: str, a: np.ndarray, b: np.ndarray) -> Paired:
    from scipy import stats

    d = a - b
    n = len(d)
    p_t = p_w = math.nan
    if n >= 2 and np.any(d != d[0]):
        p_t = float(stats.ttest_rel(a, b).pvalue)
    if n >= 2 and np.any(d != 0):
        p_w = float(stats.wilcoxon(a, b).pvalue)
    return Paired(metric, n, float(a.mean()), float(b.mean()), float(d.mean()),
                  int((d > 0).sum()), int((d == 0).sum()), p_t, p_w)


def figures(runs: dict[int, dict], budget: int | None) -> list[dict[str, float]]:
    """Per seed (ascending): the run's reported figures, or those of the epoch it keeps within ``budget``."""
    return [runs[s] if budget is None else kept_at_budget(runs[s]["history"], budget) for s in sorted(runs)]


def compare(fa: Sequence[dict[str, float]], fb: Sequence[dict[str, float]], metrics: Sequence[str]) -> list[Paired]:
    """Paired statistics of every metric both sides have, from per-seed figures in the same seed order."""
    out = []
    for m in metrics:
        if all(m in f for f in (*fa, *fb)):
            out.append(paired(m, np.array([f[m] for f in fa], float), np.array([f[m] for f in fb], float)))
    return out


def table(rows: Sequence[Paired], name_a: str, name_b: str) -> str:
    def p(x: float) -> str:
        return "–" if math.isnan(x) else ("< 0.001" if x < 0.001 else f"{x:.3f}")

    lines = [f"| metric | {name_a} | {name_b} | difference | seeds ahead | paired t p | Wilcoxon p |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tied = f", {r.tied} tied" if r.tied else ""
        lines.append(f"| {r.metric} | {r.mean_a:.4f} | {r.mean_b:.4f} | {r.diff:+.4f} | {r.ahead} of {r.n}{tied} "
                     f"| {p(r.p_t)} | {p(r.p_wilcoxon)} |")
    return "\n".join(lines)


def _json_row(row: Paired) -> dict[str, Any]:
    """asdict with NaN (a p-value that cannot be computed) as null: the last line must be valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(row).items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="the first config's runs (bench.quality --history files)")
    ap.add_argument("--against", type=Path, nargs="+", required=True, help="the second config's runs, same seeds")
    ap.add_argument("--budgets", type=int, nargs="*", default=[], metavar="EPOCHS",
                    help="compare the epoch each run would have kept after this many epochs (needs the test "
                         "split logged on validated epochs)")
    ap.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS), help="default: %(default)s")
    ap.add_argument("--plot", type=Path, metavar="PNG",
                    help="with --budgets: draw the first metric by budget, both configs (mean and seed range)")
    args = ap.parse_args(argv)
    if args.plot and not args.budgets:
        ap.error("--plot draws figures by budget: give --budgets too")

    try:
        runs_a, runs_b = load_runs(args.runs), load_runs(args.against)
        name_a = Path(str(next(iter(runs_a.values()))["config"])).stem
        name_b = Path(str(next(iter(runs_b.values()))["config"])).stem
        if name_b == name_a:  # two variants of one config (data, code): keep the sides apart in tables and plots
            name_a, name_b = f"{name_a} ({args.runs[0].stem})", f"{name_b} ({args.against[0].stem})"
        if sorted(runs_a) != sorted(runs_b):
            raise ValueError(f"the two sides must have the same seeds: {sorted(runs_a)} vs {sorted(runs_b)}")
        budgets: list[int | None] = list(args.budgets) or [None]
        figs = {b: (figures(runs_a, b), figures(runs_b, b)) for b in budgets}  # read once: tables and plot
        results = {b: compare(fa, fb, args.metrics) for b, (fa, fb) in figs.items()}
        missing = [m for m in args.metrics if not any(r.metric == m for rows in results.values() for r in rows)]
        if missing:
            print(f"not in every run, left out: {' '.join(missing)}", file=sys.stderr)
        if args.plot:
            from models.plots import budget_curves

            metric = args.metrics[0]
            if metric in missing:
                raise ValueError(f"--plot draws the first metric, {metric}, which not every run has")
            sides = {name: [[f[metric] for f in figs[b][side]] for b in args.budgets]
                     for side, name in enumerate((name_a, name_b))}
            print(budget_curves(args.budgets, sides, args.plot, metric))
    except (ValueError, KeyError) as err:
        ap.error(str(err))
    for budget, rows in results.items():
        title = "the weights each run kept" if budget is None else f"budget {budget} epochs"
        print(f"\n{name_a} vs {name_b}, {rows[0].n if rows else 0} paired seeds, {title}:\n")
        print(table(rows, name_a, name_b))
    summary = {
        "a": name_a, "b": name_b, "seeds": sorted(runs_a),
        "budgets": {("kept" if b is None else str(b)): [_json_row(r) for r in rows] for b, rows in results.items()},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
