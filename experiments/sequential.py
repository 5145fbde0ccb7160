"""Sequential testing: a readout an experimenter may look at every day and stop on, without inflating errors.

The test (the mixture SPRT, Robbins 1970; Johari et al. 2017, "Peeking at A/B tests"; Howard et al. 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences") in one page of algebra.

**The statistic.** At a look, arm B minus arm A has the estimate ``D`` with variance ``V = s_a²/n_a + s_b²/n_b``
(a difference of means, or of ratios of sums with delta-method variances). Its information is ``I = 1/V``;
``W = D·I`` is, by the central limit theorem, a Brownian motion in ``I`` with drift ``θ`` (the true difference).

**The mixture.** Average the likelihood ratio of drift ``θ`` against 0 over a normal prior ``θ ~ N(0, τ²)``::

    Λ = sqrt(V / (V + τ²)) · exp( D² τ² / (2 V (V + τ²)) )

Under H0 (θ = 0) ``Λ`` is a nonnegative martingale that starts at 1, so by Ville's inequality
``P(sup_t Λ_t ≥ 1/α) ≤ α``: "stop the first time Λ ≥ 1/α" is an α-level test however often one looks.
With ``s = τ²/V`` (information in units of the prior) and ``X = τD/V`` (a standard Brownian motion in ``s``)
the same thing reads ``log Λ = X² / (2(1 + s)) - ½ log(1 + s)``, and the boundary ``log Λ = log c`` is::

    |X| = b(s) = sqrt( (1 + s) · (2 log c + log(1 + s)) )

**The confidence sequence.** Inverting the test at every θ (replace D by D - θ) gives the interval of θ whose
mixture has not crossed: ``D ± b(s) · V / τ``, i.e. half-width
``sqrt( V (V + τ²)/τ² · (2 log c + log((V + τ²)/V)) )``. It covers θ at all looks simultaneously with probability
≥ 1 - α, hence at any data-dependent stopping time.

**The lift's sequence (Fieller).** The relative lift ``λ = m_b/m_a - 1`` is a ratio, and its sampling
distribution is skewed while the control mean is noisy, so a symmetric ``lift ± width`` (the delta method)
under-covers. Instead each ``λ`` is tested by the linear contrast that is 0 under ``m_b = (1+λ)·m_a``::

    D_λ = x̄_b - (1+λ)·x̄_a,    V_λ = s_b²/n_b + (1+λ)²·s_a²/n_a,    τ_λ = τ·sqrt(V_λ / V)

and ``λ`` stays in the sequence while ``log Λ(D_λ, V_λ, τ_λ) < log c``. For each fixed ``λ``, ``D_λ`` is a
difference of means like ``D`` (a mean of ``x_b`` minus a mean of ``(1+λ)·x_a``), so ``D_λ·I_λ`` is a Brownian
motion in ``I_λ = 1/V_λ`` with drift 0 under that null and its mixture ``Λ_λ`` is a nonnegative martingale that
starts at 1: ``P(λ_true ever leaves the set) = P(sup_t Λ_λ_true ≥ c) ≤ α``, the same bound as for the
difference. That is all a confidence sequence needs; no union over ``λ`` is taken.

``τ_λ`` is ``τ`` carried to the contrast's scale: ``V_λ/V`` does not change as users arrive (both arms grow in
the allocation's proportions), and ``τ_λ² / V_λ = τ²/V = s``, so every null sits at the same information ``s``
now and has the same horizon ``r = τ²/V_N`` (for a horizon-sized τ it is exactly ``(z + z_power)·sqrt(V_λ,N)``,
the rule τ comes from). Hence one calibrated ``log c`` is exact for every ``λ``, and at ``λ = 0`` the contrast
is the difference itself: the lift's sequence excludes 0 exactly when the difference's does. With ``s`` common
to all ``λ`` the boundary ``|X| < b(s)`` reads ``|D_λ| < z*·sqrt(V_λ)`` with ``z* = b(s)/sqrt(s) = w/sqrt(V)``
(``w`` the difference's half-width), which is Fieller's quadratic in ``ρ = 1+λ``::

    (x̄_a² - z*² s_a²/n_a)·ρ² - 2 x̄_a x̄_b·ρ + (x̄_b² - z*² s_b²/n_b) < 0

Its roots are the endpoints. When ``|x̄_a| ≤ z*·s_a/sqrt(n_a)`` (the control mean is not yet told apart from 0
at this look) the set is the whole line or the complement of an interval: the sequence is unbounded and the
report says so instead of printing endpoints. With CUPED the lift is the adjusted difference over the raw
control mean, a constant, so its sequence is the difference's divided by it.

**τ.** It only trades power between effect sizes (validity holds for every τ), but the trade is steep: the
boundary at information ``V`` is tightest when ``τ² ≈ 8 V``, i.e. when ``τ`` is about the effect that ``V`` can
see. Product effects are 0.01-0.05 per-user SD, so ``τ = SD`` (the old default) placed the boundary where it could
only fire at effects of about one SD. Here ``τ`` comes from the experiment's plan (``SequentialPlan``):
the minimum detectable effect (``τ = MDE``); else the effect its planned horizon detects with the planned power,
``τ = (z_{1-α/2} + z_power)·sqrt(V_N)``; else ``DEFAULT_RELATIVE_MDE`` of the control mean. The first two agree:
a horizon sized for the MDE at 80% power has ``τ²/V_N = (1.96 + 0.84)² ≈ 7.8``, the width-optimal ratio.

**Truncation.** Ville's inequality counts crossings over an infinite horizon; a test stopped at its planned
horizon ``V_N`` (``s ≤ r = τ²/V_N``) uses only part of α (1.75% at r = 7, α = 0.05, with continuous looks, less
with daily looks). Planned experiments therefore use the truncated mixture SPRT: the threshold ``c`` is
calibrated so that a Brownian motion watched *continuously* over ``[0, r]`` crosses ``±b(s)`` with
probability exactly α (``log c = 2.14`` instead of ``log 20 = 3.00`` at r = 7). Any set of looks is a subset
of continuous monitoring, so the error stays ≤ α for every peeking schedule up to the horizon; the crossing
probability is computed by recursive numerical integration (Armitage, McPherson & Rowe 1969) with the
Brownian-bridge correction between grid times (Siegmund 1985, §3), accurate to ~1e-4. Past the horizon the
truncated test is over: the report says so and does not extend it. Experiments without a planned horizon keep
the untruncated ``c = 1/α`` and may run indefinitely.

**The always-valid p-value** is the smallest α at which the boundary has been crossed so far:
``P_H0(sup_{s ≤ r} Λ ≥ max Λ observed)`` (= ``1 / max Λ`` without truncation).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import optimize, stats

from experiments.stats import TestResult

# Without a plan, τ is this share of the control mean: a 5% relative lift, the middle of what product changes
# move (the per-user SD, the old default, is 20-100x larger than such effects).
DEFAULT_RELATIVE_MDE = 0.05
# ... and this share of the per-user SD when the control mean is 0 (no relative scale exists).
DEFAULT_SD_MDE = 0.03
# Truncation is calibrated on r = τ²/V_N within these bounds. Below R_MIN the calibration at R_MIN is used (a
# higher threshold: conservative); above R_MAX the horizon is so far that the untruncated 1/α is used.
R_MIN, R_MAX = 0.5, 500.0

Decision = Literal["treatment_better", "treatment_worse", "keep_running", "horizon_reached", "no_data"]


class SequentialPlan(BaseModel):
    """What an experiment plans to detect, stated before it starts (``Experiment.plan``).

    ``mde``: the minimum detectable effect, relative to the control mean (``relative=True``: 0.05 = +5%) or in
    the metric's units. ``planned_users_per_arm``: the horizon (``encore ab plan`` computes it from the MDE).
    Either sets the mixing scale τ; the horizon also truncates the test (see the module docstring).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mde: float | None = Field(default=None, gt=0)
    relative: bool = True
    planned_users_per_arm: int | None = Field(default=None, ge=2)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    power: float = Field(default=0.8, gt=0, lt=1)

    @model_validator(mode="after")
    def _something_planned(self) -> SequentialPlan:
        if self.mde is None and self.planned_users_per_arm is None:
            raise ValueError("a plan states an mde, a planned_users_per_arm, or both")
        return self


class Look(BaseModel):
    """The sequential statistic at one look (a cumulative cut of the data)."""

    t_ms: int
    users_a: int
    users_b: int
    diff: float
    cs_low: float
    cs_high: float
    log_lr: float


class SequentialResult(BaseModel):
    """The sequential readout of one (metric, treatment): τ, the confidence sequence, the decision."""

    tau: float
    tau_source: str
    alpha: float
    log_threshold: float = Field(description="log c: the test stops when log Λ ≥ log c")
    horizon_users_per_arm: int | None
    information_fraction: float | None = Field(description="V_N / V now: 1.0 at the planned horizon")
    always_valid_p: float
    cs_low: float
    cs_high: float
    lift_cs_low: float | None
    lift_cs_high: float | None
    lift_cs_note: str | None = Field(default=None, description="why the lift's sequence has no endpoints")
    decision: Decision
    explanation: str
    timeline: list[Look] = Field(default_factory=list)


# =============================================================================== the boundary


def boundary(s: np.ndarray | float, log_c: float) -> np.ndarray:
    """``b(s) = sqrt((1+s)(2 log c + log(1+s)))``: the mixture boundary on the standardised sum ``X``."""
    s = np.asarray(s, dtype=float)
    return np.sqrt(np.maximum((1.0 + s) * (2.0 * log_c + np.log1p(s)), 0.0))


def log_lr(diff: np.ndarray | float, v: np.ndarray | float, tau: float) -> np.ndarray:
    """``log Λ = D²τ² / (2V(V+τ²)) - ½ log((V+τ²)/V)``, the log of the normal-mixture likelihood ratio."""
    d, vv = np.asarray(diff, dtype=float), np.asarray(v, dtype=float)
    t2 = tau * tau
    return d * d * t2 / (2.0 * vv * (vv + t2)) - 0.5 * np.log1p(t2 / vv)


def half_width(v: np.ndarray | float, tau: float, log_c: float) -> np.ndarray:
    """Half-width of the confidence sequence, ``b(s)·V/τ`` with ``s = τ²/V``."""
    vv = np.asarray(v, dtype=float)
    return boundary(tau * tau / vv, log_c) * vv / tau


def lift_tau(lift: np.ndarray | float, var_a: np.ndarray | float, var_b: np.ndarray | float,
             tau: np.ndarray | float) -> np.ndarray:
    """``τ_λ = τ·sqrt(V_λ/V)``: the mixing scale of the contrast ``x̄_b - (1+λ)·x̄_a`` (``var_*`` = s²/n)."""
    rho2 = (1.0 + np.asarray(lift, dtype=float)) ** 2
    return np.asarray(tau, dtype=float) * np.sqrt((var_b + rho2 * var_a) / (var_b + np.asarray(var_a)))


def lift_log_lr(lift: np.ndarray | float, mean_a: np.ndarray | float, mean_b: np.ndarray | float,
                var_a: np.ndarray | float, var_b: np.ndarray | float, tau: float) -> np.ndarray:
    """``log Λ(D_λ, V_λ, τ_λ)``: the mixture statistic of the null ``m_b = (1+λ)·m_a`` (``var_*`` = s²/n)."""
    rho = 1.0 + np.asarray(lift, dtype=float)
    d, v = np.asarray(mean_b) - rho * np.asarray(mean_a), np.asarray(var_b) + rho**2 * np.asarray(var_a)
    t = lift_tau(lift, var_a, var_b, tau)
    return d * d * t * t / (2.0 * v * (v + t * t)) - 0.5 * np.log1p(t * t / v)


def lift_sequence(mean_a: np.ndarray | float, mean_b: np.ndarray | float, var_a: np.ndarray | float,
                  var_b: np.ndarray | float, z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Endpoints of the lift's confidence sequence at a look: the roots of Fieller's quadratic in ``ρ = 1+λ``.

    ``var_*`` are the variances of the means (``s²/n``), ``z = w/sqrt(V)`` the difference's critical value at
    this look (module docstring). Vectorised over any broadcastable shapes. Where the control mean is within
    ``z`` standard errors of 0 the set is unbounded (the whole line, or the complement of an interval):
    the endpoints are ``-inf`` and ``+inf``, the smallest interval that contains it.
    """
    m_a, m_b = np.asarray(mean_a, dtype=float), np.asarray(mean_b, dtype=float)
    z2 = np.asarray(z, dtype=float) ** 2
    a = m_a * m_a - z2 * var_a
    b = m_a * m_b
    c = m_b * m_b - z2 * var_b
    bounded = a > 0  # then b² - ac > 0: the quadratic is negative at ρ = x̄_b/x̄_a
    a_safe = np.where(bounded, a, 1.0)
    root = np.sqrt(np.maximum(b * b - a * c, 0.0))
    low = np.where(bounded, (b - root) / a_safe - 1.0, -np.inf)
    high = np.where(bounded, (b + root) / a_safe - 1.0, np.inf)
    return low, high


def crossing_probability(log_c: float, r: float, drift: float = 0.0, steps: int = 64, grid: int = 100) -> float:
    """P(a Brownian motion ``X(s) = drift·s + B(s)`` leaves ``[-b(s), b(s)]`` for some ``s ≤ r``).

    Recursive numerical integration of the sub-density of paths still inside, on ``steps`` times uniform in
    ``sqrt(s)`` (finer early, where the boundary bends) and ``grid`` midpoints across ``[-b, b]``. Between two
    grid times a path may leave and come back; the Brownian-bridge factor ``exp(-2(b-x)(b'-y)/Δs)`` (exact for
    a linear boundary, Siegmund 1985) removes those paths, which makes this continuous monitoring. The first
    step starts at ``s = 0.05``, where the density is ``N(0, 0.05)`` and crossing ``b(0) ≥ 2.4`` had
    probability < 1e-20. Checked against a 256×400 grid to 1e-4 for ``r`` in [0.5, 500].
    """
    if log_c <= 0:
        return 1.0  # Λ starts at 1: a threshold ≤ 1 is crossed before any data
    s0 = min(0.05, r)
    s = (math.sqrt(s0) + (math.sqrt(r) - math.sqrt(s0)) * np.arange(steps + 1) / steps) ** 2
    b = boundary(s, log_c)
    mids = (np.arange(grid) + 0.5) / grid * 2.0 - 1.0  # midpoints of [-1, 1], scaled by b at each time

    y, h = mids * b[0], 2.0 * b[0] / grid
    f = np.exp(-0.5 * (y - drift * s0) ** 2 / s0) / math.sqrt(2 * math.pi * s0)
    for k in range(steps):
        ds = s[k + 1] - s[k]
        y2 = mids * b[k + 1]
        gauss = np.exp(-0.5 * (y2[None, :] - y[:, None] - drift * ds) ** 2 / ds) / math.sqrt(2 * math.pi * ds)
        up = np.exp(-2.0 * (b[k] - y)[:, None] * (b[k + 1] - y2)[None, :] / ds)
        low = np.exp(-2.0 * (b[k] + y)[:, None] * (b[k + 1] + y2)[None, :] / ds)
        f = (f * h) @ (gauss * np.clip(1.0 - up - low, 0.0, 1.0))
        y, h = y2, 2.0 * b[k + 1] / grid
    return float(min(1.0, max(0.0, 1.0 - f.sum() * h)))


def _r_key(r: float) -> float:
    # Calibrations are cached on r rounded *up* to 1/100 of a decade (≤ 2.3% in r, < 1e-3 in log c): a
    # longer horizon has a higher threshold, so rounding up keeps the error ≤ α.
    return float(10 ** (math.ceil(math.log10(r) * 100 - 1e-9) / 100))


@lru_cache(maxsize=4096)
def _calibrated(alpha: float, r_key: float) -> float:
    lo, hi = 1e-3, math.log(1 / alpha)  # untruncated log(1/α) crosses with probability ≤ α: an upper end
    if crossing_probability(hi, r_key) <= alpha:
        return float(optimize.brentq(lambda lc: crossing_probability(lc, r_key) - alpha, lo, hi, xtol=1e-5))
    return hi  # cannot happen for r ≤ R_MAX (Ville), kept for safety


def truncated_log_threshold(alpha: float, r: float | None) -> float:
    """``log c`` of the truncated test with horizon ``r = τ²/V_N``; ``log(1/α)`` without a horizon."""
    if r is None or not math.isfinite(r) or r > R_MAX:
        return math.log(1 / alpha)
    return _calibrated(alpha, _r_key(max(r, R_MIN)))


def always_valid_p(max_log_lr: float, alpha_r: float | None) -> float:
    """Smallest α whose boundary the running maximum of ``log Λ`` has reached (see the module docstring)."""
    if not math.isfinite(max_log_lr) or max_log_lr <= 0:
        return 1.0
    if alpha_r is None or not math.isfinite(alpha_r) or alpha_r > R_MAX:
        return float(min(1.0, math.exp(-max_log_lr)))
    return crossing_probability(max_log_lr, max(alpha_r, R_MIN))


# =============================================================================== τ and the horizon


def _variance(result: TestResult) -> float:
    return result.std_a**2 / result.n_a + result.std_b**2 / result.n_b


def horizon_variance(result: TestResult, users_per_arm: int) -> float:
    """``V_N = s_a²/N + s_b²/N``: the variance the difference will have at the planned horizon."""
    return (result.std_a**2 + result.std_b**2) / users_per_arm


def mixing_scale(plan: SequentialPlan | None, result: TestResult, baseline: float | None = None) -> tuple[float, str]:
    """τ and a sentence saying where it came from (the report prints it)."""
    mean_a = baseline if baseline is not None else result.mean_a
    sd = math.sqrt((result.std_a**2 + result.std_b**2) / 2)
    if plan is not None and plan.mde is not None:
        if not plan.relative:
            return plan.mde, f"plan: MDE {plan.mde:g} (absolute)"
        if mean_a != 0:
            return plan.mde * abs(mean_a), f"plan: MDE {plan.mde:.3g} × control mean {mean_a:.4g}"
    if plan is not None and plan.planned_users_per_arm is not None and sd > 0:
        z = stats.norm.ppf(1 - plan.alpha / 2) + stats.norm.ppf(plan.power)
        tau = z * math.sqrt(horizon_variance(result, plan.planned_users_per_arm))
        return tau, (f"plan: the effect {plan.planned_users_per_arm} users per arm detect with "
                     f"{plan.power:.0%} power, (z + z_power)·sqrt(V_N)")
    if mean_a != 0:
        return DEFAULT_RELATIVE_MDE * abs(mean_a), (
            f"default: {DEFAULT_RELATIVE_MDE:.0%} of the control mean {mean_a:.4g} (no plan)")
    return DEFAULT_SD_MDE * sd, f"default: {DEFAULT_SD_MDE:g} × per-user SD (no plan, control mean 0)"


# =============================================================================== the readout


def _lift_sequence(result: TestResult, baseline: float | None,
                   w: float) -> tuple[float | None, float | None, str | None]:
    """(low, high, note) of the lift's confidence sequence, given the difference's half-width ``w`` now."""
    if baseline is not None:  # CUPED: lift = diff / raw control mean, which carries no variance of its own
        if baseline == 0:
            return None, None, None
        low, high = sorted(((result.diff - w) / baseline, (result.diff + w) / baseline))
        return low, high, None
    if result.mean_a == 0:
        return None, None, None
    var_a, var_b = result.std_a**2 / result.n_a, result.std_b**2 / result.n_b
    z = w / math.sqrt(var_a + var_b)
    low, high = (float(x) for x in lift_sequence(result.mean_a, result.mean_b, var_a, var_b, z))
    if math.isfinite(low) and math.isfinite(high):
        return low, high, None
    return None, None, (
        f"unbounded: the control mean {result.mean_a:.4g} is within {z:.2f} standard errors of 0, so no lift "
        "can be excluded yet (Fieller); read the difference's sequence")


def sequential_test(
    result: TestResult,
    plan: SequentialPlan | None,
    *,
    lower_is_better: bool = False,
    history: list[tuple[int, TestResult]] | None = None,
    baseline: float | None = None,
    t_ms: int = 0,
) -> SequentialResult | None:
    """The sequential readout at the current look ``result``, given the earlier looks ``history`` (oldest first).

    τ is fixed from the current data for the whole history (one boundary per report). The decision:
    crossed (always-valid p ≤ α) → decide now, the sign says better or worse; not crossed and at or past the
    planned horizon → the test is over without a sequential decision; otherwise keep running.
    """
    alpha = plan.alpha if plan is not None else result.alpha
    v = _variance(result)
    if not (math.isfinite(v) and v > 0):
        return None
    tau, source = mixing_scale(plan, result, baseline)
    if not (math.isfinite(tau) and tau > 0):
        return None

    horizon = plan.planned_users_per_arm if plan is not None else None
    r = tau**2 / horizon_variance(result, horizon) if horizon else None
    log_c = truncated_log_threshold(alpha, r)

    looks = [*(history or []), (t_ms, result)]
    timeline = []
    for ts, res in looks:
        vv = _variance(res)
        if not (math.isfinite(vv) and vv > 0):
            continue
        # looks past the horizon are outside the truncated test (its error was calibrated up to V_N)
        if horizon and min(res.n_a, res.n_b) > horizon and res is not result:
            continue
        w = float(half_width(vv, tau, log_c))
        timeline.append(Look(t_ms=ts, users_a=res.n_a, users_b=res.n_b, diff=res.diff, cs_low=res.diff - w,
                             cs_high=res.diff + w, log_lr=float(log_lr(res.diff, vv, tau))))
    within = [lk for lk in timeline if not horizon or min(lk.users_a, lk.users_b) <= horizon] or timeline[-1:]
    max_llr = max(lk.log_lr for lk in within)
    p = always_valid_p(max_llr, r)
    w = float(half_width(v, tau, log_c))
    cs_low, cs_high = result.diff - w, result.diff + w

    lift_low, lift_high, lift_note = _lift_sequence(result, baseline, w)

    fraction = horizon_variance(result, horizon) / v if horizon else None
    decision, explanation = _decide(p, alpha, within, lower_is_better, fraction, horizon, w, result)
    return SequentialResult(
        tau=tau, tau_source=source, alpha=alpha, log_threshold=log_c, horizon_users_per_arm=horizon,
        information_fraction=fraction, always_valid_p=p, cs_low=cs_low, cs_high=cs_high,
        lift_cs_low=lift_low, lift_cs_high=lift_high, lift_cs_note=lift_note, decision=decision,
        explanation=explanation, timeline=timeline,
    )


def _decide(p: float, alpha: float, looks: list[Look], lower_is_better: bool, fraction: float | None,
            horizon: int | None, w: float, result: TestResult) -> tuple[Decision, str]:
    if p <= alpha:
        # the sign at the first look whose boundary was crossed is the decision (a stopped test stays stopped)
        log_c_crossed = next((lk for lk in looks if lk.cs_low > 0 or lk.cs_high < 0), looks[-1])
        up = log_c_crossed.diff > 0
        better = up != lower_is_better
        return ("treatment_better" if better else "treatment_worse"), (
            f"decide now: the {1 - alpha:.0%} confidence sequence excludes 0 (always-valid p = {p:.3g} ≤ {alpha:g}); "
            f"treatment is {'better' if better else 'worse'}. Valid however often the test was looked at.")
    if horizon and fraction is not None and fraction >= 1.0:
        return "horizon_reached", (
            f"reached the planned horizon ({horizon} users per arm) without crossing the boundary: stop. "
            f"If this is the test's first and only look, read the fixed-horizon result (p = {result.p_value:.3g}); "
            "if it was watched along the way, the effect is smaller than the plan could detect.")
    progress = f"{fraction:.0%} of the planned information" if fraction is not None else "no planned horizon"
    return "keep_running", (
        f"keep running ({progress}): always-valid p = {p:.3g} > {alpha:g}; the boundary needs |diff| > {w:.3g} "
        "now, and narrows as users arrive.")


# =============================================================================== planning


def fixed_sample_size(mde: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Users per arm of the two-sided fixed-horizon z-test: ``n = 2 σ² (z_{1-α/2} + z_power)² / MDE²``."""
    _check_plan_inputs(mde, sd, alpha, power)
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(2 * sd**2 * z**2 / mde**2)


def sequential_power(r: float, alpha: float = 0.05) -> float:
    """Power of the truncated mixture test with ``τ = MDE`` at horizon ``r = MDE²/V_N``, watched continuously.

    In units of ``s = τ²/V`` the true effect θ = τ adds a drift ``θ/τ = 1`` to ``X(s)``; the power is that
    drifting Brownian motion's crossing probability over ``[0, r]`` at the calibrated threshold.
    """
    return crossing_probability(truncated_log_threshold(alpha, r), r, drift=1.0)


def sequential_sample_size(mde: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Users per arm for the truncated mixture test with ``τ = MDE`` to reach ``power`` (continuous looks).

    Solves ``sequential_power(r) = power`` for ``r = MDE² n / (2σ²)``. Daily looks see a little less than
    continuous monitoring, so this is the horizon to plan with at least.
    """
    _check_plan_inputs(mde, sd, alpha, power)
    r = optimize.brentq(lambda rr: sequential_power(rr, alpha) - power, R_MIN, R_MAX, xtol=1e-3)
    return math.ceil(r * 2 * sd**2 / mde**2)


def _check_plan_inputs(mde: float, sd: float, alpha: float, power: float) -> None:
    if not (mde > 0 and sd > 0 and 0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"need mde > 0, sd > 0, 0 < alpha < 1, 0 < power < 1; got {mde}, {sd}, {alpha}, {power}")


class Baseline(BaseModel):
    """Pre-period figures a plan is sized from: the per-user metric's mean and SD, and users arriving per day."""

    metric: str
    mean: float
    sd: float
    users_per_day: float | None
    users: int


PLANNABLE_METRICS = ("listens", "likes", "skips", "listening_time", "events", "skip_rate")


def baseline_from_events(interactions: pd.DataFrame, metric: str) -> Baseline:
    """Per-user mean/SD of ``metric`` and distinct users per day from pre-period (organic) events.

    ``skip_rate`` is the ratio of sums Σ skips / Σ plays, its SD the linearised per-user SD of the delta method
    (``stats.ratio_test``), so ``fixed_sample_size`` applies unchanged. Users per day is the distinct users over
    the pre-period's days: new users enter an experiment more slowly than that when many return daily, so the
    duration it gives is a lower bound.
    """
    from experiments.metrics import pre_period_covariates

    if metric not in PLANNABLE_METRICS:
        raise ValueError(f"metric must be one of {PLANNABLE_METRICS}, got {metric!r}")
    per = pre_period_covariates(interactions)
    if len(per) < 2:
        raise ValueError("the pre-period has fewer than 2 users")
    if metric == "skip_rate":
        num, den = per["skips"].to_numpy(float), (per["listens"] + per["skips"]).to_numpy(float)
        mean = float(num.sum() / den.sum())
        sd = float(((num - mean * den) / den.mean()).std(ddof=1))
    else:
        x = per[metric].to_numpy(float)
        mean, sd = float(x.mean()), float(x.std(ddof=1))
    per_day = None
    if "timestamp_ms" in interactions.columns and len(interactions):
        ts = pd.to_numeric(interactions["timestamp_ms"])
        days = (int(ts.max()) - int(ts.min())) / 86_400_000
        if days >= 1:
            per_day = len(per) / days
    return Baseline(metric=metric, mean=mean, sd=sd, users_per_day=per_day, users=len(per))


class PlanSummary(BaseModel):
    """What ``encore ab plan`` prints: horizons of both tests for one MDE."""

    mde_absolute: float
    mde_relative: float | None
    baseline_mean: float
    baseline_sd: float
    alpha: float
    power: float
    fixed_users_per_arm: int
    sequential_users_per_arm: int
    sequential_over_fixed: float
    users_per_day: float | None
    arms: int
    fixed_days: float | None
    sequential_days: float | None
    plan: SequentialPlan


def plan_experiment(mde: float, *, relative: bool, mean: float, sd: float, users_per_day: float | None,
                    alpha: float = 0.05, power: float = 0.8, arms: int = 2) -> PlanSummary:
    """Sample size per arm and days for both tests, and the ``plan`` block to put in the experiment's config.

    The plan states the sequential horizon: a test that will be watched must be sized for the sequential test.
    """
    absolute = mde * abs(mean) if relative else mde
    if not absolute > 0:
        raise ValueError("a relative MDE needs a non-zero baseline mean")
    n_fixed = fixed_sample_size(absolute, sd, alpha, power)
    n_seq = sequential_sample_size(absolute, sd, alpha, power)
    per_arm_day = users_per_day / arms if users_per_day else None
    return PlanSummary(
        mde_absolute=absolute, mde_relative=mde if relative else (mde / abs(mean) if mean else None),
        baseline_mean=mean, baseline_sd=sd, alpha=alpha, power=power,
        fixed_users_per_arm=n_fixed, sequential_users_per_arm=n_seq, sequential_over_fixed=n_seq / n_fixed,
        users_per_day=users_per_day, arms=arms,
        fixed_days=n_fixed / per_arm_day if per_arm_day else None,
        sequential_days=n_seq / per_arm_day if per_arm_day else None,
        plan=SequentialPlan(mde=mde, relative=relative, planned_users_per_arm=n_seq, alpha=alpha, power=power),
    )
