"""Sequential A/B readout measured by simulation: error under peeking, any-time coverage, power against fixed.

    python -m bench.experiments [--runs 20000] [--seed 0]

The design is the issue's: a conversion metric at 10% in control, 50,000 users per arm arriving evenly over 14
days, the plan ``mde = 0.05`` relative (τ = 5% of the control mean) with the horizon at 50,000 users per arm.
Each simulated test is its running sums at every look of 50 users per arm (100 users), drawn as binomial
increments, so a run costs 1,000 looks of arithmetic, not 100,000 users. At each look the readout is what
``experiments.sequential.sequential_test`` computes from the data so far: τ from that look's control mean, the
horizon variance from that look's SDs, the truncated threshold for that ``r``, and the crossing ``log Λ ≥ log c``
(equivalently, the always-valid p ≤ α, or the confidence sequence leaving 0).

Figures (each a share of ``runs`` simulated tests with a Clopper–Pearson 95% interval):

- ``aa_fpr_peeking``: A/A, stopped at the first crossing, looks after every day (14) and after every 100 users
  (1,000). The threshold is calibrated for continuous looks up to the horizon, so the error is ≤ α for any
  schedule; the horizon is what keeps it from wasting α (the untruncated 1/α would spend 1.75% at daily looks:
  it counts crossings that could only happen after the test has ended).
- ``coverage_any_time``: with a true +5% lift, the share of tests whose confidence sequence contains the truth
  at all 1,000 looks, hence at any stopping time, for both sequences the report shows: the difference's
  (``difference_every_100_users``) and the relative lift's (``lift_every_100_users``, Fieller's inversion,
  ``experiments.sequential.lift_sequence``, over every run and look). The headline ``value`` is the smaller of
  the two (the bar applies to each); also at the 14 daily looks, and, for comparison, the delta-method lift
  sequence it replaced. The threshold spends exactly α over continuous looks, so at 1,000 looks the coverage
  sits just above 1 - α: calibrated, not padded.
- ``power_ratio_vs_fixed``: with the +5% lift, the sequential test's detection rate with daily looks over the
  fixed-horizon Welch test's power at 50,000 per arm (both: significant in the right direction), with a
  bootstrap 95% interval over the paired runs.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import stats

from experiments.sequential import lift_sequence, truncated_log_threshold

USERS_PER_ARM = 50_000
DAYS = 14
STEP = 50  # users per arm between looks: a look every 100 users
BASE_RATE = 0.10
LIFT = 0.05
ALPHA = 0.05
CHUNK = 1_000  # runs simulated together (memory: a few (CHUNK, looks) float arrays)


def binomial_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson interval of ``k`` successes in ``n``."""
    a = (1 - level) / 2
    low = stats.beta.ppf(a, k, n - k + 1) if k > 0 else 0.0
    high = stats.beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


def _thresholds(r: np.ndarray) -> np.ndarray:
    """``log c`` per element of ``r`` (NaN stays NaN), through the engine's calibration cache."""
    out = np.full(r.shape, np.nan)
    ok = np.isfinite(r) & (r > 0)
    keys = np.ceil(np.log10(r[ok]) * 100 - 1e-9) / 100  # the engine's cache grid (rounded up, as it does)
    uniq, inv = np.unique(keys, return_inverse=True)
    out[ok] = np.array([truncated_log_threshold(ALPHA, float(10**k)) for k in uniq])[inv]
    return out


def _simulate(runs: int, lift: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per run: crossed (any look / daily looks) with its sign, CS coverage at all looks, fixed-horizon verdict."""
    looks = USERS_PER_ARM // STEP
    n = STEP * np.arange(1, looks + 1, dtype=float)
    daily = np.round(np.arange(1, DAYS + 1) * looks / DAYS).astype(int) - 1
    p_a, p_b = BASE_RATE, BASE_RATE * (1 + lift)
    theta, theta_lift = p_b - p_a, lift
    out: dict[str, list[np.ndarray]] = {k: [] for k in
                                        ("any_up", "any_down", "day_up", "day_down", "covered", "covered_daily",
                                         "covered_lift", "covered_lift_daily", "covered_lift_delta", "fixed_up")}
    for start in range(0, runs, CHUNK):
        m = min(CHUNK, runs - start)
        xa = np.cumsum(rng.binomial(STEP, p_a, (m, looks)), axis=1)
        xb = np.cumsum(rng.binomial(STEP, p_b, (m, looks)), axis=1)
        ma, mb = xa / n, xb / n
        var_a, var_b = ma * (1 - ma) * n / (n - 1), mb * (1 - mb) * n / (n - 1)  # per-user sample variances
        v = var_a / n + var_b / n
        ok = (v > 0) & (ma > 0)
        v = np.where(ok, v, np.nan)
        diff = mb - ma
        tau = LIFT * ma  # the plan: τ = relative MDE × the control mean seen at this look
        r = np.where(ok, tau**2 / ((var_a + var_b) / USERS_PER_ARM), np.nan)
        log_c = _thresholds(r)
        tau_safe = np.where(ok, tau, 1.0)
        llr = diff**2 * tau_safe**2 / (2 * v * (v + tau_safe**2)) - 0.5 * np.log1p(tau_safe**2 / v)
        crossed = ok & (llr >= log_c)
        out["any_up"].append((crossed & (diff > 0)).any(axis=1))
        out["any_down"].append((crossed & (diff < 0)).any(axis=1))
        out["day_up"].append((crossed[:, daily] & (diff[:, daily] > 0)).any(axis=1))
        out["day_down"].append((crossed[:, daily] & (diff[:, daily] < 0)).any(axis=1))
        # confidence sequences at every look: the difference's, the lift's (Fieller: the roots of the quadratic
        # with the difference's critical value z = w/sqrt(V)), and the delta-method lift sequence it replaced
        w = np.sqrt(np.maximum((1 + tau_safe**2 / v) * (2 * log_c + np.log1p(tau_safe**2 / v)), 0)) * v / tau_safe
        cover = np.where(ok, np.abs(diff - theta) <= w, True)
        out["covered"].append(cover.all(axis=1))
        out["covered_daily"].append(cover[:, daily].all(axis=1))
        low, high = lift_sequence(ma, mb, var_a / n, var_b / n, w / np.sqrt(v))
        cover_lift = np.where(ok, (low <= theta_lift) & (theta_lift <= high), True)
        out["covered_lift"].append(cover_lift.all(axis=1))
        out["covered_lift_daily"].append(cover_lift[:, daily].all(axis=1))
        v_lift = var_b / (n * ma**2) + mb**2 * var_a / (n * ma**4)
        tau_lift = tau_safe / np.where(ok, ma, 1.0)
        w_lift = np.sqrt(np.maximum((1 + tau_lift**2 / v_lift) * (2 * log_c + np.log1p(tau_lift**2 / v_lift)), 0)) \
            * v_lift / tau_lift
        lift_hat = mb / np.where(ok, ma, np.nan) - 1
        out["covered_lift_delta"].append(np.where(ok, np.abs(lift_hat - theta_lift) <= w_lift, True).all(axis=1))
        # fixed-horizon Welch test read once at 50,000 per arm (df ~ 1e5: the normal quantile)
        z = diff[:, -1] / np.sqrt(v[:, -1])
        out["fixed_up"].append(z > stats.norm.ppf(1 - ALPHA / 2))
    return {k: np.concatenate(vs) for k, vs in out.items()}


def _share(hits: np.ndarray) -> dict[str, float | int | list[float]]:
    k, n = int(hits.sum()), len(hits)
    return {"value": k / n, "ci95": list(binomial_ci(k, n)), "runs": n}


def _coverage(effect: dict[str, np.ndarray]) -> dict:
    """Any-time coverage of both sequences the report shows; the headline is the smaller (the bar is on each)."""
    diff, lift = _share(effect["covered"]), _share(effect["covered_lift"])
    worst = min(diff, lift, key=lambda share: share["value"])
    return {"value": worst["value"], "ci95": worst["ci95"], "runs": worst["runs"],
            "headline": "min(difference, lift) at all 1,000 looks",
            "difference_every_100_users": diff, "daily": _share(effect["covered_daily"]),
            "lift_every_100_users": lift, "lift_daily": _share(effect["covered_lift_daily"]),
            "lift_delta_method_every_100_users": _share(effect["covered_lift_delta"])}


def _ratio_ci(seq: np.ndarray, fixed: np.ndarray, rng: np.random.Generator, reps: int = 4000) -> list[float]:
    """Bootstrap 95% interval of mean(seq)/mean(fixed) over paired runs (multinomial over the 4 outcomes)."""
    cells = np.array([(seq & fixed).sum(), (seq & ~fixed).sum(), (~seq & fixed).sum(), (~seq & ~fixed).sum()])
    draws = rng.multinomial(len(seq), cells / cells.sum(), size=reps)
    ratio = (draws[:, 0] + draws[:, 1]) / np.maximum(draws[:, 0] + draws[:, 2], 1)
    return [float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))]


def run_bench(runs: int = 20_000, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"):  # looks with no conversion yet are masked out
        aa = _simulate(runs, 0.0, rng)
        effect = _simulate(runs, LIFT, rng)
    fpr_daily = _share(aa["day_up"] | aa["day_down"])
    fpr_100 = _share(aa["any_up"] | aa["any_down"])
    seq_power, fixed_power = effect["day_up"], effect["fixed_up"]
    ratio = float(seq_power.mean() / fixed_power.mean())
    result = {
        "bench": "experiments",
        "design": {"users_per_arm": USERS_PER_ARM, "days": DAYS, "base_rate": BASE_RATE, "lift": LIFT,
                   "alpha": ALPHA, "plan": {"mde": LIFT, "relative": True, "planned_users_per_arm": USERS_PER_ARM},
                   "looks": {"daily": DAYS, "every_100_users": USERS_PER_ARM // STEP}},
    }
    details = {
        "aa_fpr_peeking": {"daily": fpr_daily, "every_100_users": fpr_100,
                           "value": max(fpr_daily["value"], fpr_100["value"])},
        "coverage_any_time": _coverage(effect),
        "power_ratio_vs_fixed": {"value": ratio, "ci95": _ratio_ci(seq_power, fixed_power, rng), "runs": runs,
                                 "sequential_daily": _share(seq_power), "sequential_every_100_users":
                                 _share(effect["any_up"]), "fixed_horizon": _share(fixed_power)},
    }
    # the three headline figures as plain numbers (the worst case of each, as the bar reads them), then the
    # intervals, run counts and per-schedule figures behind them
    headline = {key: details[key]["value"] for key in details}
    return {**result, **headline, "details": details, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20_000, help="simulated tests per scenario (default: 20000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.runs < 100:
        ap.error("--runs must be at least 100")
    result = run_bench(args.runs, args.seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
