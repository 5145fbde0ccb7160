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

``--users`` adds what pairing by seed cannot see: the held-out users are a sample too. Every run ranks the same
targets (one per user), so a difference between two configs carries the noise of *which* users were held out as
well as that of the seeds, and averaging more seeds removes only the second. From the per-target ranks that
``bench.quality --history`` keeps, it pairs the two configs target by target and bootstraps seeds and users
together (each resample draws seeds and users with replacement, independently): the mean difference, its 95%
interval, the standard error from users alone and from seeds alone, and a two-sided bootstrap p. Per split
(test, and validation where the runs have one); where both splits hold the same users, also "valid - test":
whether the two splits disagree about the difference by more than their noise.
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


@dataclass
class UserLevel:
    split: str  # "test", "valid", or "valid - test" (the difference of the two splits' differences)
    metric: str
    seeds: int
    users: int
    mean_a: float
    mean_b: float
    diff: float  # mean over seeds and users of (a - b)
    ci_low: float  # 95% percentile interval of the two-way bootstrap
    ci_high: float
    se_users: float  # bootstrap standard error with the seeds fixed: the held-out users' noise
    se_seeds: float  # with the users fixed: the seeds' noise
    p: float  # two-sided: twice the share of resamples on the far side of zero


BOOTSTRAP = 10_000
USER_METRICS = ("hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr")


def per_target(metric: str, ranks: np.ndarray, num_items: int) -> np.ndarray:
    """Each target's contribution to ``metric``, by models/evaluate.py's own formulas (the reported metrics are
    their means)."""
    from models.evaluate import target_gains

    k = metric.partition("@")[2]
    gains = target_gains(ranks, num_items, ks=(int(k),) if k.isdigit() else ())
    if metric not in gains:
        raise ValueError(f"--users knows hr@k, ndcg@k (k > 1) and mrr, not {metric}")
    return gains[metric]


def target_ranks(runs: dict[int, dict], split: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(events [T], ranks [seeds, T], catalogue size) of one side; None if no run kept ranks for ``split``."""
    if not all(split in run.get("ranks", {}) for run in runs.values()):
        return None
    events = [np.asarray(runs[s]["ranks"][split]["event"]) for s in sorted(runs)]
    if any(not np.array_equal(e, events[0]) for e in events):
        raise ValueError(f"the runs rank different {split} targets: not the same data and split")
    # the catalogue caps k as evaluate() does; every run since ranks were kept records it as "items"
    sizes = {int(run.get("items", sys.maxsize)) for run in runs.values()}
    if len(sizes) > 1:
        raise ValueError(f"the runs rank catalogues of different sizes {sorted(sizes)}: not the same data")
    return events[0], np.array([runs[s]["ranks"][split]["rank"] for s in sorted(runs)], dtype=float), sizes.pop()


def bootstrap(d: np.ndarray, rng: np.random.Generator, draws: int = BOOTSTRAP) -> dict[str, float]:
    """Two-way bootstrap of the grand mean of ``d`` [seeds, users]: seeds and users resampled independently."""
    k, n = d.shape
    seeds = rng.multinomial(k, np.full(k, 1.0 / k), size=draws).astype(float)  # [draws, k] counts
    users = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(float)  # [draws, n]
    both = np.einsum("bs,su,bu->b", seeds, d, users) / (k * n)
    users_only = users @ d.mean(axis=0) / n  # seeds fixed
    seeds_only = seeds @ d.mean(axis=1) / k  # users fixed
    lo, hi = np.percentile(both, [2.5, 97.5])
    p = min(1.0, 2 * min(float((both <= 0).mean()), float((both >= 0).mean())))
    return {"ci_low": float(lo), "ci_high": float(hi), "se_users": float(users_only.std()),
            "se_seeds": float(seeds_only.std()), "p": p}


def user_level(runs_a: dict[int, dict], runs_b: dict[int, dict], metrics: Sequence[str], seed: int = 0) -> list[UserLevel]:
    """The ``--users`` rows: per split and metric, the two-way bootstrap of the paired per-target difference."""
    rng = np.random.default_rng(seed)
    # per split the bare names, in the order asked for: valid_ndcg@10 asks for ndcg@10 on both splits
    names = list(dict.fromkeys(m.removeprefix("valid_") for m in metrics if m.removeprefix("valid_") in USER_METRICS))
    per_split: dict[str, tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for split in ("test", "valid"):
        a, b = target_ranks(runs_a, split), target_ranks(runs_b, split)
        if a is None or b is None:
            continue
        if not np.array_equal(a[0], b[0]) or a[2] != b[2]:
            raise ValueError(f"the two configs rank different {split} targets: not the same data and split")
        per_split[split] = (a[0], {m: per_target(m, a[1], a[2]) for m in names}, {m: per_target(m, b[1], b[2]) for m in names})
    if not per_split:
        raise ValueError("--users needs runs that kept per-target ranks (bench.quality --history writes them since this option exists)")
    rows = []

    def row(split: str, metric: str, va: np.ndarray, vb: np.ndarray) -> UserLevel:
        d = va - vb
        return UserLevel(split, metric, d.shape[0], d.shape[1], float(va.mean()), float(vb.mean()), float(d.mean()),
                         **bootstrap(d, rng))

    for split, (_, va, vb) in per_split.items():
        for m in names:
            rows.append(row(split, m, va[m], vb[m]))
    if "valid" in per_split and "test" in per_split:
        ev, et = per_split["valid"][0], per_split["test"][0]
        # one target per user in each split, both ascending: the k-th of each is the same user when each valid
        # target precedes its test target and follows the previous user's test target
        if len(ev) == len(et) and np.all(ev < et) and np.all(ev[1:] > et[:-1]):
            for m in names:
                va = per_split["valid"][1][m] - per_split["test"][1][m]
                vb = per_split["valid"][2][m] - per_split["test"][2][m]
                rows.append(row("valid - test", m, va, vb))
    return rows


def user_table(rows: Sequence[UserLevel], name_a: str, name_b: str) -> str:
    def p(x: float) -> str:
        return "< 0.001" if x < 0.001 else f"{x:.3f}"

    lines = [f"| split | metric | {name_a} | {name_b} | difference | 95% interval | SE users | SE seeds | p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.split} | {r.metric} | {r.mean_a:.4f} | {r.mean_b:.4f} | {r.diff:+.4f} "
                     f"| {r.ci_low:+.4f} to {r.ci_high:+.4f} | {r.se_users:.4f} | {r.se_seeds:.4f} | {p(r.p)} |")
    return "\n".join(lines)


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
    ap.add_argument("--users", action="store_true",
                    help="also bootstrap seeds and held-out users together, from the runs' per-target ranks")
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
        users = user_level(runs_a, runs_b, args.metrics) if args.users else []
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
    if users:
        print(f"\n{name_a} vs {name_b}, per held-out target, the weights each run kept "
              f"(bootstrap of {len(runs_a)} seeds x {users[0].users} users, {BOOTSTRAP:,} draws):\n")
        print(user_table(users, name_a, name_b))
        summary["users"] = [asdict(r) for r in users]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
