"""Rollouts that act on their own evidence: a guarded ramp, automatic rollback, promotion on a decision.

Two halves, so that a scheduler (a Dagster sensor), the CLI and a simulation share one decision rule:

* :func:`next_action` is **pure**: the experiment (with its ``rollout`` policy), its current A/B report and
  the step's progress in, one :class:`RolloutAction` out. No I/O, no clock of its own (``now`` is given).
* :func:`apply_action` carries an action out on the experiment store and the model registry, every side
  effect audited: a line in the store's audit log (with the reason and statistics) and ``encore.rollout.*``
  tags on the model versions concerned.

**The rules**, in order (the first that applies wins):

1. **SRM** flagged → ``rollback``: the arms' split is broken, so no comparison can be trusted, the guardrails'
   included, and the safe state is the one before the experiment.
2. A **guardrail** whose sequential test decides ``treatment_worse`` at α/H → ``rollback``, where H counts the
   metrics a rollback watches (the guardrails and the primary): a Bonferroni split, so the harm side's false
   rollbacks stay within about α/2 and the promotion side's within α/2. The test is always valid
   (``experiments.sequential``), so reading it at every tick, however often, keeps its error within its share. The report's
   fixed-horizon guardrail flag is *not* used: read continuously it would fire on noise.
3. The **primary** metric decided worse (sequentially, at α/H) → ``rollback`` at any step, as a harmed guardrail: the
   treatment is shown to hurt what the experiment exists to improve, so ramping it exposes more users for
   nothing and no alias should keep pointing at it. (A treatment merely *not shown better* keeps the control
   without touching the aliases: ``decide_control``, below.)
4. The plan's **horizon** reached on the primary metric (the truncated test is over) → the fixed-horizon
   readout decides: better and significant at the plan's α → ``decide_treatment``, else ``decide_control``
   (``at_horizon: keep_control`` keeps the control instead: the fixed-horizon test is read after the
   sequential one was watched, so with it a false promotion may come from either, up to α against α/2).
5. Before the first step → ``advance`` to it. Below the last step → ``advance`` once the step has its
   ``min_users_per_step`` new users (one number, or one per step), lasted ``min_hours_per_step``, and every
   guardrail has a test; else ``hold``.
6. At the last step: the primary metric's sequential decision ``treatment_better`` → ``decide_treatment``;
   still running → ``hold``.

Rollback is ``status: stopped`` in the store (the serving control plane re-reads the store within about a
second and never waits on MLflow) and every alias that points at the treatment's version (the rolled-out
alias if it had already moved there; ``challenger`` where the training pipeline registered it) back to the
version it replaced. ``decide_treatment`` goes through the existing promotion
path (``models.lifecycle.promotion.conclude``), which refuses a version without a passing gate verdict.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, Field

from experiments.assignment import Experiment
from experiments.report import ABReport, MetricTest
from experiments.rollout_policy import RolloutPolicy
from experiments.store import ExperimentError, ExperimentStore

if TYPE_CHECKING:
    from models.lifecycle.registry import Registry

__all__ = ["RolloutPolicy", "RolloutAction", "MetricEvidence", "AppliedRollout", "next_action", "apply_action",
           "current_step", "step_progress", "TAG_PREFIX"]

ActionKind = Literal["hold", "advance", "rollback", "decide_treatment", "decide_control"]
TAG_PREFIX = "encore.rollout."
# A share this close to a step is that step (shares are decimals on a 1e-4 grid).
_STEP_TOLERANCE = 1e-9


class MetricEvidence(BaseModel):
    """One metric's evidence at the action: the estimate, the always-valid p and the confidence sequences."""

    metric: str
    diff: float
    lift: float | None
    fixed_p: float = Field(description="fixed-horizon p-value (valid read once, at the planned horizon)")
    always_valid_p: float | None
    cs_low: float | None
    cs_high: float | None
    lift_cs_low: float | None
    lift_cs_high: float | None
    decision: str | None = Field(description="the sequential decision (experiments.sequential.Decision)")
    alpha: float | None = Field(default=None, description="the sequential test's α (the plan's)")
    lower_is_better: bool


class RolloutAction(BaseModel):
    """What a rollout should do now, and why."""

    experiment: str
    phase: int
    kind: ActionKind
    reason: str = Field(description="one sentence a person can read in the audit log")
    from_traffic: float
    to_traffic: float = Field(description="the experiment's traffic share once applied (0: it stops)")
    step: int = Field(description="the step in force before the action, 1-based; 0 before the first")
    steps: int
    statistics: dict[str, MetricEvidence] = Field(default_factory=dict,
                                                  description="the metrics that caused the action")
    evidence: dict[str, MetricEvidence] = Field(default_factory=dict,
                                                description="every watched metric: primary and guardrails")
    srm_p: float | None = None
    srm_flagged: bool = False
    users: int = Field(default=0, description="users in the report, all configured arms")
    users_in_step: int = 0
    at: datetime

    def audit_note(self) -> dict[str, Any]:
        """The audit line's ``rollout`` entry: everything a person needs to see why it happened."""
        return {"rollout": self.model_dump(mode="json", exclude={"evidence"})
                | {"evidence": {m: e.model_dump(mode="json") for m, e in self.evidence.items()}}}


class AppliedRollout(BaseModel):
    """What :func:`apply_action` did."""

    action: RolloutAction
    effects: list[str] = Field(default_factory=list, description="each side effect, in order")
    tagged_versions: list[int] = Field(default_factory=list)
    alias_restored_to: int | None = Field(default=None, description="where the rolled-out alias went back to")
    restored_aliases: dict[str, int] = Field(default_factory=dict, description="every alias moved back: version")
    promoted: bool = False
    awaiting: str | None = Field(default=None, description="'approval' or 'gate' when a decided treatment waits")


# =============================================================================== deciding


def current_step(policy: RolloutPolicy, traffic: float) -> int:
    """The step in force at ``traffic``, 1-based (the highest step at or below it); 0 below the first step."""
    return sum(1 for share in policy.steps if share <= traffic + _STEP_TOLERANCE)


def _evidence(test: MetricTest) -> MetricEvidence:
    q = test.sequential
    return MetricEvidence(
        metric=test.metric, diff=test.result.diff, lift=test.result.rel_lift, fixed_p=test.result.p_value,
        always_valid_p=q.always_valid_p if q else None, cs_low=q.cs_low if q else None,
        cs_high=q.cs_high if q else None, lift_cs_low=q.lift_cs_low if q else None,
        lift_cs_high=q.lift_cs_high if q else None, decision=q.decision if q else None,
        alpha=q.alpha if q else None, lower_is_better=test.lower_is_better)


def _harmed(e: MetricEvidence, watched: int) -> bool:
    """Shown harmed at the rollout's share of α: the sequential test decided ``treatment_worse`` with an
    always-valid p ≤ α / ``watched`` (Bonferroni over the metrics a rollback watches: the guardrails and the
    primary), so the chance of any false rollback stays about α/2, however many guardrails there are."""
    return (e.decision == "treatment_worse" and e.always_valid_p is not None and e.alpha is not None
            and e.always_valid_p <= e.alpha / max(1, watched))


def _tests(report: ABReport, policy: RolloutPolicy) -> dict[str, MetricTest]:
    """The watched metrics' tests of the rollout's treatment (a metric the report could not test is absent)."""
    out = {}
    for metric in dict.fromkeys([policy.primary_metric, *policy.guardrails]):
        found = [t for t in report.tests if t.metric == metric and t.treatment == policy.treatment
                 and t.control == policy.control]
        if found:
            out[metric] = found[0]
    return out


def _describe(e: MetricEvidence) -> str:
    lift = f"{e.lift:+.2%}" if e.lift is not None and math.isfinite(e.lift) else f"diff {e.diff:+.4g}"
    interval = (f" [{e.lift_cs_low:+.2%}, {e.lift_cs_high:+.2%}]" if e.lift_cs_low is not None
                and e.lift_cs_high is not None else "")
    p = f"{e.always_valid_p:.3g}" if e.always_valid_p is not None else "n/a"
    return f"{e.metric} {lift}{interval} (always-valid p = {p})"


def next_action(experiment: Experiment, report: ABReport | None, *, now: datetime, users_in_step: int,
                step_started_at: datetime | None = None) -> RolloutAction:
    """The rollout's next action from the experiment's current report (see the module docstring's rules).

    ``report`` is the current phase's report for the experiment's arms (None before any exposure);
    ``users_in_step`` the users (all arms) who entered since the current step began, ``step_started_at`` when
    it began (needed only for ``min_hours_per_step``). Pure: the same inputs give the same action.
    """
    policy = experiment.rollout
    if policy is None:
        raise ValueError(f"experiment {experiment.name!r} has no rollout policy")
    traffic = experiment.traffic_at(now)
    step = current_step(policy, traffic)
    last = len(policy.steps)

    def act(kind: ActionKind, reason: str, *, to: float | None = None,
            cause: dict[str, MetricEvidence] | None = None) -> RolloutAction:
        stops = kind in ("rollback", "decide_control")
        return RolloutAction(
            experiment=experiment.name, phase=experiment.phase, kind=kind, reason=reason, from_traffic=traffic,
            to_traffic=0.0 if stops else (traffic if to is None else to), step=step, steps=last,
            statistics=cause or {}, evidence=evidence, srm_p=report.srm.p_value if report else None,
            srm_flagged=bool(report and report.srm.flagged), users=users, users_in_step=users_in_step, at=now)

    tests = _tests(report, policy) if report is not None else {}
    evidence = {m: _evidence(t) for m, t in tests.items()}
    users = sum(report.srm.observed.get(v, 0) for v in (policy.treatment, policy.control)) if report else 0

    if experiment.status != "running":
        return act("hold", f"the experiment is {experiment.status}: a rollout acts only on a running one")
    if report is not None and report.srm.flagged:
        counts = ", ".join(f"{k}={v}" for k, v in report.srm.observed.items())
        return act("rollback", f"sample ratio mismatch (p = {report.srm.p_value:.2g} < {report.srm.threshold:g}; "
                   f"users {counts}): the split is broken, so no comparison can be trusted; stop the treatment")
    watched = len(dict.fromkeys([*policy.guardrails, policy.primary_metric]))
    harmed = {m: evidence[m] for m in policy.guardrails if m in evidence and _harmed(evidence[m], watched)}
    if harmed:
        return act("rollback", "guardrail harmed at step "
                   f"{step}/{last} (traffic {traffic:g}): " + "; ".join(map(_describe, harmed.values()))
                   + ": the confidence sequence excludes 0 on the harmful side; stop the treatment", cause=harmed)

    primary = evidence.get(policy.primary_metric)
    if primary is not None and _harmed(primary, watched):
        return act("rollback", f"the primary metric is harmed at step {step}/{last} (traffic {traffic:g}): "
                   f"{_describe(primary)}: the confidence sequence excludes 0 on the harmful side; stop the "
                   "treatment", cause={primary.metric: primary})
    if primary is not None and primary.decision == "horizon_reached":
        if policy.at_horizon == "keep_control":
            return act("decide_control", f"planned horizon reached without a sequential decision "
                       f"({_describe(primary)}): keep the control", cause={primary.metric: primary})
        return _at_horizon(act, primary, tests[policy.primary_metric])

    if step == 0:
        return act("advance", f"start the ramp at step 1/{last} (traffic {policy.steps[0]:g})", to=policy.steps[0])
    if step < last:
        waiting = _step_waits(policy, step, tests, users_in_step, now, step_started_at)
        nxt = policy.steps[step]
        if waiting:
            return act("hold", f"hold at step {step}/{last} (traffic {traffic:g}): " + "; ".join(waiting))
        clean = "; ".join(_describe(e) for m, e in evidence.items() if m in policy.guardrails)
        return act("advance", f"step {step}/{last} is clean after {users_in_step} users (no SRM, no guardrail "
                   f"harmed: {clean or 'none watched'}); advance to traffic {nxt:g}", to=nxt)

    if primary is None:
        return act("hold", f"at the last step, the primary metric {policy.primary_metric} has no test yet")
    if primary.decision == "treatment_better":
        return act("decide_treatment", f"decided for the treatment at the last step (traffic {traffic:g}): "
                   f"{_describe(primary)}", cause={primary.metric: primary})
    return act("hold", f"at the last step (traffic {traffic:g}), the sequential test of the primary metric has "
               f"not decided: {_describe(primary)}")


def _at_horizon(act: Any, primary: MetricEvidence, test: MetricTest) -> RolloutAction:  # noqa: ANN401
    """The planned horizon: the truncated sequential test is over; the fixed-horizon readout decides."""
    alpha = test.sequential.alpha if test.sequential is not None else test.result.alpha
    up = test.result.diff > 0
    better = up != test.lower_is_better
    if math.isfinite(primary.fixed_p) and primary.fixed_p < alpha and better:
        return act("decide_treatment", f"planned horizon reached; the fixed-horizon readout favours the treatment: "
                   f"{_describe(primary)}, p = {primary.fixed_p:.3g} < {alpha:g}", cause={primary.metric: primary})
    return act("decide_control", f"planned horizon reached without a win for the treatment (fixed-horizon "
               f"p = {primary.fixed_p:.3g}, {_describe(primary)}): keep the control", cause={primary.metric: primary})


def _step_waits(policy: RolloutPolicy, step: int, tests: dict[str, MetricTest], users_in_step: int, now: datetime,
                started: datetime | None) -> list[str]:
    """What the current step still waits for (empty: it may advance)."""
    waits = []
    untested = [m for m in policy.guardrails if m not in tests or tests[m].sequential is None]
    if untested:
        # a guardrail that cannot be tested yet cannot clear the step
        waits.append(f"guardrails {untested} have no sequential test yet")
    needed = policy.min_users_for(step)
    if users_in_step < needed:
        waits.append(f"{users_in_step} of {needed} users in this step")
    if policy.min_hours_per_step is not None:
        hours = (now - started).total_seconds() / 3600 if started is not None else 0.0
        if hours < policy.min_hours_per_step:
            waits.append(f"{hours:.1f} of {policy.min_hours_per_step:g} hours in this step")
    return waits


def step_progress(store: ExperimentStore, experiment: Experiment, users_now: int) -> tuple[int, datetime | None]:
    """``(users_in_step, step_started_at)`` from the store's audit log: the current step began at the latest
    traffic change of the current phase; a rollout's own advance records the users at that moment.

    A step entered by hand (``encore ab ramp``) has no user count: all the phase's users count for it then,
    which can only make that step shorter than the policy asks."""
    started, users_then = experiment.phase_started_at, 0
    for row in reversed(store.audit(experiment.name, limit=100_000)):
        if row.get("phase", 1) != experiment.phase:
            break
        change = row.get("change") or {}
        if "traffic" in change or row.get("action") in ("create", "replace"):
            started = datetime.fromisoformat(row["time"])
            rollout = change.get("rollout") or {}
            users_then = int(rollout.get("users", 0)) if rollout.get("kind") == "advance" else 0
            break
    return max(0, users_now - users_then), started


# =============================================================================== acting


class RolloutError(ExperimentError):
    """An action that cannot be applied (stale, or the registry cannot do what the policy asks)."""


def _version_of(target: str) -> int | None:
    kind, _, value = target.partition(":")
    return int(value) if kind == "version" else None


def _tags(action: RolloutAction, role: str) -> dict[str, str]:
    """The ``encore.rollout.*`` tags of one model version: the latest action, and that action in a history key
    (tags are overwritten per key, so each action also gets its own ``log.<unix ms>`` entry)."""
    tags = {"experiment": action.experiment, "phase": str(action.phase), "action": action.kind,
            "reason": action.reason, "role": role, "at": action.at.isoformat(), "traffic": f"{action.to_traffic:g}",
            "srm_p": "" if action.srm_p is None else f"{action.srm_p:.4g}"}
    for metric, e in action.evidence.items():
        for field in ("always_valid_p", "lift", "lift_cs_low", "lift_cs_high", "diff", "cs_low", "cs_high"):
            value = getattr(e, field)
            tags[f"metric.{metric}.{field}"] = "" if value is None else f"{value:.6g}"
    history = {"kind": action.kind, "phase": action.phase, "reason": action.reason, "role": role,
               "traffic": action.to_traffic, "srm_p": action.srm_p,
               "statistics": {m: {"always_valid_p": e.always_valid_p, "lift": e.lift, "lift_cs": [
                   e.lift_cs_low, e.lift_cs_high], "cs": [e.cs_low, e.cs_high]} for m, e in action.statistics.items()}}
    out = {f"{TAG_PREFIX}{k}": v for k, v in tags.items()}
    out[f"{TAG_PREFIX}log.{int(time.time() * 1000)}.{action.experiment}"] = json.dumps(history, default=str)
    return out


def apply_action(action: RolloutAction, *, store: ExperimentStore, registry: Registry | Callable[[], Registry],
                 actor: str = "rollout") -> AppliedRollout:
    """Carry ``action`` out (see the module docstring); ``hold`` does nothing and writes nothing.

    The action must still describe the stored experiment (running, same phase, same traffic): an action
    computed before someone else changed the experiment is refused (RolloutError), not applied to a state it
    was not computed on. The store is changed first, so a rollback stops the treatment before any call to the
    registry (which may be slow or down); ``registry`` may be a function that connects to it, called only after
    the store has changed, so a registry that cannot be reached never delays a stop."""
    done = AppliedRollout(action=action)
    if action.kind == "hold":
        return done
    experiment = store.snapshot().get(action.experiment)
    if (experiment.status != "running" or experiment.phase != action.phase
            or abs(experiment.traffic_at() - action.from_traffic) > _STEP_TOLERANCE):
        raise RolloutError(f"stale rollout action for {action.experiment!r}: computed at traffic "
                           f"{action.from_traffic:g} in phase {action.phase}, the store now has {experiment.status} "
                           f"at traffic {experiment.traffic_at():g} in phase {experiment.phase}; recompute it")
    policy = experiment.rollout
    assert policy is not None  # an action is only ever computed for an experiment with a policy
    treatment = _version_of(experiment.variant(policy.treatment).target)
    assert treatment is not None  # Experiment validates that the treatment is pinned to a version
    alias = experiment.rollout_alias
    assert alias is not None
    note = action.audit_note()

    if action.kind == "advance":
        store.ramp(action.experiment, traffic=action.to_traffic, actor=actor, note=note)
        done.effects.append(f"traffic {action.from_traffic:g} -> {action.to_traffic:g}")
    elif action.kind in ("rollback", "decide_control"):
        store.set_status(action.experiment, "stopped", actor=actor, note=note)
        done.effects.append("experiment stopped")
    # connected to only now, after the store changed: a registry that is down never delays a stop or a ramp
    registry = registry() if callable(registry) else registry
    if action.kind == "rollback":
        _restore_alias(action, done, store, registry, alias, treatment, actor)
    elif action.kind == "decide_treatment":
        _decide_treatment(action, done, store, registry, alias, treatment, actor, policy)
        if done.awaiting and done.effects[-1].startswith("still awaiting"):
            return done  # nothing changed since the last tick: no new tags either

    versions = {treatment: "treatment"}
    control = experiment.variant(policy.control).target
    if ":" in control:
        try:
            versions.setdefault(registry.resolve(control), "control")
        except (LookupError, ValueError):
            pass  # the control names nothing resolvable any more: the treatment's tags still carry the evidence
    for restored in done.restored_aliases.values():
        versions.setdefault(restored, "restored")
    for version, role in versions.items():
        registry.set_tags(version, _tags(action, role))
        done.tagged_versions.append(version)
    done.effects.append(f"tagged versions {sorted(versions)}")
    return done


def _restore_alias(action: RolloutAction, done: AppliedRollout, store: ExperimentStore, registry: Registry,
                   alias: str, treatment: int, actor: str) -> None:
    """Every alias that points at the treatment's version now (the rolled-out ``alias`` if it was already
    promoted, ``challenger`` where the pipeline registered the version) goes back to the version it replaced,
    as the registry's audit log records it; an alias with no earlier version stays, and the audit says so."""
    log = registry.audit_log()
    for name in sorted(set(registry.aliases_of(treatment)) | ({alias} if registry.alias_version(alias) == treatment
                                                                else set())):
        moves = [e for e in log if e["alias"] == name and e["to"] == treatment]
        previous = moves[-1].get("from") if moves else None
        if previous is None or int(previous) == treatment:
            store.record(action.experiment, actor=actor, action="rollout-alias", change={
                "alias": name, "version": treatment, "restored": None,
                "reason": "the alias has no earlier version in the registry's audit log to go back to"})
            done.effects.append(f"alias {name} stays on v{treatment}: no earlier version recorded")
            continue
        registry.set_alias(name, int(previous), reason=f"rollout {action.experiment}: {action.reason}", actor=actor,
                           action="rollback")
        store.record(action.experiment, actor=actor, action="rollout-alias", change={
            "alias": name, "from": treatment, "to": int(previous), "reason": action.reason})
        if name == alias or done.alias_restored_to is None:
            done.alias_restored_to = int(previous)
        done.restored_aliases[name] = int(previous)
        done.effects.append(f"alias {name}: v{treatment} -> v{previous}")


def _decide_treatment(action: RolloutAction, done: AppliedRollout, store: ExperimentStore, registry: Registry,
                      alias: str, treatment: int, actor: str, policy: RolloutPolicy) -> None:
    """Through the promotion gate: ``promote`` moves the champion alias, ``approval`` marks the version."""
    from models.lifecycle.promotion import GateNotPassed, conclude

    if registry.alias_version(alias) == treatment:
        # promoted already (a person approved it): control and treatment now serve one model, the test is over
        store.set_status(action.experiment, "stopped", actor=actor, note=_note_with(action, promoted="already"))
        done.promoted = True
        done.effects.append(f"v{treatment} already holds {alias}: experiment stopped")
        return
    if alias != registry.names.champion_alias:
        raise RolloutError(f"the promotion path moves the champion alias {registry.names.champion_alias!r}; "
                           f"this rollout targets {alias!r}: move it by hand (`encore models`)")
    try:
        result = conclude(registry, treatment, "auto" if policy.on_decision == "promote" else "manual")
    except GateNotPassed as exc:
        _await(action, done, store, registry, treatment, actor, "gate", str(exc))
        return
    if result["promoted"]:
        store.set_status(action.experiment, "stopped", actor=actor, note=_note_with(action, promoted=treatment))
        done.promoted = True
        done.effects.append(f"v{treatment} promoted to {alias}; experiment stopped")
    else:  # manual: conclude tagged the version as awaiting approval
        _await(action, done, store, registry, treatment, actor, "approval", result["reason"])


def _await(action: RolloutAction, done: AppliedRollout, store: ExperimentStore, registry: Registry,
           treatment: int, actor: str, what: str, why: str) -> None:
    """A decided treatment that waits (for a person, or for a passing gate): audited once per state, not at
    every tick; the experiment keeps running at the last step, its guardrails still watched."""
    done.awaiting = what
    key = f"{TAG_PREFIX}awaiting"
    if registry.tags(treatment).get(key) == what:
        done.effects.append(f"still awaiting {what}")
        return
    registry.set_tags(treatment, {key: what})
    store.record(action.experiment, actor=actor, action=f"rollout-awaiting-{what}",
                 change=_note_with(action, awaiting=what, why=why))
    done.effects.append(f"awaiting {what}: {why}")


def _note_with(action: RolloutAction, **extra: object) -> dict[str, Any]:
    """The action's audit note with what applying it found (promoted, awaiting ...)."""
    note = action.audit_note()
    note["rollout"] |= extra
    return note
