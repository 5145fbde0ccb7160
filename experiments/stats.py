"""The statistical tests of an A/B readout: Welch's t-test with CIs for the difference and the relative lift,
ratio metrics (ratio of sums, delta method), the sample-ratio-mismatch check, CUPED variance reduction, FDR
correction. The sequential (always-valid) readout is ``experiments.sequential``.

Statistics come from scipy (``ttest_ind(equal_var=False)``, ``chisquare``, ``false_discovery_control``);
only the delta-method CI of the relative lift and the CUPED adjustment are written out here, both a few
lines of textbook algebra.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from experiments.metrics import LOWER_IS_BETTER

# Chi-square p-value below which a sample-ratio mismatch is declared. Deliberately strict (industry
# practice): SRM is checked on every experiment all the time, and a false alarm halts analysis.
SRM_THRESHOLD = 0.001

class TestResult(BaseModel):
    """Welch two-sample comparison of arm B against arm A (``diff = mean_b - mean_a``)."""

    __test__ = False  # not a pytest test class, despite the name
    model_config = ConfigDict(frozen=True)

    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    rel_lift: float | None = Field(description="diff / mean_a; None when mean_a is 0")
    rel_lift_ci_low: float | None
    rel_lift_ci_high: float | None
    p_value: float
    statistic: float
    df: float = Field(description="Welch–Satterthwaite degrees of freedom")
    n_a: int
    n_b: int
    std_a: float
    std_b: float
    alpha: float


class SRMResult(BaseModel):
    """Chi-square goodness-of-fit of observed unit counts per variant against the configured weights."""

    model_config = ConfigDict(frozen=True)

    observed: dict[str, int]
    expected: dict[str, float]
    statistic: float
    df: int
    p_value: float
    threshold: float = SRM_THRESHOLD
    unexpected_variants: list[str] = Field(default_factory=list)
    flagged: bool


@dataclass(frozen=True)
class CupedResult:
    """CUPED-adjusted values ``y - theta * (x - mean(x))`` and how much variance that removed."""

    adjusted: np.ndarray
    theta: float
    variance_reduction: float  # 1 - var(adjusted) / var(y), equals corr(y, x)**2 in-sample
    correlation: float


# =============================================================================== statistics


def _finite(values: Sequence[float] | np.ndarray | pd.Series) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def welch_test(
    a: Sequence[float] | np.ndarray | pd.Series, b: Sequence[float] | np.ndarray | pd.Series, alpha: float = 0.05,
    *, baseline_mean: float | None = None,
) -> TestResult:
    """Welch's unequal-variance t-test of B against A, with CIs for the difference and the relative lift.

    NaNs are dropped (and reflected in ``n_a``/``n_b``). The difference CI is scipy's Welch interval on the
    Welch–Satterthwaite df. The relative-lift CI uses the delta method on ``mean_b / mean_a`` with the two
    arms independent: Var ≈ var_b/(n_b·m_a²) + m_b²·var_a/(n_a·m_a⁴), with a t quantile on the same df.
    ``baseline_mean`` (for CUPED-adjusted inputs) makes the lift ``diff / baseline_mean`` instead.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    xa, xb = _finite(a), _finite(b)
    if len(xa) < 2 or len(xb) < 2:
        raise ValueError(f"each arm needs at least 2 finite values, got n_a={len(xa)}, n_b={len(xb)}")
    res = stats.ttest_ind(xb, xa, equal_var=False)
    ci = res.confidence_interval(confidence_level=1 - alpha)
    mean_a, mean_b = float(xa.mean()), float(xb.mean())
    var_a, var_b = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    diff = mean_b - mean_a
    ci_low, ci_high, p_value = float(ci.low), float(ci.high), float(res.pvalue)
    if var_a == 0 and var_b == 0:
        # Both arms constant: scipy returns NaN. The difference is then known exactly, but a p-value is
        # meaningless; NaN keeps it out of the multiple-testing family.
        ci_low = ci_high = diff

    rel = rel_low = rel_high = None
    if baseline_mean is not None:
        # CUPED-adjusted arms: the adjusted control mean can sit near 0 (or below) while the raw metric does
        # not, so the lift is relative to the raw control mean; the diff's CI carries the uncertainty.
        if baseline_mean != 0:
            rel, rel_low, rel_high = diff / baseline_mean, ci_low / baseline_mean, ci_high / baseline_mean
            if baseline_mean < 0:
                rel_low, rel_high = rel_high, rel_low
    elif mean_a != 0:
        rel = diff / mean_a
        se_ratio = math.sqrt(var_b / (len(xb) * mean_a**2) + mean_b**2 * var_a / (len(xa) * mean_a**4))
        # df is NaN only when both arms are constant; se_ratio is then 0 and any quantile will do.
        df = res.df if np.isfinite(res.df) else np.inf
        q = float(stats.t.ppf(1 - alpha / 2, df))
        rel_low, rel_high = rel - q * se_ratio, rel + q * se_ratio

    return TestResult(
        mean_a=mean_a,
        mean_b=mean_b,
        diff=diff,
        ci_low=ci_low,
        ci_high=ci_high,
        rel_lift=rel,
        rel_lift_ci_low=rel_low,
        rel_lift_ci_high=rel_high,
        p_value=p_value,
        statistic=float(res.statistic),
        df=float(res.df),
        n_a=len(xa),
        n_b=len(xb),
        std_a=math.sqrt(var_a),
        std_b=math.sqrt(var_b),
        alpha=alpha,
    )


def ratio_test(
    num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, alpha: float = 0.05,
) -> TestResult:
    """Compare ratio metrics ``R = Σ num / Σ den`` per arm (likes per play, skips per play), as a z-test.

    The unit is still the user: each user gives one pair ``(num_i, den_i)``; users with ``den_i = 0`` (no plays)
    stay in the sample and add 0 to both sums. ``R = mean(num) / mean(den)`` is a smooth function of two means,
    so by the delta method (Deng et al. 2018, "Applying the delta method in metric analytics")::

        Var(R) ≈ (s_nn - 2 R s_nd + R² s_dd) / (n · mean(den)²)

    with the sample (co)variances ``s`` of the per-user pairs: the variance of the linearised per-user values
    ``(num_i - R den_i) / mean(den)``. ``std_a``/``std_b`` report those linearised SDs, so ``std²/n`` is
    ``Var(R)`` as for a mean. Arms are independent: ``Var(R_b - R_a) = Var(R_a) + Var(R_b)``; the lift
    ``R_b/R_a - 1`` gets ``Var(R_b)/R_a² + R_b² Var(R_a)/R_a⁴``. Quantiles are Student's t on the
    Welch–Satterthwaite df of the linearised values (Welch's test on them), i.e. normal at the sizes where
    ratio metrics are read.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    (ra, sda, na), (rb, sdb, nb) = _ratio_arm(num_a, den_a), _ratio_arm(num_b, den_b)
    var_a, var_b = sda**2 / na, sdb**2 / nb
    diff = rb - ra
    se = math.sqrt(var_a + var_b)
    if se > 0:
        df = (var_a + var_b) ** 2 / (var_a**2 / (na - 1) + var_b**2 / (nb - 1))
        z = diff / se
        p_value = float(2 * stats.t.sf(abs(z), df))
    else:
        df, z, p_value = math.nan, math.nan, math.nan
    q = float(stats.t.ppf(1 - alpha / 2, df)) if math.isfinite(df) else 0.0
    rel = rel_low = rel_high = None
    if ra != 0:
        rel = rb / ra - 1
        se_rel = math.sqrt(var_b / ra**2 + rb**2 * var_a / ra**4)
        rel_low, rel_high = rel - q * se_rel, rel + q * se_rel
    return TestResult(
        mean_a=ra, mean_b=rb, diff=diff, ci_low=diff - q * se, ci_high=diff + q * se, rel_lift=rel,
        rel_lift_ci_low=rel_low, rel_lift_ci_high=rel_high, p_value=p_value, statistic=z, df=df,
        n_a=na, n_b=nb, std_a=sda, std_b=sdb, alpha=alpha,
    )


def _ratio_arm(num: np.ndarray, den: np.ndarray) -> tuple[float, float, int]:
    """(R, linearised per-user SD, n) of one arm; pairs with a non-finite value are dropped."""
    x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        raise ValueError(f"each arm needs at least 2 users, got {len(x)}")
    mean_den = float(y.mean())
    if mean_den <= 0:
        raise ValueError("the denominator sums to 0 in an arm (no user has any)")
    r = float(x.mean()) / mean_den
    linear = (x - r * y) / mean_den
    return r, float(linear.std(ddof=1)), len(x)


def srm_check(
    observed_counts: Mapping[str, int], expected_weights: Mapping[str, float], threshold: float = SRM_THRESHOLD
) -> SRMResult:
    """Sample-ratio mismatch: are units split across variants as configured?

    A mismatch means assignment or logging is broken (bots, crashes in one arm, redirects, lost exposure
    logs) and every metric comparison is suspect. Weights are normalised; a configured variant with no
    units counts as 0; traffic in a variant that is not configured at all is flagged on its own.
    """
    if not expected_weights or any(not (w > 0) for w in expected_weights.values()):
        raise ValueError(f"expected_weights must be non-empty and positive, got {dict(expected_weights)}")
    names = list(expected_weights)
    unexpected = sorted(str(k) for k, v in observed_counts.items() if k not in expected_weights and v > 0)
    observed = {n: int(observed_counts.get(n, 0)) for n in names}
    total = sum(observed.values())
    if total == 0:
        raise ValueError("no units observed in any configured variant")
    weight_sum = math.fsum(expected_weights.values())
    expected = {n: total * expected_weights[n] / weight_sum for n in names}
    if len(names) == 1:
        statistic, p_value = 0.0, 1.0  # one arm cannot be mis-split
    else:
        res = stats.chisquare([observed[n] for n in names], [expected[n] for n in names])
        statistic, p_value = float(res.statistic), float(res.pvalue)
    return SRMResult(
        observed=observed,
        expected=expected,
        statistic=statistic,
        df=len(names) - 1,
        p_value=p_value,
        threshold=threshold,
        unexpected_variants=unexpected,
        flagged=bool(p_value < threshold or unexpected),
    )


def cuped(
    y: Sequence[float] | np.ndarray | pd.Series, x_pre: Sequence[float] | np.ndarray | pd.Series
) -> CupedResult:
    """CUPED (Deng et al., 2013): ``y - theta * (x_pre - mean(x_pre))`` with ``theta = cov(y, x) / var(x)``.

    The mean is unchanged and, because ``x_pre`` is measured before treatment, so is the expected treatment
    effect; only the noise explained by pre-period behaviour is removed. Estimate ``theta`` on all arms
    pooled (call this once on the pooled data, then split), never per arm.
    """
    yy, xx = np.asarray(y, dtype=float), np.asarray(x_pre, dtype=float)
    if yy.shape != xx.shape or yy.ndim != 1:
        raise ValueError(f"y and x_pre must be 1-d and of equal length, got {yy.shape} and {xx.shape}")
    if not (np.isfinite(yy).all() and np.isfinite(xx).all()):
        raise ValueError("y and x_pre must be finite (impute missing pre-period values first)")
    if len(yy) < 3:
        raise ValueError(f"need at least 3 units, got {len(yy)}")
    var_x, var_y = float(xx.var(ddof=1)), float(yy.var(ddof=1))
    if var_x == 0 or var_y == 0:
        return CupedResult(adjusted=yy.copy(), theta=0.0, variance_reduction=0.0, correlation=0.0)
    cov = float(np.cov(yy, xx, ddof=1)[0, 1])
    theta = cov / var_x
    adjusted = yy - theta * (xx - xx.mean())
    return CupedResult(
        adjusted=adjusted,
        theta=theta,
        variance_reduction=1.0 - float(adjusted.var(ddof=1)) / var_y,
        correlation=cov / math.sqrt(var_x * var_y),
    )


def msprt_p_value(result: TestResult, tau: float) -> float | None:
    """Untruncated always-valid p-value ``min(1, 1/Λ)`` of the normal-mixture SPRT at one look, for a given τ.

    ``Λ = sqrt(V / (V + τ²)) · exp(D² τ² / (2 V (V + τ²)))`` with ``V = s_a²/n_a + s_b²/n_b``. There is no
    default τ on purpose: it must come from the experiment's plan (``experiments.sequential.mixing_scale``),
    never from the per-user SD, which puts the boundary where only effects of about one SD cross it.
    """
    v = result.std_a**2 / result.n_a + result.std_b**2 / result.n_b
    if not (math.isfinite(v) and v > 0 and tau > 0):
        return None
    tau2 = tau**2
    log_ratio = 0.5 * math.log(v / (v + tau2)) + result.diff**2 * tau2 / (2 * v * (v + tau2))
    return float(min(1.0, math.exp(-log_ratio)))


def _harmful(result: TestResult, metric: str, alpha: float) -> bool:
    """A guardrail is breached when its CI excludes zero on the harmful side."""
    if not math.isfinite(result.p_value) or result.p_value >= alpha:
        return False
    return result.ci_low > 0 if metric in LOWER_IS_BETTER else result.ci_high < 0


def adjust_pvalues(p_values: Sequence[float], method: Literal["bh", "by"] = "bh") -> list[float]:
    """Benjamini–Hochberg (or -Yekutieli) adjusted p-values via ``scipy.stats.false_discovery_control``.

    Controls the false discovery rate across the family. NaN p-values (degenerate tests) stay NaN and do
    not enlarge the family.
    """
    ps = np.asarray(p_values, dtype=float)
    out = np.full(ps.shape, np.nan)
    ok = np.isfinite(ps)
    if ok.any():
        out[ok] = stats.false_discovery_control(ps[ok], method=method)
    return [float(p) for p in out]
