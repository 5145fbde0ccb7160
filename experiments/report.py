"""The A/B report: per-arm metrics with intervals, one test per (metric, treatment), SRM, guardrails, and
its renderings (Markdown, a PNG plot, a self-contained HTML page).

``ab_report`` composes ``experiments.metrics`` (attribution, per-user values) and ``experiments.stats`` (the
tests); ``experiments.readout`` feeds it from the platform's real sources.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from scipy import stats

from experiments.metrics import (
    DEFAULT_GUARDRAILS,
    LOWER_IS_BETTER,
    METRICS,
    PRE_PERIOD_COVARIATE,
    RATE_METRICS,
    RATIO_METRICS,
    AttributionStats,
    _attribute,
    _require,
    per_user_metrics,
    pre_period_covariates,
)
from experiments.stats import (
    SRMResult,
    TestResult,
    _finite,
    _harmful,
    adjust_pvalues,
    cuped,
    ratio_test,
    srm_check,
    welch_test,
)
from experiments.sequential import SequentialPlan, SequentialResult, sequential_test

# Looks of the sequential timeline: one per day of the experiment (how experimenters peek), or this many equal
# slices when it spans less than two days; at most MAX_LOOKS (evenly thinned) to bound the report's cost.
SHORT_TEST_LOOKS = 10
MAX_LOOKS = 60
DAY_MS = 86_400_000

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
    ratio: bool = Field(default=False, description="ratio of sums per arm, delta-method variance")
    sequential: SequentialResult | None = None


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
    plan: SequentialPlan | None = Field(default=None, description="the experiment's plan (sets τ and the horizon)")

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


def _ratio_arm_stat(arm: pd.DataFrame, metric: str, alpha: float) -> ArmStat:
    """Σ num / Σ den over the arm's users with a delta-method normal interval (see ``stats.ratio_test``)."""
    num_col, den_col = RATIO_METRICS[metric]
    num, den = arm[num_col].to_numpy(dtype=float), arm[den_col].to_numpy(dtype=float)
    if len(num) == 0 or den.sum() <= 0:
        return ArmStat(mean=math.nan, ci_low=math.nan, ci_high=math.nan, n=len(num))
    r = float(num.sum() / den.sum())
    if len(num) < 2:
        return ArmStat(mean=r, ci_low=r, ci_high=r, n=len(num))
    se = float(((num - r * den) / den.mean()).std(ddof=1)) / math.sqrt(len(num))
    q = float(stats.norm.ppf(1 - alpha / 2))
    return ArmStat(mean=r, ci_low=r - q * se, ci_high=r + q * se, n=len(num))


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
    guardrails: Sequence[str] = DEFAULT_GUARDRAILS,
    plan: SequentialPlan | None = None,
) -> ABReport:
    """Full analysis of one experiment: SRM, per-arm summaries and per-metric tests against ``control``.

    ``weights`` are the configured variant weights (``Experiment.weights``). ``pre_period`` enables CUPED:
    either raw interaction events from before the experiment, or a per-user frame with ``user_id`` and
    columns named like the metrics. Every (metric, treatment) test is one family for Benjamini–Hochberg.
    Ratio metrics (``RATIO_METRICS``) are ratios of sums over all assigned users with delta-method variances.

    Each test also gets its sequential readout (``experiments.sequential``): the statistic recomputed at one
    look per day from the exposures' ``timestamp_ms`` (what an experimenter watching the test saw), the
    always-valid p-value and confidence sequence with τ from ``plan`` (the experiment's ``plan``), and the
    decision: decide now, keep running, or horizon reached.
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
                metrics={m: _ratio_arm_stat(arm, m, alpha) if m in RATIO_METRICS else _arm_stat(arm[m], alpha)
                         for m in METRICS},
            )
        )

    treatments = [v for v in weights if v != control]
    raw_tests: list[tuple[str, str, TestResult, bool, float | None, float | None]] = []
    for metric in METRICS:
        for treatment, outcome in _metric_tests(users, covariates, metric, control, treatments, alpha).items():
            if isinstance(outcome, str):
                notes.append(f"{metric} ({treatment} vs {control}) not tested: {outcome}.")
                continue
            result, used_cuped, reduction, baseline = outcome
            if not math.isfinite(result.p_value):
                notes.append(f"{metric} ({treatment} vs {control}) has no variance in either arm; no p-value.")
            raw_tests.append((metric, treatment, result, used_cuped, reduction, baseline))

    histories = _history(exposures, attributed, pre_period, crossed, control, treatments, weights, alpha)
    end_ms = int(pd.to_numeric(exposures["timestamp_ms"]).max())
    adjusted = adjust_pvalues([t[2].p_value for t in raw_tests])
    tests = []
    for (metric, treatment, result, used_cuped, reduction, baseline), p_adj in zip(raw_tests, adjusted, strict=True):
        lower = metric in LOWER_IS_BETTER
        seq = sequential_test(result, plan, lower_is_better=lower, baseline=baseline, t_ms=end_ms,
                              history=histories.get((metric, treatment), []))
        harmful_fixed = _harmful(result, metric, alpha)
        # a guardrail is breached by the fixed-horizon CI or by the confidence sequence (valid under peeking)
        harmful_seq = seq is not None and seq.decision == "treatment_worse"
        tests.append(MetricTest(
            metric=metric,
            control=control,
            treatment=treatment,
            result=result,
            cuped=used_cuped,
            variance_reduction=reduction,
            p_adjusted=p_adj,
            significant=bool(math.isfinite(p_adj) and p_adj < alpha),
            lower_is_better=lower,
            always_valid_p=seq.always_valid_p if seq is not None else None,
            guardrail_breached=metric in guardrails and (harmful_fixed or harmful_seq),
            ratio=metric in RATIO_METRICS,
            sequential=seq,
        ))
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
        plan=plan,
        srm=srm,
        attribution=attribution,
        notes=notes,
    )


def _metric_tests(
    users: pd.DataFrame, covariates: pd.DataFrame | None, metric: str, control: str, treatments: list[str],
    alpha: float,
) -> dict[str, tuple[TestResult, bool, float | None, float | None] | str]:
    """treatment -> (result, CUPED used, variance reduction, raw control mean for CUPED lifts), or why not."""
    out: dict[str, tuple[TestResult, bool, float | None, float | None] | str] = {}
    in_control = (users["variant"] == control).to_numpy()
    if metric in RATIO_METRICS:
        num_col, den_col = RATIO_METRICS[metric]
        num, den = users[num_col].to_numpy(dtype=float), users[den_col].to_numpy(dtype=float)
        for treatment in treatments:
            arm = (users["variant"] == treatment).to_numpy()
            try:
                out[treatment] = (ratio_test(num[in_control], den[in_control], num[arm], den[arm], alpha),
                                  False, None, None)
            except ValueError as exc:
                out[treatment] = str(exc)
        return out
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
    raw_control = y[in_control]
    baseline = float(np.nanmean(raw_control)) if used_cuped and np.isfinite(raw_control).any() else None
    for treatment in treatments:
        arm = (users["variant"] == treatment).to_numpy()
        try:
            out[treatment] = (welch_test(values[in_control], values[arm], alpha=alpha, baseline_mean=baseline),
                              used_cuped, reduction, baseline)
        except ValueError as exc:
            out[treatment] = str(exc)
    return out


def _look_times(timestamps: pd.Series) -> list[int]:
    """Cut-off times of the earlier looks (the last look is all the data): daily, or equal slices if short."""
    ts = pd.to_numeric(timestamps)
    start, end = int(ts.min()), int(ts.max())
    if end - start >= 2 * DAY_MS:
        cuts = list(range(start + DAY_MS, end, DAY_MS))
    else:
        cuts = [start + (end - start) * k // SHORT_TEST_LOOKS for k in range(1, SHORT_TEST_LOOKS)]
    if len(cuts) > MAX_LOOKS - 1:
        cuts = [cuts[i] for i in np.linspace(0, len(cuts) - 1, MAX_LOOKS - 1).round().astype(int)]
    return cuts


def _history(
    exposures: pd.DataFrame, attributed: pd.DataFrame, pre_period: pd.DataFrame | None, crossed: pd.Index,
    control: str, treatments: list[str], weights: Mapping[str, float], alpha: float,
) -> dict[tuple[str, str], list[tuple[int, TestResult]]]:
    """(metric, treatment) -> [(cut-off, result)] at each earlier look, from the data as it stood then.

    Only exposures and attributed interactions up to the cut-off count: a user's metric at a look is what had
    happened by then, not their final value (which would leak the future into the early looks).
    """
    ex_ts = pd.to_numeric(exposures["timestamp_ms"])
    ev_ts = pd.to_numeric(attributed["timestamp_ms"]) if len(attributed) else pd.Series(dtype=float)
    out: dict[tuple[str, str], list[tuple[int, TestResult]]] = {}
    for cut in _look_times(exposures["timestamp_ms"]):
        users = per_user_metrics(exposures[ex_ts <= cut], attributed[ev_ts <= cut] if len(attributed) else attributed)
        users = users[~users["user_id"].isin(crossed) & users["variant"].isin(list(weights))].reset_index(drop=True)
        if not (users["variant"] == control).any():
            continue
        covariates = _covariates(users, pre_period) if pre_period is not None else None
        for metric in METRICS:
            for treatment, outcome in _metric_tests(users, covariates, metric, control, treatments, alpha).items():
                if not isinstance(outcome, str):
                    out.setdefault((metric, treatment), []).append((cut, outcome[0]))
    return out


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
    header = ["variant", "weight", "users", "total exposures", "attributed events",
              *(f"{m} (Σ/Σ)" if m in RATIO_METRICS else m for m in METRICS)]
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


_DECISION_LABEL = {
    "treatment_better": "DECIDE: treatment better",
    "treatment_worse": "DECIDE: treatment worse",
    "keep_running": "keep running",
    "horizon_reached": "horizon reached: read fixed-horizon",
}


def _sequential_rows(report: ABReport) -> tuple[list[str], list[list[str]]]:
    header = ["metric", "treatment", "τ (source)", "always-valid p", "diff [confidence sequence]",
              "lift [confidence sequence]", "decision", "why"]
    rows = []
    for t in report.tests:
        q = t.sequential
        if q is None:
            continue
        rows.append([
            t.metric + (" (lower is better)" if t.lower_is_better else ""),
            t.treatment,
            f"{_fmt(q.tau)} ({q.tau_source})",
            _fmt(q.always_valid_p, 3),
            _fmt_ci(t.result.diff, q.cs_low, q.cs_high),
            f"{_pct(t.result.rel_lift)} " + (f"[{q.lift_cs_note}]" if q.lift_cs_note else
                                              f"[{_pct(q.lift_cs_low)}, {_pct(q.lift_cs_high)}]"),
            _DECISION_LABEL.get(q.decision, q.decision),
            q.explanation,
        ])
    return header, rows


def _sequential_intro(report: ABReport) -> str:
    plan = report.plan
    if plan is None:
        planned = ("No plan is set for this experiment: τ is the default 5% of each control mean and the test has "
                   "no horizon (untruncated, threshold 1/α). Set `plan` (`encore ab plan`) to size it.")
    else:
        parts = [f"MDE {plan.mde:g}{' relative' if plan.relative else ''}" if plan.mde else "",
                 f"horizon {plan.planned_users_per_arm} users per arm" if plan.planned_users_per_arm else "",
                 f"α {plan.alpha:g}"]
        planned = "Plan: " + ", ".join(p for p in parts if p) + "."
    return (
        "Sequential readout (normal-mixture SPRT; Johari et al. 2017, Howard et al. 2021): valid however often "
        "the test is looked at and whenever it is stopped. The confidence sequence is the always-valid interval; "
        "the decision applies the stopping rule. The fixed-horizon table above is for a test read once, at its "
        f"planned end. {planned}"
    )


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
        "## Sequential decisions",
        _sequential_intro(report),
        _md_table(*_sequential_rows(report)),
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


def sequential_png(report: ABReport, metrics: Sequence[str] | None = None) -> bytes:
    """The sequential boundary over time as PNG bytes: one panel per (metric, treatment).

    Each panel draws the running estimate of the difference against the cumulative users of both arms, its
    confidence sequence (the shaded band: where the boundary sits at each look; the test decides when the band
    leaves 0), the planned horizon, and at the last look the fixed-horizon CI for comparison.
    """
    from matplotlib.figure import Figure

    wanted = set(metrics) if metrics is not None else None
    tests = [t for t in report.tests if t.sequential is not None and t.sequential.timeline
             and (wanted is None or t.metric in wanted)]
    ncols = min(3, max(1, len(tests)))
    nrows = max(1, math.ceil(len(tests) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, t in zip(axes, tests, strict=False):
        q = t.sequential
        assert q is not None
        users = np.array([lk.users_a + lk.users_b for lk in q.timeline], dtype=float)
        diff = np.array([lk.diff for lk in q.timeline])
        ax.fill_between(users, [lk.cs_low for lk in q.timeline], [lk.cs_high for lk in q.timeline],
                        color="#4c72b0", alpha=0.25, step="post", label="confidence sequence")
        ax.plot(users, diff, "o-", color="#4c72b0", ms=3, label="difference")
        ax.axhline(0.0, color="#555", lw=0.8)
        r = t.result
        ax.errorbar([users[-1]], [r.diff], yerr=[[r.diff - r.ci_low], [r.ci_high - r.diff]], fmt="s",
                    color="#dd8452", capsize=4, label="fixed-horizon CI")
        if q.horizon_users_per_arm:
            ax.axvline(2 * q.horizon_users_per_arm, color="#999", ls="--", lw=0.8, label="planned horizon")
        verdict = _DECISION_LABEL.get(q.decision, q.decision)
        ax.set_title(f"{t.metric} ({t.treatment}): {verdict}", fontsize=9)
        ax.set_xlabel("users (both arms)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if tests:
        axes[0].legend(fontsize=7, loc="best")
    for ax in axes[len(tests):]:
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
    seq_png = base64.b64encode(sequential_png(report)).decode("ascii")
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
<h2>Sequential decisions (always valid under peeking)</h2>
<p>{html.escape(_sequential_intro(report))}</p>
<img alt="running difference with its confidence sequence over time" src="data:image/png;base64,{seq_png}">
{_html_table(*_sequential_rows(report))}
{"<h2>Notes</h2><ul>" + notes + "</ul>" if notes else ""}
<h2>Metrics</h2><ul>{glossary}</ul>
</body></html>
"""
    path.write_text(doc, encoding="utf-8")
    return path
