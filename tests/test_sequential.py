"""The sequential readout: the boundary's algebra, its error under peeking, ratio metrics, planning, the report.

Simulations are vectorised (running sums per look), seeded, and each takes a few seconds.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import optimize, stats

from experiments.assignment import Experiment
from experiments.report import ab_report, render_html, sequential_png
from experiments.sequential import (
    SequentialPlan,
    crossing_probability,
    fixed_sample_size,
    half_width,
    lift_log_lr,
    lift_sequence,
    log_lr,
    sequential_power,
    sequential_sample_size,
    sequential_test,
    truncated_log_threshold,
)
from experiments.stats import msprt_p_value, ratio_test, welch_test
from tests.test_analysis import TWO_ARMS, simulate

# =============================================================================== the boundary


def test_confidence_sequence_is_the_set_where_the_mixture_has_not_crossed() -> None:
    """Endpoints solved directly from Λ(θ) = c (θ moved into the statistic) equal the closed form."""
    d, v, tau = 0.013, 2.5e-5, 0.004
    for log_c in (math.log(20), 2.14):
        w = float(half_width(v, tau, log_c))
        for sign in (1, -1):
            theta = optimize.brentq(lambda t: float(log_lr(d - t, v, tau)) - log_c, d, d + sign * 1.0)
            assert theta == pytest.approx(d + sign * w, rel=1e-9)
        # the textbook form of the same half-width
        assert w == pytest.approx(math.sqrt(v * (v + tau**2) / tau**2 * (2 * log_c + math.log((v + tau**2) / v))))


def test_lift_sequence_endpoints_are_where_the_contrast_mixture_crosses() -> None:
    """Fieller's roots are the lifts λ where log Λ(D_λ, V_λ, τ_λ) = log c, found again by a root search; at λ = 0
    the contrast is the difference, so the lift's sequence excludes 0 exactly when the difference's does."""
    m_a, m_b, var_a, var_b, tau = 0.1, 0.106, 0.09 * 0.1 / 4000, 0.096 * 0.106 / 3000, 0.005
    v = var_a + var_b
    for log_c in (math.log(20), 2.14):
        z = float(half_width(v, tau, log_c)) / math.sqrt(v)
        low, high = (float(x) for x in lift_sequence(m_a, m_b, var_a, var_b, z))
        assert low < m_b / m_a - 1 < high
        for end in (low, high):
            assert float(lift_log_lr(end, m_a, m_b, var_a, var_b, tau)) == pytest.approx(log_c, rel=1e-9)

        def excess(lam: float, c: float = log_c) -> float:
            return float(lift_log_lr(lam, m_a, m_b, var_a, var_b, tau)) - c

        assert optimize.brentq(excess, m_b / m_a - 1, 5.0, xtol=1e-14) == pytest.approx(high, abs=1e-10)
        assert optimize.brentq(excess, -0.99, m_b / m_a - 1, xtol=1e-14) == pytest.approx(low, abs=1e-10)
        assert float(lift_log_lr(0.0, m_a, m_b, var_a, var_b, tau)) == pytest.approx(float(log_lr(m_b - m_a, v, tau)))
        # the interval is asymmetric around the estimate: longer on the side the ratio is skewed to
        assert high - (m_b / m_a - 1) > (m_b / m_a - 1) - low
    # a control mean within z standard errors of 0: no lift can be excluded, the set is reported unbounded
    low, high = lift_sequence(0.002, 0.004, 1e-6, 1e-6, 2.5)
    assert low == -math.inf and high == math.inf


def test_report_lift_sequence_fieller_cuped_and_unbounded() -> None:
    rng = np.random.default_rng(11)
    r = welch_test(rng.normal(10, 3, 4000), rng.normal(10.4, 3, 4000))
    seq = sequential_test(r, SequentialPlan(mde=0.05, planned_users_per_arm=20_000))
    assert seq is not None and seq.lift_cs_low is not None and seq.lift_cs_high is not None
    assert seq.lift_cs_low < r.rel_lift < seq.lift_cs_high and seq.lift_cs_note is None  # type: ignore[operator]
    var_a, var_b = r.std_a**2 / r.n_a, r.std_b**2 / r.n_b
    for end in (seq.lift_cs_low, seq.lift_cs_high):
        assert float(lift_log_lr(end, r.mean_a, r.mean_b, var_a, var_b, seq.tau)) == pytest.approx(seq.log_threshold)
    assert (seq.lift_cs_low > 0) == (seq.cs_low > 0)
    # CUPED: the lift is the adjusted difference over the raw control mean, a constant
    cuped = sequential_test(r, None, baseline=9.5)
    assert cuped is not None
    assert cuped.lift_cs_low == pytest.approx(cuped.cs_low / 9.5)
    assert cuped.lift_cs_high == pytest.approx(cuped.cs_high / 9.5)
    # a metric whose control mean is not yet told apart from 0: no endpoints, and the report says why
    noisy = welch_test(rng.normal(0.05, 3, 400), rng.normal(0.1, 3, 400))
    q = sequential_test(noisy, SequentialPlan(mde=0.5, relative=False))
    assert q is not None and q.lift_cs_low is None and q.lift_cs_high is None
    assert q.lift_cs_note is not None and "unbounded" in q.lift_cs_note


def _lift_coverage(runs: int, m_a: float, lift: float, sd: float, n_final: int, looks: int,
                   rng: np.random.Generator) -> tuple[float, float]:
    """Share of runs whose lift sequence holds the true lift at every look: Fieller's, and the delta method's
    (``lift ± half_width(V_L, τ/|x̄_a|)``) that it replaced. τ = the lift × the control mean (the plan's MDE)."""
    n = n_final * np.arange(1, looks + 1) / looks
    steps = np.diff(np.concatenate([[0.0], n]))
    mean_a = np.cumsum(rng.normal(steps * m_a, np.sqrt(steps) * sd, (runs, looks)), axis=1) / n
    mean_b = np.cumsum(rng.normal(steps * m_a * (1 + lift), np.sqrt(steps) * sd, (runs, looks)), axis=1) / n
    var = sd**2 / n
    tau = lift * m_a
    log_c = truncated_log_threshold(0.05, tau**2 / (2 * sd**2 / n_final))
    inside = lift_log_lr(lift, mean_a, mean_b, var, var, tau) < log_c  # the set itself, not its hull
    low, high = lift_sequence(mean_a, mean_b, var, var, half_width(2 * var, tau, log_c) / np.sqrt(2 * var))
    assert (inside <= ((low <= lift) & (lift <= high))).all()  # the reported endpoints contain the set
    v_lift = var / mean_a**2 + mean_b**2 * var / mean_a**4
    delta = np.abs(mean_b / mean_a - 1 - lift) <= half_width(v_lift, tau / np.abs(mean_a), log_c)
    return float(inside.all(axis=1).mean()), float(delta.all(axis=1).mean())


def test_lift_sequence_covers_at_any_time() -> None:
    """The bench's design in the normal approximation (10% conversion, +5%, 50,000 per arm, τ = 5% of the control
    mean), 200 looks: ≥ 0.95 (0.957 ± 0.003 over seeds at this size)."""
    fieller, _ = _lift_coverage(6000, 0.1, 0.05, math.sqrt(0.1 * 0.9), 50_000, 200, np.random.default_rng(12))
    assert fieller >= 0.95


def test_lift_sequence_covers_where_the_delta_method_does_not() -> None:
    """A small, noisy control mean (1 ± 5 per user, +50%, 2,000 per arm): the ratio is strongly skewed; the
    symmetric delta-method sequence misses the truth in about 11% of runs, Fieller's in under 5%."""
    rng = np.random.default_rng(13)
    fieller, delta = _lift_coverage(4000, 1.0, 0.5, 5.0, 2000, 50, rng)
    assert fieller >= 0.95
    assert delta < 0.92


def test_untruncated_p_value_is_one_over_the_likelihood_ratio() -> None:
    rng = np.random.default_rng(0)
    r = welch_test(rng.normal(0, 1, 3000), rng.normal(0.08, 1, 3000))
    v = r.std_a**2 / r.n_a + r.std_b**2 / r.n_b
    tau = 0.05
    lam = math.sqrt(v / (v + tau**2)) * math.exp(r.diff**2 * tau**2 / (2 * v * (v + tau**2)))
    assert msprt_p_value(r, tau) == pytest.approx(min(1.0, 1 / lam), rel=1e-12)
    # no plan, no horizon: the always-valid p of the engine is the same 1/Λ with τ = 5% of the control mean
    r2 = welch_test(rng.normal(10, 1, 3000), rng.normal(10.2, 1, 3000))
    seq = sequential_test(r2, None)
    assert seq is not None and seq.tau == pytest.approx(0.05 * r2.mean_a)
    assert seq.always_valid_p == pytest.approx(msprt_p_value(r2, seq.tau), rel=1e-9)


def test_truncated_threshold_spends_exactly_alpha_and_agrees_with_brute_force() -> None:
    log_c = truncated_log_threshold(0.05, 7.0)
    assert log_c < math.log(20)  # the horizon frees α that the untruncated boundary never spends
    # calibrated on r rounded up to the cache grid: a hair conservative, never above α
    assert 0.0495 <= crossing_probability(log_c, 7.0) <= 0.05
    # brute force: Brownian paths on a fine grid (discrete looks cross a little less than continuous ones)
    rng = np.random.default_rng(1)
    steps, paths = 2000, 4000
    s = 7.0 * np.arange(1, steps + 1) / steps
    x = np.cumsum(rng.standard_normal((paths, steps)) * math.sqrt(7.0 / steps), axis=1)
    b = np.sqrt((1 + s) * (2 * log_c + np.log1p(s)))
    mc = (np.abs(x) >= b).any(axis=1).mean()
    assert 0.05 - 0.012 < mc <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / paths)
    # with drift 1 (τ = the true effect) the numerical power matches simulation too
    xd = x + s
    mc_power = ((xd >= b) | (xd <= -b)).any(axis=1).mean()
    assert mc_power == pytest.approx(sequential_power(7.0), abs=0.03)


def _aa_peeking(runs: int, looks: int, log_c: float, rng: np.random.Generator) -> tuple[float, float]:
    """Share of A/A tests that ever cross (sequential) and ever reach Welch p < 0.05, peeking at ``looks``."""
    n_final, sd, tau = 20_000, 1.0, 0.028  # τ = MDE: the effect 20,000 users per arm detect with 80% power
    n = n_final * np.arange(1, looks + 1) / looks
    steps = np.diff(np.concatenate([[0.0], n]))
    # sums of the arm difference per look: independent normal increments (the running sums a report sees)
    d = np.cumsum(rng.standard_normal((runs, looks)) * np.sqrt(2 * steps) * sd, axis=1) / n
    v = 2 * sd**2 / n
    seq = (log_lr(d, v, tau) >= log_c).any(axis=1).mean()
    fixed = (np.abs(d) / np.sqrt(v) > stats.norm.ppf(0.975)).any(axis=1).mean()
    return float(seq), float(fixed)


def test_aa_false_positive_rate_under_daily_and_frequent_peeking() -> None:
    """A/A with 14 daily looks and 200 looks: the truncated test stays ≤ α and uses it (≥ 0.02); the
    untruncated 1/α wastes most of α at daily looks; Welch with peeking is fooled far more than α."""
    rng = np.random.default_rng(7)
    runs = 20_000
    se = math.sqrt(0.05 * 0.95 / runs)
    r = 0.028**2 / (2 / 20_000)
    log_c = truncated_log_threshold(0.05, r)
    daily, welch_daily = _aa_peeking(runs, 14, log_c, rng)
    frequent, _ = _aa_peeking(runs, 200, log_c, rng)
    untruncated, _ = _aa_peeking(runs, 14, math.log(20), rng)
    assert 0.02 <= daily <= 0.05 + 3 * se
    assert daily < frequent <= 0.05 + 3 * se
    assert untruncated < 0.02  # the bug the truncation fixes: α left unspent
    assert welch_daily > 0.15


# =============================================================================== ratio metrics


def _ratio_users(n: int, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    plays = rng.poisson(rng.gamma(1.0, 4.0, n))  # heavy-tailed plays; many users with none
    p = np.clip(rng.beta(2, 8, n) * rate / 0.2, 0, 1)
    return rng.binomial(plays, p).astype(float), plays.astype(float)


def test_ratio_delta_variance_matches_the_bootstrap() -> None:
    rng = np.random.default_rng(3)
    num_a, den_a = _ratio_users(4000, 0.2, rng)
    num_b, den_b = _ratio_users(4000, 0.22, rng)
    assert (den_a == 0).any()  # users without plays stay in the sample
    res = ratio_test(num_a, den_a, num_b, den_b)
    assert res.mean_a == pytest.approx(num_a.sum() / den_a.sum())
    assert res.n_a == 4000 and res.n_b == 4000
    boots = 2000
    idx = rng.integers(0, 4000, (boots, 4000))
    ra = num_a[idx].sum(1) / den_a[idx].sum(1)
    rb = num_b[idx].sum(1) / den_b[idx].sum(1)
    assert res.std_a**2 / res.n_a == pytest.approx(ra.var(ddof=1), rel=0.1)
    assert (res.ci_high - res.diff) / stats.norm.ppf(0.975) == pytest.approx((rb - ra).std(ddof=1), rel=0.1)
    lift_se = (res.rel_lift_ci_high - res.rel_lift) / stats.norm.ppf(0.975)  # type: ignore[operator]
    assert lift_se == pytest.approx((rb / ra - 1).std(ddof=1), rel=0.1)


def test_skip_rate_guardrail_counts_every_assigned_user() -> None:
    exposures, interactions, _ = simulate(800, effect=0.0, seed=21, salt="guard")
    report = ab_report(exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS)
    t = report.test("skip_rate")
    control_users = next(v.users for v in report.variants if v.variant == "control")
    assert t.ratio and t.result.n_a == control_users  # users without plays are in the sample
    arm = next(v for v in report.variants if v.variant == "control").metrics["skip_rate"]
    assert arm.mean == pytest.approx(t.result.mean_a)


# =============================================================================== planning


def test_fixed_sample_size_against_the_z_test_power() -> None:
    mde, sd = 0.005, 0.3
    n = fixed_sample_size(mde, sd, 0.05, 0.8)

    def power(k: int) -> float:
        return float(stats.norm.sf(stats.norm.ppf(0.975) - mde / math.sqrt(2 * sd**2 / k)))

    assert power(n) >= 0.8 > power(n - 1)
    n_seq = sequential_sample_size(mde, sd, 0.05, 0.8)
    assert 1.2 < n_seq / n < 1.5  # the price of peeking, stated by `encore ab plan`
    assert sequential_power(mde**2 * n_seq / (2 * sd**2)) == pytest.approx(0.8, abs=0.005)


def test_encore_ab_plan_prints_both_horizons() -> None:
    from cli.ab import ab

    out = CliRunner().invoke(ab, ["plan", "--mde", "0.05", "--baseline-mean", "0.1", "--baseline-sd", "0.3",
                                  "--users-per-day", "8000", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["fixed_users_per_arm"] == fixed_sample_size(0.005, 0.3)
    assert data["sequential_users_per_arm"] > data["fixed_users_per_arm"]
    assert data["fixed_days"] == pytest.approx(data["fixed_users_per_arm"] / 4000)
    assert data["plan"]["planned_users_per_arm"] == data["sequential_users_per_arm"]
    text = CliRunner().invoke(ab, ["plan", "--mde", "0.05", "--baseline-mean", "0.1", "--baseline-sd", "0.3"])
    assert "sequential" in text.output and "x the fixed-horizon size" in text.output


def test_experiment_config_carries_a_plan() -> None:
    exp = Experiment.model_validate({
        "name": "planned", "salt": "s1", "variants": [{"name": "control", "weight": 0.5, "target": "popularity"},
                                                    {"name": "treatment", "weight": 0.5, "target": "popularity"}],
        "plan": {"mde": 0.05, "planned_users_per_arm": 40000}})
    assert exp.plan == SequentialPlan(mde=0.05, planned_users_per_arm=40000)
    with pytest.raises(ValueError, match="plan states"):
        SequentialPlan()


# =============================================================================== the report


def test_report_applies_and_explains_the_stopping_rule(tmp_path: Path) -> None:
    exposures, interactions, _ = simulate(1500, effect=0.5, seed=5, salt="decide")
    plan = SequentialPlan(mde=0.1, planned_users_per_arm=5000)
    report = ab_report(exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS, plan=plan)
    listens = report.test("listens")
    q = listens.sequential
    assert q is not None and q.decision == "treatment_better" and q.always_valid_p <= 0.05
    assert q.cs_low > 0 and q.lift_cs_low is not None and q.lift_cs_low > 0
    assert q.tau == pytest.approx(0.1 * listens.result.mean_a) and "MDE" in q.tau_source
    assert len(q.timeline) >= 7  # a look per day of the simulated week
    assert [lk.users_a for lk in q.timeline] == sorted(lk.users_a for lk in q.timeline)
    md = report.to_markdown()
    assert "## Sequential decisions" in md and "DECIDE: treatment better" in md and "decide now" in md

    null = ab_report(*simulate(600, effect=0.0, seed=6, salt="wait")[:2], control="control", window_s=3600,
                     weights=TWO_ARMS, plan=plan)
    assert null.test("listens").sequential.decision == "keep_running"  # type: ignore[union-attr]
    assert "keep running" in null.to_markdown()
    done = ab_report(*simulate(600, effect=0.0, seed=6, salt="wait")[:2], control="control", window_s=3600,
                     weights=TWO_ARMS, plan=SequentialPlan(mde=0.01, planned_users_per_arm=200))
    assert done.test("listens").sequential.decision == "horizon_reached"  # type: ignore[union-attr]

    assert sequential_png(report).startswith(b"\x89PNG\r\n\x1a\n")
    page = render_html(report, tmp_path / "ab.html").read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "Sequential decisions" in page and "confidence sequence" in page
    assert json.loads(report.model_dump_json())["tests"][0]["sequential"]["tau_source"]
    assert isinstance(pd.DataFrame([lk.model_dump() for lk in q.timeline]), pd.DataFrame)
