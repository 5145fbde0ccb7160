"""A/B analysis: the statistics must agree with scipy, hold their error rates, and find planted effects.

Simulated experiments use ``experiments.assignment`` to split users, so these tests also check that hash-based
assignment behaves like randomisation. Every simulation has a fixed seed and runs in well under 10 s.
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
from scipy import stats

from experiments.assignment import Experiment, assign
from experiments.metrics import METRICS, attribute, per_user_metrics
from experiments.report import ABReport, ab_report, render_html
from experiments.stats import adjust_pvalues, cuped, srm_check, welch_test

T0 = 1_700_000_000_000  # ms
ITEMS_PER_REQUEST = 10
TWO_ARMS = {"control": 0.5, "treatment": 0.5}


# =============================================================================== simulator


def _experiment(weights: dict[str, float], salt: str) -> Experiment:
    variants = [{"name": k, "weight": w, "target": "popularity"} for k, w in weights.items()]
    return Experiment(name="sim", salt=salt, variants=variants)  # type: ignore[arg-type]


def simulate(
    n_users: int,
    *,
    effect: float = 0.0,
    seed: int = 0,
    salt: str = "sim",
    weights: dict[str, float] | None = None,
    window_s: int = 3600,
    pre_events: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Exposure and interaction logs of a music A/B test; ``effect`` scales listen propensity in non-control arms.

    Users differ a lot (Beta(2, 8) listen propensity, Poisson request counts): realistic heavy-tailed
    per-user metrics, and a pre-period driven by the same propensity so CUPED has something to use.
    """
    weights = weights or TWO_ARMS
    rng = np.random.default_rng(seed)
    exp = _experiment(weights, salt)
    users = np.arange(n_users)
    variant = np.array([assign(exp, int(u)) for u in users])
    propensity = rng.beta(2, 8, n_users)
    n_requests = rng.poisson(2, n_users) + 1
    ex_user = np.repeat(users, n_requests)
    ex_variant = variant[ex_user]
    n_ex = len(ex_user)
    request_ids = np.array([f"{salt}-r{i}" for i in range(n_ex)])
    ex_ts = T0 + rng.integers(0, 7 * 86_400_000, n_ex)
    items = rng.integers(0, 5000, (n_ex, ITEMS_PER_REQUEST))
    p = np.clip(propensity[ex_user] * np.where(ex_variant == "control", 1.0, 1.0 + effect), 0, 1)
    listen = rng.random((n_ex, ITEMS_PER_REQUEST)) < p[:, None]
    skip = ~listen & (rng.random((n_ex, ITEMS_PER_REQUEST)) < 0.3)
    like = listen & (rng.random((n_ex, ITEMS_PER_REQUEST)) < 0.2)
    frames = []
    for kind, mask in (("listen", listen), ("skip", skip), ("like", like)):
        r, c = np.nonzero(mask)
        ratio = {"listen": rng.uniform(0.5, 1.0, len(r)), "skip": rng.uniform(0.0, 0.2, len(r))}.get(kind)
        frames.append(
            pd.DataFrame(
                {
                    "user_id": ex_user[r],
                    "item_id": items[r, c],
                    "event_type": kind,
                    "timestamp_ms": ex_ts[r] + rng.integers(0, window_s * 1000, len(r)),
                    "played_ratio": np.nan if ratio is None else ratio,
                    "source": "recommended",
                    "request_id": request_ids[r],
                    "variant": ex_variant[r],
                }
            )
        )
    interactions = pd.concat(frames, ignore_index=True)
    interactions.insert(0, "event_id", [f"{salt}-e{i}" for i in range(len(interactions))])
    exposures = pd.DataFrame(
        {
            "request_id": request_ids,
            "user_id": ex_user,
            "variant": ex_variant,
            "timestamp_ms": ex_ts,
            "items": list(items),
        }
    )
    pre = None
    if pre_events:
        n_pre = rng.poisson(pre_events, n_users)
        pre_user = np.repeat(users, n_pre)
        listened = rng.random(len(pre_user)) < np.clip(3 * propensity[pre_user], 0, 1)
        pre = pd.DataFrame(
            {
                "event_id": [f"{salt}-p{i}" for i in range(len(pre_user))],
                "user_id": pre_user,
                "item_id": rng.integers(0, 5000, len(pre_user)),
                "event_type": np.where(listened, "listen", "skip"),
                "timestamp_ms": T0 - 86_400_000,
                "played_ratio": np.where(listened, 0.8, 0.1),
                "source": "organic",
                "request_id": None,
                "variant": None,
            }
        )
    return exposures, interactions, pre


# =============================================================================== Welch


def test_welch_equals_scipy_and_welch_satterthwaite() -> None:
    rng = np.random.default_rng(1)
    a = rng.lognormal(0.0, 1.0, 150)
    b = rng.lognormal(0.1, 1.3, 90)
    res = welch_test(a, b, alpha=0.1)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(confidence_level=0.9)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    ws_df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert res.df == pytest.approx(ws_df, rel=1e-12)
    half = stats.t.ppf(0.95, ws_df) * math.sqrt(va + vb)
    assert (res.ci_low, res.ci_high) == pytest.approx((res.diff - half, res.diff + half), rel=1e-12)
    assert res.diff == pytest.approx(b.mean() - a.mean())
    assert res.rel_lift == pytest.approx(b.mean() / a.mean() - 1)
    assert res.rel_lift_ci_low < res.rel_lift < res.rel_lift_ci_high  # type: ignore[operator]
    assert (res.n_a, res.n_b) == (150, 90)


def test_welch_drops_nans_and_rejects_tiny_arms() -> None:
    res = welch_test([1.0, 2.0, np.nan, 3.0], [2.0, np.inf, 4.0, 6.0])
    assert (res.n_a, res.n_b) == (3, 3)
    assert res.p_value == pytest.approx(stats.ttest_ind([2, 4, 6], [1, 2, 3], equal_var=False).pvalue)
    with pytest.raises(ValueError, match="at least 2"):
        welch_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        welch_test([1.0, 2.0], [1.0, 2.0], alpha=1.5)


def test_welch_constant_arms_and_zero_control_mean() -> None:
    res = welch_test([0.0, 0.0, 0.0], [0.0, 0.0])
    assert math.isnan(res.p_value) and res.ci_low == res.ci_high == 0.0
    assert res.rel_lift is None  # no relative lift against a zero baseline


def test_confidence_interval_coverage() -> None:
    # 95% intervals must contain the true difference / lift ~95% of the time, on skewed data.
    rng = np.random.default_rng(7)
    sims, n = 1000, 200
    true_a, true_b = math.exp(0.5), 1.1 * math.exp(0.5)  # lognormal(0, 1) means; B is +10%
    diff_hits = lift_hits = 0
    for _ in range(sims):
        a = rng.lognormal(0.0, 1.0, n)
        b = 1.1 * rng.lognormal(0.0, 1.0, n)
        r = welch_test(a, b)
        diff_hits += r.ci_low <= true_b - true_a <= r.ci_high
        lift_hits += r.rel_lift_ci_low <= 0.1 <= r.rel_lift_ci_high  # type: ignore[operator]
    # Binomial(1000, 0.95) has sd 0.007; skewness costs Welch a little coverage at n=200.
    assert 0.925 <= diff_hits / sims <= 0.97, diff_hits / sims
    assert 0.92 <= lift_hits / sims <= 0.97, lift_hits / sims


def test_aa_false_positive_rate() -> None:
    """1000 simulated A/A experiments, heavy-tailed per-user outcomes: FPR must be 0.05 ± 0.03."""
    rng = np.random.default_rng(2024)
    sims, false_positives = 1000, 0
    for _ in range(sims):
        n = rng.integers(150, 400, 2)
        # zero-inflated lognormal: most users listen a little, a few a lot, 30% not at all
        a = rng.lognormal(1.0, 1.2, n[0]) * (rng.random(n[0]) > 0.3)
        b = rng.lognormal(1.0, 1.2, n[1]) * (rng.random(n[1]) > 0.3)
        false_positives += welch_test(a, b).p_value < 0.05
    rate = false_positives / sims
    print(f"A/A false-positive rate (per-user outcomes, {sims} sims): {rate:.3f}")
    assert abs(rate - 0.05) <= 0.03, rate


def test_aa_false_positive_rate_through_assignment_and_pipeline() -> None:
    """200 A/A re-randomisations of one simulated log through attribution, per-user metrics and hashing.

    The variant only keys rows in ``per_user_metrics``, so relabelling users by a fresh salt and re-testing
    is exactly what ``ab_report`` would do on the relabelled logs — at a fraction of the cost.
    """
    exposures, interactions, _ = simulate(600, seed=3, salt="aa-base")
    users = per_user_metrics(exposures, attribute(exposures, interactions, window_s=3600))
    users = users.groupby("user_id", as_index=False)[list(METRICS)].first()  # one row per user
    rejections = {m: 0 for m in METRICS}
    sims = 200
    for s in range(sims):
        exp = _experiment(TWO_ARMS, salt=f"aa-{s}")
        labels = np.array([assign(exp, int(u)) for u in users["user_id"]])
        for m in METRICS:
            values = users[m].to_numpy(dtype=float)
            rejections[m] += welch_test(values[labels == "control"], values[labels == "treatment"]).p_value < 0.05
    rates = {m: r / sims for m, r in rejections.items()}
    pooled = sum(rejections.values()) / (sims * len(METRICS))
    print(f"A/A false-positive rate through the pipeline: pooled {pooled:.3f}, per metric {rates}")
    assert abs(pooled - 0.05) <= 0.03, rates
    assert all(abs(r - 0.05) <= 0.05 for r in rates.values()), rates


# =============================================================================== SRM


def _hash_split(n_users: int, salt: str) -> dict[str, int]:
    exp = _experiment(TWO_ARMS, salt)
    labels = [assign(exp, u) for u in range(n_users)]
    return {"control": labels.count("control"), "treatment": labels.count("treatment")}


def test_srm_balanced_split_is_not_flagged() -> None:
    counts = _hash_split(10_000, "srm-balanced")
    res = srm_check(counts, TWO_ARMS)
    assert not res.flagged and res.p_value > 0.001 and res.df == 1
    assert res.expected == pytest.approx({"control": 5000.0, "treatment": 5000.0})


def test_srm_flags_planted_ten_percent_imbalance() -> None:
    counts = _hash_split(10_000, "srm-planted")
    counts["treatment"] = int(counts["treatment"] * 0.9)  # 10% of treatment users lost (e.g. a crash)
    res = srm_check(counts, TWO_ARMS)
    assert res.flagged and res.p_value < 1e-6
    ref = stats.chisquare(list(counts.values()))
    assert res.statistic == pytest.approx(ref.statistic) and res.p_value == pytest.approx(ref.pvalue)


def test_srm_unequal_weights_missing_and_unexpected_variants() -> None:
    assert not srm_check({"a": 902, "b": 98}, {"a": 0.9, "b": 0.1}).flagged
    assert srm_check({"a": 500, "b": 500}, {"a": 0.9, "b": 0.1}).flagged
    missing = srm_check({"a": 1000}, {"a": 0.5, "b": 0.5})
    assert missing.observed == {"a": 1000, "b": 0} and missing.flagged
    rogue = srm_check({"a": 500, "b": 500, "ghost": 3}, {"a": 0.5, "b": 0.5})
    assert rogue.flagged and rogue.unexpected_variants == ["ghost"]
    with pytest.raises(ValueError, match="positive"):
        srm_check({"a": 1}, {"a": 0.0})
    with pytest.raises(ValueError, match="no units"):
        srm_check({"a": 0}, {"a": 1.0})


def test_ab_report_flags_srm_from_lost_exposure_logs() -> None:
    exposures, interactions, _ = simulate(4000, seed=11, salt="srm-e2e")
    rng = np.random.default_rng(0)
    treated = exposures.loc[exposures["variant"] == "treatment", "user_id"].unique()
    lost = rng.choice(treated, size=len(treated) // 10, replace=False)
    kept = exposures[~exposures["user_id"].isin(lost)]
    planted = ab_report(kept, interactions, control="control", window_s=3600, weights=TWO_ARMS)
    assert planted.srm.flagged
    assert any("SAMPLE RATIO MISMATCH" in n for n in planted.notes)
    clean = ab_report(exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS)
    assert not clean.srm.flagged


# =============================================================================== effects, CUPED, correction


@pytest.mark.parametrize("effect", [0.3, -0.3])
def test_planted_effect_is_detected_with_the_right_sign(effect: float) -> None:
    exposures, interactions, _ = simulate(2000, effect=effect, seed=5, salt=f"effect-{effect}")
    report = ab_report(exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS)
    for metric in ("listens", "listening_time", "hit_rate"):
        t = report.test(metric)
        assert t.significant, (metric, t.p_adjusted)
        assert np.sign(t.result.diff) == np.sign(effect)
        assert np.sign(t.result.ci_low) == np.sign(t.result.ci_high) == np.sign(effect)
        assert np.sign(t.result.rel_lift) == np.sign(effect)  # type: ignore[arg-type]
    # True relative lift of listens is the planted effect; the interval should contain it.
    listens = report.test("listens").result
    assert listens.rel_lift_ci_low <= effect <= listens.rel_lift_ci_high  # type: ignore[operator]
    assert not report.test("exposures").significant  # the effect does not touch request counts


def test_cuped_reduces_variance_when_covariate_correlates() -> None:
    rng = np.random.default_rng(3)
    x = rng.gamma(2.0, 2.0, 5000)
    y = 0.8 * x + rng.normal(0, 1.5, 5000)
    res = cuped(y, x)
    rho = np.corrcoef(x, y)[0, 1]
    assert res.variance_reduction == pytest.approx(rho**2, rel=1e-9)
    assert res.variance_reduction > 0.5
    assert res.adjusted.var(ddof=1) < y.var(ddof=1)
    assert res.adjusted.mean() == pytest.approx(y.mean())  # CUPED shifts noise, not the mean
    assert res.theta == pytest.approx(np.cov(y, x)[0, 1] / x.var(ddof=1))
    unrelated = cuped(y, rng.normal(size=5000))
    assert unrelated.variance_reduction < 0.01
    constant = cuped(y, np.ones(5000))
    assert constant.theta == 0 and constant.variance_reduction == 0


def test_cuped_input_validation() -> None:
    with pytest.raises(ValueError, match="equal length"):
        cuped([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        cuped([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])


def test_ab_report_with_pre_period_narrows_intervals() -> None:
    exposures, interactions, pre = simulate(1500, effect=0.1, seed=9, salt="cuped-e2e", pre_events=40)
    plain = ab_report(exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS)
    adjusted = ab_report(
        exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS, pre_period=pre
    )
    # hit_rate is a ratio of sums now (delta method), analysed without CUPED
    assert not adjusted.test("hit_rate").cuped and adjusted.test("hit_rate").ratio
    for metric in ("listens", "listening_time"):
        p, c = plain.test(metric), adjusted.test(metric)
        assert c.cuped and not p.cuped and c.variance_reduction > 0.2  # type: ignore[operator]
        assert (c.result.ci_high - c.result.ci_low) < (p.result.ci_high - p.result.ci_low)
        # same estimand: the two estimates agree within the plain interval
        assert p.result.ci_low <= c.result.diff <= p.result.ci_high


def test_benjamini_hochberg_adjustment() -> None:
    adjusted = adjust_pvalues([0.01, 0.04, 0.03, 0.2, float("nan")])
    assert adjusted[:4] == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert math.isnan(adjusted[4])
    assert adjust_pvalues([]) == []


# =============================================================================== attribution & metrics


def _exposures() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_id": ["r1", "r2", "r3"],
            "user_id": [1, 1, 2],
            "variant": ["control", "control", "treatment"],
            "timestamp_ms": [T0, T0 + 10_000_000, T0],
            "items": [[10, 11, 12], np.array([20, 21]), "[30, 31, 32, 33]"],  # list, array, JSON string
        }
    )


def _event(event_id: str, user: int, item: int, kind: str, dt_s: float, request: str | None, **kw: object) -> dict:
    return {
        "event_id": event_id,
        "user_id": user,
        "item_id": item,
        "event_type": kind,
        "timestamp_ms": T0 + int(dt_s * 1000),
        "played_ratio": kw.get("played_ratio"),
        "source": "recommended" if request else "organic",
        "request_id": request,
        "variant": kw.get("variant", "control" if user == 1 else "treatment"),
    }


def _interactions() -> pd.DataFrame:
    return pd.DataFrame(
        [
            _event("e1", 1, 10, "listen", 5, "r1", played_ratio=0.9),  # kept
            _event("e2", 1, 10, "like", 6, "r1"),  # kept: second positive on the same served item
            _event("e3", 1, 11, "skip", 3600, "r1", played_ratio=0.1),  # kept: exactly at the window edge
            _event("e4", 1, 12, "listen", 3601, "r1", played_ratio=1.0),  # after the window
            _event("e5", 1, 12, "listen", -1, "r1", played_ratio=1.0),  # before the exposure
            _event("e6", 1, 99, "listen", 20, None, played_ratio=1.0),  # organic, no request_id
            _event("e7", 1, 99, "listen", 20, "nope", played_ratio=1.0),  # unknown request_id
            _event("e8", 2, 10, "listen", 20, "r1", played_ratio=1.0),  # another user's request
            _event("e1", 1, 10, "listen", 5, "r1", played_ratio=0.9),  # duplicate delivery of e1
            _event("e9", 1, 77, "listen", 10_010, "r2", played_ratio=0.5),  # kept, item not served
            _event("e10", 2, 31, "dislike", 30, "r3", variant="control"),  # kept, wrong logged variant
            _event("e11", 2, 32, "add_to_playlist", 40, "r3"),  # kept, a positive hit
        ]
    )


def test_attribution_keeps_only_matched_in_window_events() -> None:
    attributed = attribute(_exposures(), _interactions(), window_s=3600)
    assert sorted(attributed["event_id"]) == sorted(["e1", "e2", "e3", "e9", "e10", "e11"])
    by_id = attributed.set_index("event_id")
    assert by_id.loc["e10", "variant"] == "treatment"  # the exposure's variant wins over the logged one
    assert by_id["served"].to_dict() == {"e1": True, "e2": True, "e3": True, "e9": False, "e10": True, "e11": True}
    assert (by_id["exposure_ts_ms"] <= by_id["timestamp_ms"]).all()
    # A shorter window drops the edge event too.
    assert "e3" not in set(attribute(_exposures(), _interactions(), window_s=60)["event_id"])
    with pytest.raises(ValueError, match="window_s"):
        attribute(_exposures(), _interactions(), window_s=0)
    with pytest.raises(ValueError, match="missing columns"):
        attribute(_exposures().drop(columns="items"), _interactions(), window_s=60)


def test_per_user_metrics_by_hand() -> None:
    exposures = pd.concat(
        [_exposures(), pd.DataFrame([{"request_id": "r4", "user_id": 3, "variant": "treatment",
                                      "timestamp_ms": T0, "items": [1, 2]}])],
        ignore_index=True,
    )
    users = per_user_metrics(exposures, attribute(exposures, _interactions(), window_s=3600)).set_index("user_id")
    u1, u2, u3 = users.loc[1], users.loc[2], users.loc[3]
    assert (u1["variant"], u1["exposures"], u1["listens"], u1["likes"], u1["skips"]) == ("control", 2, 2, 1, 1)
    assert u1["listening_time"] == pytest.approx(0.9 + 0.1 + 0.5)
    assert u1["like_rate"] == pytest.approx(1 / 2)
    assert u1["skip_rate"] == pytest.approx(1 / 3)
    assert u1["hit_rate"] == pytest.approx(1 / 5)  # item 10 of r1; item 77 was not served
    assert u2["hit_rate"] == pytest.approx(1 / 4)  # add_to_playlist counts, dislike does not
    assert math.isnan(u2["skip_rate"])  # no plays
    # Exposed but silent users are kept with zeros: dropping them would bias the arm.
    assert (u3["exposures"], u3["listens"], u3["listening_time"], u3["hit_rate"]) == (1, 0, 0.0, 0.0)


# =============================================================================== the report


def test_ab_report_end_to_end_renders(tmp_path: Path) -> None:
    weights = {"control": 0.4, "hstu": 0.3, "sasrec": 0.3}
    exposures, interactions, pre = simulate(600, effect=0.2, seed=4, salt="render", weights=weights, pre_events=20)
    # one user leaks into a second arm: must be excluded and reported
    first = exposures.iloc[[0]]
    leak = first.assign(request_id="leak", variant="hstu" if first["variant"].iloc[0] != "hstu" else "sasrec")
    report = ab_report(
        pd.concat([exposures, leak], ignore_index=True), interactions, control="control", window_s=3600,
        weights=weights, pre_period=pre, name="hstu-vs-popularity",
    )
    assert {(t.metric, t.treatment) for t in report.tests} == {(m, v) for m in METRICS for v in ("hstu", "sasrec")}
    assert [v.variant for v in report.variants] == ["control", "hstu", "sasrec"]
    assert any("more than one variant" in n for n in report.notes)
    assert sum(v.users for v in report.variants) == 599
    assert all(t.p_adjusted >= t.result.p_value for t in report.tests)
    assert ABReport.model_validate_json(report.model_dump_json()).tests[0].metric == report.tests[0].metric

    md = report.to_markdown()
    assert md.startswith("# A/B report: hstu-vs-popularity") and "| listens | hstu |" in md and "SRM: ok" in md

    out = render_html(report, tmp_path / "reports" / "ab.html")
    page = out.read_text(encoding="utf-8")
    png = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert png is not None and base64.b64decode(png.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<table>" in page and "hstu-vs-popularity" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_ab_report_input_errors() -> None:
    exposures, interactions, _ = simulate(50, seed=1)
    with pytest.raises(ValueError, match="control 'baseline'"):
        ab_report(exposures, interactions, control="baseline", window_s=60, weights=TWO_ARMS)
    with pytest.raises(ValueError, match="no exposed users"):
        only_treatment = exposures[exposures["variant"] == "treatment"]
        ab_report(only_treatment, interactions, control="control", window_s=60, weights=TWO_ARMS)


def test_report_json_is_plain_json() -> None:
    exposures, interactions, _ = simulate(200, seed=2)
    report = ab_report(exposures, interactions, control="control", window_s=3600, weights=TWO_ARMS)
    data = json.loads(report.model_dump_json())
    assert data["srm"]["flagged"] is False and len(data["tests"]) == len(METRICS)


# ------------------------------------------------------------------ sequential testing and guardrails


def test_always_valid_p_survives_peeking_where_welch_does_not():
    """Peek after every 50 users per arm, stop at the first p < 0.05: under A/A the fixed-horizon Welch
    p-value is fooled far more than 5% of the time; the mSPRT p-value stays under alpha."""
    from experiments.stats import msprt_p_value, welch_test

    rng = np.random.default_rng(11)
    runs, looks, step = 200, 20, 50
    fooled_welch = fooled_msprt = 0
    for _ in range(runs):
        a = rng.exponential(1.0, looks * step)
        b = rng.exponential(1.0, looks * step)
        welch_hit = msprt_hit = False
        for k in range(1, looks + 1):
            r = welch_test(a[: k * step], b[: k * step])
            welch_hit |= r.p_value < 0.05
            msprt_hit |= (msprt_p_value(r, tau=0.1) or 1.0) < 0.05  # τ: effects of 0.1 SD
        fooled_welch += welch_hit
        fooled_msprt += msprt_hit
    assert fooled_welch / runs > 0.12  # peeking breaks the fixed-horizon test
    assert fooled_msprt / runs <= 0.05


def test_always_valid_p_detects_a_real_effect():
    from experiments.stats import msprt_p_value, welch_test

    rng = np.random.default_rng(3)
    r = welch_test(rng.normal(1.0, 1.0, 2000), rng.normal(1.2, 1.0, 2000))
    assert msprt_p_value(r, tau=0.2) < 0.01  # τ = the planted effect


def test_guardrail_breach_is_flagged_only_on_the_harmful_side():
    from experiments.stats import _harmful, welch_test

    rng = np.random.default_rng(5)
    worse = welch_test(rng.normal(0.2, 0.1, 500), rng.normal(0.3, 0.1, 500))  # skip rate went up
    better = welch_test(rng.normal(0.3, 0.1, 500), rng.normal(0.2, 0.1, 500))
    assert _harmful(worse, "skip_rate", 0.05) and not _harmful(better, "skip_rate", 0.05)
    assert _harmful(better, "listens", 0.05) and not _harmful(worse, "listens", 0.05)
