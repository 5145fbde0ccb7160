"""A/B analysis of online experiments: attribution, per-user metrics, Welch tests, SRM, CUPED, reports.

The randomisation unit is the **user** (``serving.assignment`` hashes user ids), so every metric is first
aggregated to one value per user and the users are the i.i.d. observations of the tests. Testing per event
or per request instead would treat a heavy listener's 200 events as 200 independent draws and produce
confidence intervals that are far too narrow.

Inputs
------
*exposures*: one row per served recommendation request —
``request_id, user_id, variant, timestamp_ms, items`` (``items``: the list of served item ids; lists,
arrays or JSON strings such as ``"[1, 2]"`` are accepted).

*interactions*: one row per event (see ``features.events.InteractionEvent``) —
``event_id, user_id, item_id, event_type, timestamp_ms, played_ratio, request_id`` (``source`` and
``variant`` are allowed and carried along; the exposure's variant is the authoritative one).

Statistics come from scipy (``ttest_ind(equal_var=False)``, ``chisquare``, ``false_discovery_control``);
only the delta-method CI of the relative lift and the CUPED adjustment are written out here, both a few
lines of textbook algebra.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from features.events import POSITIVE_TYPES

EXPOSURE_COLUMNS: tuple[str, ...] = ("request_id", "user_id", "variant", "timestamp_ms", "items")
INTERACTION_COLUMNS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "timestamp_ms",
    "played_ratio",
    "request_id",
)

# Per-user metrics, in report order. Descriptions double as the report's glossary.
METRICS: dict[str, str] = {
    "exposures": "recommendation requests served to the user",
    "listens": "attributed listen events",
    "likes": "attributed like events",
    "skips": "attributed skip events",
    "listening_time": "sum of played_ratio over attributed events (listening-time proxy, in tracks)",
    "like_rate": "likes per exposure",
    "skip_rate": "skips / (listens + skips): share of started plays skipped (undefined without plays)",
    "hit_rate": "share of served items the user then listened to, liked or added to a playlist",
}
# Metrics where a smaller value is better; the report flags direction so a 'significant' rise is not
# mistaken for a win.
LOWER_IS_BETTER: frozenset[str] = frozenset({"skips", "skip_rate"})
RATE_METRICS: frozenset[str] = frozenset({"like_rate", "skip_rate", "hit_rate"})

# Chi-square p-value below which a sample-ratio mismatch is declared. Deliberately strict (industry
# practice): SRM is checked on every experiment all the time, and a false alarm halts analysis.
SRM_THRESHOLD = 0.001


# =============================================================================== result models


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


class AttributionStats(BaseModel):
    """What attribution kept and dropped, so a report can say why interactions went missing."""

    interactions: int
    duplicates: int = Field(description="repeated event_id (at-least-once delivery), dropped")
    without_request_id: int
    unmatched_request_id: int = Field(description="request_id that no exposure has")
    before_exposure: int
    after_window: int
    user_mismatch: int = Field(description="user_id differs from the exposure's user")
    variant_mismatch: int = Field(description="kept; the exposure's variant wins")
    attributed: int


class ArmStat(BaseModel):
    mean: float
    ci_low: float
    ci_high: float
    n: int


class VariantSummary(BaseModel):
    variant: str
    weight: float
    users: int
    exposures: int
    attributed_interactions: int
    metrics: dict[str, ArmStat]


class MetricTest(BaseModel):
    metric: str
    control: str
    treatment: str
    result: TestResult
    cuped: bool = False
    variance_reduction: float | None = None
    p_adjusted: float
    significant: bool
    lower_is_better: bool
    always_valid_p: float | None = Field(
        default=None, description="mSPRT always-valid p-value: safe to read at any time, however often peeked")
    guardrail_breached: bool = False


class ABReport(BaseModel):
    name: str
    control: str
    alpha: float
    window_s: int
    weights: dict[str, float]
    correction: str
    generated_at: str
    variants: list[VariantSummary]
    tests: list[MetricTest]
    srm: SRMResult
    attribution: AttributionStats
    notes: list[str]
    guardrails: list[str] = Field(default_factory=list, description="metrics that must not get worse")

    @property
    def guardrail_breaches(self) -> list[MetricTest]:
        return [t for t in self.tests if t.guardrail_breached]

    def test(self, metric: str, treatment: str | None = None) -> MetricTest:
        """The test of ``metric`` for ``treatment`` (may be omitted when there is one treatment)."""
        found = [t for t in self.tests if t.metric == metric and treatment in (None, t.treatment)]
        if len(found) != 1:
            raise KeyError(f"expected one test for metric={metric!r} treatment={treatment!r}, found {len(found)}")
        return found[0]

    def to_markdown(self) -> str:
        return _markdown(self)


# =============================================================================== attribution


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}; it has {list(frame.columns)}")


def _as_item_list(value: object) -> list[int]:
    # Parquet hands back numpy arrays, JSON sinks strings; normalise so `served` checks work on all.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    items = json.loads(value) if isinstance(value, str) else value
    return [int(v) for v in cast(Iterable[object], items)]  # type: ignore[call-overload]


def _clean_exposures(exposures: pd.DataFrame) -> pd.DataFrame:
    _require(exposures, EXPOSURE_COLUMNS, "exposures")
    # A request is exposed once; a replayed exposure message must not double-count it.
    ex = exposures.drop_duplicates("request_id", keep="first").copy()
    ex["items"] = ex["items"].map(_as_item_list)
    ex["variant"] = ex["variant"].astype(str)
    return ex


def _attribute(
    exposures: pd.DataFrame, interactions: pd.DataFrame, window_s: float
) -> tuple[pd.DataFrame, AttributionStats]:
    if not window_s > 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    _require(interactions, INTERACTION_COLUMNS, "interactions")
    ex = _clean_exposures(exposures)

    total = len(interactions)
    events = interactions.drop_duplicates("event_id", keep="first")
    duplicates = total - len(events)
    with_request = events[events["request_id"].notna()]
    without_request = len(events) - len(with_request)

    ex_cols = ex[["request_id", "user_id", "variant", "timestamp_ms"]].rename(
        columns={"user_id": "exposure_user_id", "variant": "exposure_variant", "timestamp_ms": "exposure_ts_ms"}
    )
    merged = with_request.merge(ex_cols, on="request_id", how="inner")
    unmatched = len(with_request) - len(merged)

    lag_ms = merged["timestamp_ms"] - merged["exposure_ts_ms"]
    before = lag_ms < 0  # clock skew or a stale request_id: not caused by this exposure
    after = lag_ms > window_s * 1000
    user_mismatch = ~before & ~after & (merged["user_id"] != merged["exposure_user_id"])
    kept = merged[~before & ~after & ~user_mismatch].copy()

    variant_mismatch = 0
    if "variant" in kept.columns:
        logged = kept["variant"]
        variant_mismatch = int((logged.notna() & (logged.astype(str) != kept["exposure_variant"])).sum())
        kept = kept.drop(columns="variant")
    kept = kept.rename(columns={"exposure_variant": "variant"}).drop(columns="exposure_user_id")

    # Was the interacted item one of the items served in that request? (hit rate needs it)
    served_pairs = ex[["request_id", "items"]].explode("items").dropna(subset=["items"])
    served_pairs = served_pairs.rename(columns={"items": "item_id"}).astype({"item_id": "int64"})
    served_pairs["served"] = True
    if len(kept):
        kept = kept.astype({"item_id": "int64"}).merge(
            served_pairs.drop_duplicates(), on=["request_id", "item_id"], how="left"
        )
        kept["served"] = kept["served"].astype("boolean").fillna(False).astype(bool)
    else:
        kept["served"] = pd.Series(dtype=bool)

    attribution = AttributionStats(
        interactions=total,
        duplicates=duplicates,
        without_request_id=without_request,
        unmatched_request_id=unmatched,
        before_exposure=int(before.sum()),
        after_window=int(after.sum()),
        user_mismatch=int(user_mismatch.sum()),
        variant_mismatch=variant_mismatch,
        attributed=len(kept),
    )
    return kept.reset_index(drop=True), attribution


def attribute(exposures: pd.DataFrame, interactions: pd.DataFrame, window_s: float) -> pd.DataFrame:
    """Interactions caused by an exposure: same ``request_id`` and within ``window_s`` after it.

    Kept: ``0 <= interaction.timestamp_ms - exposure.timestamp_ms <= window_s * 1000`` and the same user.
    Dropped: no/unknown ``request_id``, events before the exposure or after the window, another user's
    request id, and repeated ``event_id`` (Kafka delivers at least once). The result has the interaction
    columns, ``variant`` taken from the exposure (the assignment log is authoritative), ``exposure_ts_ms``
    and ``served`` (the item was among those served in that request).
    """
    return _attribute(exposures, interactions, window_s)[0]


# =============================================================================== per-user metrics


def per_user_metrics(exposures: pd.DataFrame, attributed: pd.DataFrame) -> pd.DataFrame:
    """One row per (user_id, variant) with every metric in ``METRICS``.

    ``attributed`` is the output of :func:`attribute`. Every exposed user gets a row, including users who
    never interacted (their counts are 0) — dropping them would bias each arm towards its engaged users.
    ``skip_rate`` is NaN for users without plays and ``hit_rate`` for users served no items; tests skip
    NaNs and report the n actually used.
    """
    ex = _clean_exposures(exposures)
    keys = ["user_id", "variant"]
    base = ex.assign(n_items=ex["items"].map(lambda items: len(set(items)))).groupby(keys, as_index=False).agg(
        exposures=("request_id", "size"), served_items=("n_items", "sum")
    )

    ev = attributed
    counts = pd.DataFrame(
        {
            "user_id": ev["user_id"],
            "variant": ev["variant"].astype(str),
            "listens": (ev["event_type"] == "listen").astype(int),
            "likes": (ev["event_type"] == "like").astype(int),
            "skips": (ev["event_type"] == "skip").astype(int),
            "listening_time": pd.to_numeric(ev["played_ratio"], errors="coerce").fillna(0.0).astype(float),
        }
    )
    agg = counts.groupby(keys, as_index=False).sum()

    # A hit is a distinct (request, served item) pair with at least one positive reaction.
    positive_served = ev[ev["served"] & ev["event_type"].isin(POSITIVE_TYPES)]
    hits = (
        positive_served.drop_duplicates(["request_id", "item_id"])
        .assign(variant=lambda d: d["variant"].astype(str))
        .groupby(keys, as_index=False)
        .size()
        .rename(columns={"size": "hits"})
    )

    out = base.merge(agg, on=keys, how="left").merge(hits, on=keys, how="left")
    for col in ("listens", "likes", "skips", "hits"):
        out[col] = out[col].fillna(0).astype(int)
    out["listening_time"] = out["listening_time"].fillna(0.0)
    out["like_rate"] = out["likes"] / out["exposures"]
    plays = out["listens"] + out["skips"]
    out["skip_rate"] = (out["skips"] / plays.where(plays > 0)).astype(float)
    out["hit_rate"] = (out["hits"] / out["served_items"].where(out["served_items"] > 0)).astype(float)
    return out[[*keys, *METRICS, "served_items", "hits"]]


# Pre-period covariate used for each metric when the pre-period is given as raw events. Pre-period users
# had no exposures, so metrics tied to exposures get the closest activity measure; CUPED stays unbiased
# with any pre-treatment covariate — a poorer one only reduces less variance.
PRE_PERIOD_COVARIATE: dict[str, str] = {
    "exposures": "events",
    "listens": "listens",
    "likes": "likes",
    "skips": "skips",
    "listening_time": "listening_time",
    "like_rate": "like_share",
    "skip_rate": "skip_rate",
    "hit_rate": "positive_share",
}


def pre_period_covariates(interactions: pd.DataFrame) -> pd.DataFrame:
    """Per-user activity before the experiment, from raw interaction events (no exposures needed)."""
    _require(interactions, ("event_id", "user_id", "event_type", "played_ratio"), "pre-period interactions")
    ev = interactions.drop_duplicates("event_id")
    per = pd.DataFrame(
        {
            "user_id": ev["user_id"],
            "events": 1,
            "listens": (ev["event_type"] == "listen").astype(int),
            "likes": (ev["event_type"] == "like").astype(int),
            "skips": (ev["event_type"] == "skip").astype(int),
            "positives": ev["event_type"].isin(POSITIVE_TYPES).astype(int),
            "listening_time": pd.to_numeric(ev["played_ratio"], errors="coerce").fillna(0.0).astype(float),
        }
    )
    out = per.groupby("user_id", as_index=False).sum()
    plays = out["listens"] + out["skips"]
    out["skip_rate"] = out["skips"] / plays.where(plays > 0)
    out["like_share"] = out["likes"] / out["events"]
    out["positive_share"] = out["positives"] / out["events"]
    return out


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


def msprt_p_value(result: TestResult, tau: float | None = None) -> float | None:
    """Always-valid p-value of the mixture SPRT for a difference of means (Johari et al., 2017).

    With the difference estimate D, its variance V = s_a²/n_a + s_b²/n_b and a normal mixing prior of
    variance tau² on the true difference, the likelihood ratio is
    ``sqrt(V / (V + tau²)) * exp(D² tau² / (2 V (V + tau²)))`` and ``p = min(1, 1 / ratio)``. Unlike the
    fixed-horizon Welch p-value it stays valid when experimenters look every day and stop at the first
    significant look. ``tau`` defaults to the control's standard deviation (effects of about one sd are
    the plausible scale); it only trades power between small and large effects, never validity.
    """
    v = result.std_a**2 / result.n_a + result.std_b**2 / result.n_b
    if not (math.isfinite(v) and v > 0):
        return None
    tau2 = (tau if tau is not None else (result.std_a or result.std_b)) ** 2
    if tau2 <= 0:
        return None
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


def _arm_stat(values: pd.Series, alpha: float) -> ArmStat:
    x = _finite(values)
    if len(x) == 0:
        return ArmStat(mean=math.nan, ci_low=math.nan, ci_high=math.nan, n=0)
    mean = float(x.mean())
    if len(x) < 2 or x.var() == 0:
        return ArmStat(mean=mean, ci_low=mean, ci_high=mean, n=len(x))
    # t interval on n-1 df: the same interval as ttest_1samp(...).confidence_interval(), without its overhead
    low, high = stats.t.interval(1 - alpha, len(x) - 1, loc=mean, scale=float(x.std(ddof=1)) / math.sqrt(len(x)))
    return ArmStat(mean=mean, ci_low=float(low), ci_high=float(high), n=len(x))


# =============================================================================== the report


def _covariates(users: pd.DataFrame, pre_period: pd.DataFrame) -> pd.DataFrame:
    """Per-user covariate for each metric, aligned to ``users`` rows (NaN-free where available)."""
    if "event_type" in pre_period.columns:
        pre = pre_period_covariates(pre_period)
        mapping = PRE_PERIOD_COVARIATE
    else:
        _require(pre_period, ("user_id",), "pre_period")
        pre = pre_period.drop_duplicates("user_id")
        mapping = {m: m for m in METRICS}  # already per-user: columns named like the metrics
    mapping = {m: c for m, c in mapping.items() if c in pre.columns}
    aligned = users[["user_id"]].merge(pre[["user_id", *set(mapping.values())]], on="user_id", how="left")
    out = pd.DataFrame(index=users.index)
    for metric, col in mapping.items():
        x = pd.to_numeric(aligned[col], errors="coerce").to_numpy(dtype=float)
        # Users with no pre-period activity: counts are truly 0; a rate is undefined, so use the mean
        # (any pre-treatment imputation keeps CUPED unbiased).
        fill = np.nanmean(x) if (metric in RATE_METRICS and np.isfinite(x).any()) else 0.0
        out[metric] = np.where(np.isfinite(x), x, fill)
    return out


def ab_report(
    exposures: pd.DataFrame,
    interactions: pd.DataFrame,
    *,
    control: str,
    window_s: int,
    weights: Mapping[str, float],
    pre_period: pd.DataFrame | None = None,
    alpha: float = 0.05,
    name: str = "experiment",
    guardrails: Sequence[str] = ("skip_rate",),
) -> ABReport:
    """Full analysis of one experiment: SRM, per-arm summaries and per-metric tests against ``control``.

    ``weights`` are the configured variant weights (``Experiment.weights``). ``pre_period`` enables CUPED:
    either raw interaction events from before the experiment, or a per-user frame with ``user_id`` and
    columns named like the metrics. Every (metric, treatment) test is one family for Benjamini–Hochberg.
    """
    if control not in weights:
        raise ValueError(f"control {control!r} is not among the configured variants {list(weights)}")
    notes: list[str] = []
    attributed, attribution = _attribute(exposures, interactions, window_s)
    users = per_user_metrics(exposures, attributed)

    # A user seen in two arms means assignment was not sticky (config change, id mix-up): their outcome
    # belongs to neither arm, so they are dropped, loudly.
    arms_per_user = users.groupby("user_id")["variant"].nunique()
    crossed = arms_per_user[arms_per_user > 1].index
    if len(crossed):
        notes.append(f"{len(crossed)} users were exposed to more than one variant and are excluded.")
        users = users[~users["user_id"].isin(crossed)]
    unknown = sorted(set(users["variant"]) - set(weights))
    if unknown:
        notes.append(f"exposures in unconfigured variants {unknown} are excluded from the tests.")

    srm = srm_check(users["variant"].value_counts().to_dict(), weights)
    if srm.flagged:
        notes.append(
            f"SAMPLE RATIO MISMATCH (p = {srm.p_value:.2g}): the user split does not match the configured "
            "weights, so the metric comparisons below are not trustworthy until the cause is found."
        )
    users = users[users["variant"].isin(list(weights))].reset_index(drop=True)
    if not (users["variant"] == control).any():
        raise ValueError(f"no exposed users in the control variant {control!r}")

    dropped = attribution.interactions - attribution.attributed - attribution.duplicates
    if attribution.interactions and dropped:
        notes.append(
            f"{dropped} of {attribution.interactions} interactions were not attributed "
            f"({attribution.without_request_id} without request_id, {attribution.unmatched_request_id} with an "
            f"unknown request_id, {attribution.before_exposure} before and {attribution.after_window} after the "
            f"{window_s}s window, {attribution.user_mismatch} from another user)."
        )
    if attribution.duplicates:
        notes.append(f"{attribution.duplicates} duplicate event_ids were dropped.")
    if attribution.variant_mismatch:
        notes.append(
            f"{attribution.variant_mismatch} interactions logged a variant different from their exposure's."
        )

    covariates = _covariates(users, pre_period) if pre_period is not None else None

    summaries = []
    attributed_per_variant = attributed["variant"].astype(str).value_counts()
    for variant, weight in weights.items():
        arm = users[users["variant"] == variant]
        summaries.append(
            VariantSummary(
                variant=variant,
                weight=weight,
                users=len(arm),
                exposures=int(arm["exposures"].sum()),
                attributed_interactions=int(attributed_per_variant.get(variant, 0)),
                metrics={m: _arm_stat(arm[m], alpha) for m in METRICS},
            )
        )

    raw_tests: list[tuple[str, str, TestResult, bool, float | None]] = []
    for metric in METRICS:
        y = users[metric].to_numpy(dtype=float)
        ok = np.isfinite(y)
        values, used_cuped, reduction = y, False, None
        if covariates is not None and metric in covariates.columns and ok.sum() >= 3:
            # theta from all arms pooled (CUPED must not see the treatment labels)
            res = cuped(y[ok], covariates[metric].to_numpy(dtype=float)[ok])
            if res.theta != 0:  # theta == 0: constant covariate or metric, nothing to adjust
                values = np.full_like(y, np.nan)
                values[ok] = res.adjusted
                used_cuped, reduction = True, res.variance_reduction
        for treatment in weights:
            if treatment == control:
                continue
            a = values[(users["variant"] == control).to_numpy()]
            b = values[(users["variant"] == treatment).to_numpy()]
            raw_control = y[(users["variant"] == control).to_numpy()]
            baseline = float(np.nanmean(raw_control)) if used_cuped and np.isfinite(raw_control).any() else None
            try:
                result = welch_test(a, b, alpha=alpha, baseline_mean=baseline)
            except ValueError as exc:
                notes.append(f"{metric} ({treatment} vs {control}) not tested: {exc}.")
                continue
            if not math.isfinite(result.p_value):
                notes.append(f"{metric} ({treatment} vs {control}) has no variance in either arm; no p-value.")
            raw_tests.append((metric, treatment, result, used_cuped, reduction))

    adjusted = adjust_pvalues([t[2].p_value for t in raw_tests])
    tests = [
        MetricTest(
            metric=metric,
            control=control,
            treatment=treatment,
            result=result,
            cuped=used_cuped,
            variance_reduction=reduction,
            p_adjusted=p_adj,
            significant=bool(math.isfinite(p_adj) and p_adj < alpha),
            lower_is_better=metric in LOWER_IS_BETTER,
            always_valid_p=msprt_p_value(result),
            guardrail_breached=metric in guardrails and _harmful(result, metric, alpha),
        )
        for (metric, treatment, result, used_cuped, reduction), p_adj in zip(raw_tests, adjusted, strict=True)
    ]
    for t in tests:
        if t.guardrail_breached:
            notes.append(f"GUARDRAIL BREACHED: {t.metric} got worse in {t.treatment} "
                         f"(diff {t.result.diff:+.4g}, CI [{t.result.ci_low:+.4g}, {t.result.ci_high:+.4g}]).")
    if len(weights) > 2:
        notes.append("Only treatment-vs-control comparisons are tested; all of them form one BH family.")

    return ABReport(
        name=name,
        control=control,
        alpha=alpha,
        window_s=window_s,
        weights=dict(weights),
        correction="Benjamini–Hochberg (FDR) across all metrics and treatments",
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        variants=summaries,
        tests=tests,
        guardrails=list(guardrails),
        srm=srm,
        attribution=attribution,
        notes=notes,
    )


# =============================================================================== rendering


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}"


def _fmt_ci(value: float, low: float, high: float) -> str:
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def _summary_rows(report: ABReport) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "weight", "users", "total exposures", "attributed events", *METRICS]
    rows = [
        [
            v.variant,
            _fmt(v.weight, 3),
            str(v.users),
            str(v.exposures),
            str(v.attributed_interactions),
            *(_fmt_ci(v.metrics[m].mean, v.metrics[m].ci_low, v.metrics[m].ci_high) for m in METRICS),
        ]
        for v in report.variants
    ]
    return header, rows


def _test_rows(report: ABReport) -> tuple[list[str], list[list[str]]]:
    header = ["metric", "treatment", "control mean", "treatment mean", "diff [CI]", "lift [CI]", "p", "p (BH)",
              "always-valid p", "significant", "CUPED var. red.", "guardrail"]
    rows = []
    for t in report.tests:
        r = t.result
        direction = " (lower is better)" if t.lower_is_better else ""
        rows.append(
            [
                t.metric + direction,
                t.treatment,
                _fmt(r.mean_a),
                _fmt(r.mean_b),
                _fmt_ci(r.diff, r.ci_low, r.ci_high),
                f"{_pct(r.rel_lift)} [{_pct(r.rel_lift_ci_low)}, {_pct(r.rel_lift_ci_high)}]",
                _fmt(r.p_value, 3),
                _fmt(t.p_adjusted, 3),
                _fmt(t.always_valid_p, 3),
                "yes" if t.significant else "no",
                _pct(t.variance_reduction).lstrip("+") if t.cuped else "–",
                ("BREACHED" if t.guardrail_breached else "ok") if t.metric in report.guardrails else "–",
            ]
        )
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)


def _srm_line(srm: SRMResult) -> str:
    counts = ", ".join(f"{k}={v}" for k, v in srm.observed.items())
    verdict = "MISMATCH" if srm.flagged else "ok"
    return f"SRM: {verdict} (chi² = {srm.statistic:.3g}, df = {srm.df}, p = {srm.p_value:.3g}; users: {counts})"


_CUPED_NOTE = (
    "Tests with a CUPED variance reduction compare CUPED-adjusted means, which differ slightly from the raw "
    "per-arm means above; the difference estimates the same effect with less noise."
)


def _markdown(report: ABReport) -> str:
    parts = [
        f"# A/B report: {report.name}",
        f"control `{report.control}` · attribution window {report.window_s}s · alpha {report.alpha} · "
        f"{report.correction} · generated {report.generated_at}",
        _srm_line(report.srm),
        f"## Per-user means per variant ({100 * (1 - report.alpha):g}% CI)",
        _md_table(*_summary_rows(report)),
        "## Tests",
        *([_CUPED_NOTE] if any(t.cuped for t in report.tests) else []),
        _md_table(*_test_rows(report)),
    ]
    if report.notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in report.notes)]
    return "\n\n".join(parts) + "\n"


def plot_png(report: ABReport) -> bytes:
    """Per-arm means with CI error bars, one panel per metric, as PNG bytes."""
    # The object-oriented Figure API needs no pyplot global state or GUI backend (safe in servers/threads).
    from matplotlib.figure import Figure

    metrics = list(METRICS)
    ncols = 4
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    names = [v.variant for v in report.variants]
    colors = ["#4c72b0" if n == report.control else "#dd8452" for n in names]
    for ax, metric in zip(axes, metrics, strict=False):
        for i, v in enumerate(report.variants):
            s = v.metrics[metric]
            if not math.isfinite(s.mean):
                continue
            err = [[s.mean - s.ci_low], [s.ci_high - s.mean]]
            ax.errorbar([i], [s.mean], yerr=err, fmt="o", color=colors[i], capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.bad{color:#b00;font-weight:bold}.ok{color:#070}
"""


def render_html(report: ABReport, path: str | Path) -> Path:
    """Write a self-contained HTML report (inline CSS, plot embedded as base64 PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = base64.b64encode(plot_png(report)).decode("ascii")
    srm_class = "bad" if report.srm.flagged else "ok"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    glossary = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(d)}</li>" for m, d in METRICS.items())
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>A/B report: {html.escape(report.name)}</title>
<style>{_CSS}</style></head><body>
<h1>A/B report: {html.escape(report.name)}</h1>
<p>control <code>{html.escape(report.control)}</code> · attribution window {report.window_s}s ·
alpha {report.alpha} · {html.escape(report.correction)} · generated {html.escape(report.generated_at)}</p>
<p class="{srm_class}">{html.escape(_srm_line(report.srm))}</p>
<h2>Raw per-user means per arm with {100 * (1 - report.alpha):g}% CI</h2>
<img alt="per-arm means with confidence intervals" src="data:image/png;base64,{png}">
{_html_table(*_summary_rows(report))}
<h2>Tests (treatment vs control)</h2>
{"<p>" + html.escape(_CUPED_NOTE) + "</p>" if any(t.cuped for t in report.tests) else ""}
{_html_table(*_test_rows(report))}
{"<h2>Notes</h2><ul>" + notes + "</ul>" if notes else ""}
<h2>Metrics</h2><ul>{glossary}</ul>
</body></html>
"""
    path.write_text(doc, encoding="utf-8")
    return path
