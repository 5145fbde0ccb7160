"""Rollouts by simulation: how often an A/A rollout acts, and how early a planted harm is rolled back.

    python -m bench.rollouts [--runs 400] [--seed 0]

Each simulated rollout ramps a two-arm experiment (50/50, control ``alias:champion``, treatment ``version:2``)
through the policy's steps 1% → 5% → 25% → 50%, one look per simulated hour, with ``ARRIVALS`` eligible users
per hour of whom the experiment's traffic share enters. At every look the decision is
``experiments.rollout.next_action`` itself, on an ``ABReport`` whose tests are the sequential engine's own
(``experiments.sequential.sequential_test`` with the earlier looks as its history, ``stats.srm_check``); only the
per-user data is summarised as running sums per arm instead of exposure logs, so a run costs arithmetic on
a dozen looks rather than a full readout per look. Advances are applied as ``apply_action`` would (traffic
moves to the next step, the step's user count restarts); a rollback or decision ends the run.

Per-user metrics: ``listening_time`` (the primary metric, Gamma with mean 2 and SD 2.8: heavy-tailed) and
the guardrail ``skip_rate`` (Σ skips / Σ plays, plays ~ Poisson(6), skip probability 0.30), analysed as the
report analyses them (a mean; a ratio of sums with delta-method variance). The plan: relative MDE 5% at
α = 0.05, horizon ``HORIZON`` users per arm (the sequential size for that MDE on ``listening_time``).

Figures (shares of ``runs`` with Clopper–Pearson 95% intervals):

- ``aa``: no difference between the arms, ``runs`` rollouts under the default policy (``at_horizon:
  keep_control``). ``false_rollback_rate`` (SRM, or a guardrail or the primary metric shown harmed),
  ``false_promotion_rate`` (decided for the treatment), ``false_action_rate`` (either), against ``alpha``.
  Keeping the control is not an action on the models (the champion stays), so it is not a false action.
- ``aa_fixed_readout_at_horizon``: the same with ``at_horizon: fixed_readout`` (the fixed-horizon readout
  decides at the horizon, after the watched sequential test).
- ``harm`` (``runs // 2``): the treatment raises the skip probability to 0.33 (+10%): ``rolled_back_by_5pct``
  is the share rolled back before the ramp passes 5% (at step 1 or 2), the issue's bar.
- ``good`` (``runs // 2``): the treatment lifts listening time by 5% (the MDE): the share decided for the
  treatment, with either horizon rule (``decided_for_treatment``: the default; ``fixed_readout_at_horizon``).

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
from scipy import stats

from bench.experiments import binomial_ci
from experiments.assignment import Experiment
from experiments.metrics import AttributionStats
from experiments.report import ABReport, MetricTest
from experiments.rollout import RolloutAction, next_action
from experiments.sequential import SequentialPlan, sequential_test
from experiments.stats import TestResult, srm_check

ALPHA = 0.05
STEPS = [0.01, 0.05, 0.25, 0.5]
ARRIVALS = 20_000  # eligible users per simulated hour
MIN_USERS = 1_000  # users per step before the next
HORIZON = 17_000  # users per arm: the sequential size for a 5% lift on listening_time at 80% power
MAX_LOOKS = 60  # a run that has not acted by then is counted as holding
LISTEN_SHAPE, LISTEN_SCALE = 0.5, 4.0  # Gamma: mean 2, SD 2.83
PLAYS_MEAN, SKIP_P = 6.0, 0.30
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
PRIMARY, GUARDRAIL = "listening_time", "skip_rate"


def experiment(steps: list[float] = STEPS, min_users: int = MIN_USERS, horizon: int = HORIZON,
               alpha: float = ALPHA, at_horizon: str = "keep_control") -> Experiment:
    """The simulated experiment: before its first step (traffic 0), with the rollout policy and the plan."""
    return Experiment.model_validate({
        "name": "rollout-sim", "salt": "rollout-sim", "traffic": 0.0,
        "variants": [{"name": "control", "weight": 0.5, "target": "alias:champion"},
                     {"name": "treatment", "weight": 0.5, "target": "version:2"}],
        "plan": {"mde": 0.05, "relative": True, "planned_users_per_arm": horizon, "alpha": alpha},
        "rollout": {"steps": steps, "min_users_per_step": min_users, "primary_metric": PRIMARY,
                    "guardrails": [GUARDRAIL], "on_decision": "promote", "at_horizon": at_horizon}})


@dataclass
class Arm:
    """Running sums of one arm's per-user values: all a mean's or a ratio's test needs."""

    n: int = 0
    x: float = 0.0  # listening time
    xx: float = 0.0
    num: float = 0.0  # skips
    den: float = 0.0  # plays
    nn: float = 0.0
    dd: float = 0.0
    nd: float = 0.0

    def add(self, listening: np.ndarray, skips: np.ndarray, plays: np.ndarray) -> None:
        self.n += len(listening)
        self.x, self.xx = self.x + listening.sum(), self.xx + (listening**2).sum()
        self.num, self.den = self.num + skips.sum(), self.den + plays.sum()
        self.nn, self.dd, self.nd = self.nn + (skips**2).sum(), self.dd + (plays**2).sum(), self.nd + (skips * plays).sum()

    def mean_sd(self) -> tuple[float, float]:
        m = self.x / self.n
        return m, math.sqrt(max(self.xx - self.n * m * m, 0.0) / (self.n - 1))

    def ratio_sd(self) -> tuple[float, float]:
        """Σ num / Σ den and the SD of the linearised per-user values (as ``stats.ratio_test``)."""
        r, mean_den = self.num / self.den, self.den / self.n
        ss = self.nn - 2 * r * self.nd + r * r * self.dd  # Σ (num - r·den)², whose mean part is 0 by r's definition
        return r, math.sqrt(max(ss, 0.0) / (self.n - 1)) / mean_den


def _test(a: tuple[float, float, int], b: tuple[float, float, int]) -> TestResult:
    """The normal-approximation two-sample result from per-arm (mean, SD, n) (the sizes here are ≥ 100)."""
    (ma, sa, na), (mb, sb, nb) = a, b
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    diff = mb - ma
    z = diff / se if se > 0 else math.nan
    q = float(stats.norm.ppf(1 - ALPHA / 2))
    rel = rel_low = rel_high = None
    if ma:
        rel, se_rel = diff / ma, math.sqrt(vb / ma**2 + mb**2 * va / ma**4)
        rel_low, rel_high = rel - q * se_rel, rel + q * se_rel
    return TestResult(mean_a=ma, mean_b=mb, diff=diff, ci_low=diff - q * se, ci_high=diff + q * se, rel_lift=rel,
                      rel_lift_ci_low=rel_low, rel_lift_ci_high=rel_high,
                      p_value=float(2 * stats.norm.sf(abs(z))) if se > 0 else math.nan, statistic=z,
                      df=float(na + nb - 2), n_a=na, n_b=nb, std_a=sa, std_b=sb, alpha=ALPHA)


_ATTRIBUTION = AttributionStats(interactions=0, duplicates=0, without_request_id=0, unmatched_request_id=0,
                                before_exposure=0, after_window=0, user_mismatch=0, variant_mismatch=0, attributed=0)


def look_report(control: Arm, treatment: Arm, plan: SequentialPlan,
                history: dict[str, list[tuple[int, TestResult]]], t_ms: int) -> ABReport:
    """The report ``next_action`` reads, from the arms' running sums: the engine's sequential tests with the
    earlier looks (``history``, appended to here) and the SRM check on the users per arm."""
    results = {PRIMARY: _test((*control.mean_sd(), control.n), (*treatment.mean_sd(), treatment.n)),
               GUARDRAIL: _test((*control.ratio_sd(), control.n), (*treatment.ratio_sd(), treatment.n))}
    tests = []
    for metric, result in results.items():
        lower = metric == GUARDRAIL
        seq = sequential_test(result, plan, lower_is_better=lower, history=history[metric], t_ms=t_ms)
        history[metric].append((t_ms, result))
        tests.append(MetricTest(metric=metric, control="control", treatment="treatment", result=result,
                                p_adjusted=result.p_value, significant=result.p_value < ALPHA, lower_is_better=lower,
                                always_valid_p=seq.always_valid_p if seq else None, ratio=lower, sequential=seq))
    srm = srm_check({"control": control.n, "treatment": treatment.n}, {"control": 0.5, "treatment": 0.5})
    return ABReport(name="rollout-sim", control="control", alpha=ALPHA, window_s=3600,
                    weights={"control": 0.5, "treatment": 0.5}, correction="none", generated_at=T0.isoformat(),
                    variants=[], tests=tests, srm=srm, attribution=_ATTRIBUTION, notes=[], guardrails=[GUARDRAIL],
                    plan=plan)


@dataclass
class Outcome:
    kind: str  # the ending action's kind, or "hold" when MAX_LOOKS passed without one
    traffic: float  # the traffic share in force when it acted
    looks: int
    users: int
    actions: list[str] = field(default_factory=list)


def simulate_rollout(rng: np.random.Generator, *, listen_lift: float = 0.0, skip_p_treatment: float = SKIP_P,
                     exp: Experiment | None = None) -> Outcome:
    """One rollout, look by look, until an action other than hold/advance (or ``MAX_LOOKS``)."""
    exp = exp or experiment()
    plan = exp.plan
    if plan is None:
        raise ValueError("the simulated experiment needs a plan (it sets the sequential tests' τ and horizon)")
    arms = {"control": Arm(), "treatment": Arm()}
    history: dict[str, list[tuple[int, TestResult]]] = {PRIMARY: [], GUARDRAIL: []}
    users_in_step, trail = 0, []
    action: RolloutAction = next_action(exp, None, now=T0, users_in_step=0)  # before the first step
    for look in range(1, MAX_LOOKS + 1):
        if action.kind == "advance":
            exp, users_in_step = exp.model_copy(update={"traffic": action.to_traffic}), 0
            trail.append(f"advance {action.to_traffic:g}")
        elif action.kind != "hold":
            return Outcome(action.kind, action.from_traffic, look - 1, arms["control"].n + arms["treatment"].n, trail)
        entering = rng.binomial(ARRIVALS, exp.traffic)
        in_treatment = rng.binomial(entering, 0.5)
        for name, n in (("control", entering - in_treatment), ("treatment", in_treatment)):
            scale = LISTEN_SCALE * (1 + listen_lift if name == "treatment" else 1)
            plays = rng.poisson(PLAYS_MEAN, n).astype(float)
            skips = rng.binomial(plays.astype(int), skip_p_treatment if name == "treatment" else SKIP_P).astype(float)
            arms[name].add(rng.gamma(LISTEN_SHAPE, scale, n), skips, plays)
        users_in_step += entering
        now = T0 + timedelta(hours=look)
        report = look_report(arms["control"], arms["treatment"], plan, history, int(now.timestamp() * 1000))
        action = next_action(exp, report, now=now, users_in_step=users_in_step)
    if action.kind not in ("hold", "advance"):
        return Outcome(action.kind, action.from_traffic, MAX_LOOKS, arms["control"].n + arms["treatment"].n, trail)
    return Outcome("hold", exp.traffic, MAX_LOOKS, arms["control"].n + arms["treatment"].n, trail)


def _share(hits: list[bool]) -> dict:
    k, n = int(sum(hits)), len(hits)
    return {"value": k / n, "ci95": list(binomial_ci(k, n)), "runs": n}


def _kinds(outcomes: list[Outcome]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        out[o.kind] = out.get(o.kind, 0) + 1
    return out


def aa_rates(outcomes: list[Outcome], alpha: float = ALPHA) -> dict:
    """False rollbacks, false promotions and false actions of A/A rollouts, with their intervals."""
    rollback = [o.kind == "rollback" for o in outcomes]
    promote = [o.kind == "decide_treatment" for o in outcomes]
    action = [a or b for a, b in zip(rollback, promote)]
    rate = _share(action)
    return {"runs": len(outcomes), "alpha": alpha, "false_rollback_rate": _share(rollback),
            "false_promotion_rate": _share(promote), "false_action_rate": rate,
            "within_alpha": rate["value"] <= alpha, "outcomes": _kinds(outcomes)}


def run_bench(runs: int = 400, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    aa = [simulate_rollout(rng) for _ in range(runs)]
    fixed = experiment(at_horizon="fixed_readout")
    aa_fixed = [simulate_rollout(rng, exp=fixed) for _ in range(runs)]
    harm = [simulate_rollout(rng, skip_p_treatment=0.33) for _ in range(max(10, runs // 2))]
    good = [simulate_rollout(rng, listen_lift=0.05) for _ in range(max(10, runs // 2))]
    good_fixed = [simulate_rollout(rng, listen_lift=0.05, exp=fixed) for _ in range(max(10, runs // 2))]
    rolled_back = [o.kind == "rollback" for o in harm]
    return {
        "bench": "rollouts",
        "design": {"steps": STEPS, "arrivals_per_look": ARRIVALS, "min_users_per_step": MIN_USERS,
                   "plan": {"mde": 0.05, "relative": True, "planned_users_per_arm": HORIZON, "alpha": ALPHA},
                   "primary": PRIMARY, "guardrails": [GUARDRAIL], "max_looks": MAX_LOOKS},
        "runs": runs,
        "aa": aa_rates(aa),
        "aa_fixed_readout_at_horizon": aa_rates(aa_fixed),
        "harm": {"skip_p": [SKIP_P, 0.33], "rolled_back": _share(rolled_back),
                 "rolled_back_by_5pct": _share([o.kind == "rollback" and o.traffic <= 0.05 for o in harm]),
                 "median_users_at_rollback": float(np.median([o.users for o in harm if o.kind == "rollback"]))
                 if any(rolled_back) else None, "outcomes": _kinds(harm)},
        "good": {"listening_time_lift": 0.05, "decided_for_treatment": _share(
            [o.kind == "decide_treatment" for o in good]), "outcomes": _kinds(good),
                 "fixed_readout_at_horizon": _share([o.kind == "decide_treatment" for o in good_fixed])},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=400, help="simulated rollouts per scenario (default: 400)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.runs < 10:
        ap.error("--runs must be at least 10")
    result = run_bench(args.runs, args.seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
