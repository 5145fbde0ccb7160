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
    LOWER_IS_BETTER,
    METRICS,
    PRE_PERIOD_COVARIATE,
    RATE_METRICS,
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
    msprt_p_value,
    srm_check,
    welch_test,
)

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
