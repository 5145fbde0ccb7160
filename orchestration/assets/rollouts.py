"""The rollouts group: guarded rollouts (experiments with a ``rollout:`` policy) ticked by Dagster, one
partition per experiment (``DynamicPartitionsDefinition("rollouts")``, filled by ``rollout_sensor``).

    exposures_topic ────────┐
    ingested_interactions ──┼─ rollout_guard  [blocking checks: srm, guardrails]  (applies a rollback itself)
    experiment_store ───────┘    └─ rollout_step  (advance; decide: promotion through the gate, alias move)

``rollout_guard`` reads the experiment's evidence (``experiments.readout.observe_rollout``) and, when the
action is a rollback (SRM, or a guardrail or the primary shown harmed by its sequential test), applies it at once:
the guard's own response waits on nothing downstream. Its two checks are blocking, so a failed one stops the
run before ``rollout_step``: SRM and harmed guardrails block every advance and promotion. ``rollout_step``
applies the guard's action through ``experiments.rollout.apply_action``, which refuses an action computed on
a state that changed since (``RolloutError``; the next tick decides again). Both act as ``actor="dagster"``
in the store's audit log and on the model versions' ``encore.rollout.*`` tags.
"""

import base64
import math
from typing import TYPE_CHECKING

import dagster as dg

from orchestration.assets.experiments import exposures_topic
from orchestration.assets.ingest import ingested_interactions
from orchestration.resources import EncoreResource, KafkaResource, MLflowResource

if TYPE_CHECKING:
    from experiments.report import ABReport
    from experiments.rollout import RolloutAction

ROLLOUTS = "rollouts"
ACTOR = "dagster"

rollout_partitions = dg.DynamicPartitionsDefinition(name="rollouts")


experiment_store = dg.AssetSpec(
    "experiment_store",
    description="the experiment store (state.json, versions/, audit.jsonl under the data dir's experiments/): "
                "A/B configs, rollout policies and their audit log; written by `encore ab`, the admin API and "
                "the rollout assets",
    kinds={"json"},
    group_name=ROLLOUTS,
)


@dg.asset(
    partitions_def=rollout_partitions,
    deps=[exposures_topic, ingested_interactions, experiment_store],
    kinds={"scipy"},
    group_name=ROLLOUTS,
    check_specs=[
        dg.AssetCheckSpec("srm", asset="rollout_guard", blocking=True,
                          description="no sample ratio mismatch between the arms (else no comparison holds)"),
        dg.AssetCheckSpec("guardrails", asset="rollout_guard", blocking=True,
                          description="no guardrail's (nor the primary metric's) always-valid sequential test "
                                      "decides treatment_worse"),
    ],
)
def rollout_guard(context: dg.AssetExecutionContext, encore: EncoreResource, kafka: KafkaResource,
                  mlflow_server: MLflowResource):
    """The experiment's next rollout action from its current evidence; a rollback (SRM or a harmed guardrail)
    is applied here and now: the experiment stops and every alias on the treatment's version moves back."""
    # Returns a MaterializeResult with a dict value; no return annotation, since with check_specs Dagster
    # would read one annotation as the type of every output, the checks' included.
    from experiments.readout import observe_rollout
    from experiments.rollout import RolloutError, apply_action
    from experiments.report import sequential_png
    from experiments.store import ExperimentStore
    from models.lifecycle.registry import Registry

    settings = encore.settings()
    name = context.partition_key
    store = ExperimentStore(settings.experiments_dir)
    experiment, report, action = observe_rollout(settings, kafka.resolve(settings), name, store=store)
    context.log.info(f"{name}: {action.kind} ({action.reason})")
    applied = None
    meta: dict = {}
    if action.kind == "rollback":
        try:
            # the registry is connected to only after the store stopped the treatment: MLflow being down
            # never delays the stop
            done = apply_action(action, store=store, registry=lambda: Registry(mlflow_server.resolve(settings),
                                                                                settings.registry), actor=ACTOR)
        except RolloutError as exc:  # the store changed since the observation: the next tick sees the new state
            context.log.warning(str(exc))
            meta["rollback_refused"] = dg.MetadataValue.text(str(exc))
        else:
            applied = done.model_dump(mode="json", exclude={"action"})
            meta["applied"] = dg.MetadataValue.md("\n".join(f"- {e}" for e in done.effects))
    meta.update(_action_metadata(action))
    if report is not None:
        png = base64.b64encode(sequential_png(report, metrics=list(action.evidence) or None)).decode("ascii")
        meta["sequential_boundary"] = dg.MetadataValue.md(
            f"![sequential boundary over time](data:image/png;base64,{png})")
    policy = experiment.rollout
    assert policy is not None  # observe_rollout refuses an experiment without one
    return dg.MaterializeResult(
        metadata=meta,
        check_results=[_srm_check(report), _guardrails_check(action, policy.guardrails)],
        value={"action": action.model_dump(mode="json"), "applied": applied},
    )


@dg.asset(partitions_def=rollout_partitions, kinds={"mlflow"}, group_name=ROLLOUTS)
def rollout_step(context: dg.AssetExecutionContext, encore: EncoreResource, mlflow_server: MLflowResource,
                 rollout_guard: dict) -> dg.MaterializeResult[dict]:
    """Runs only when the guard's blocking checks passed. Applies the guard's action: advance the traffic to
    the next step, decide for the treatment (the promotion gate moves the alias, or the version awaits approval
    or a passing gate) or for the control (stop); a hold changes nothing. The action is the guard's, not a
    second reading of the evidence: ``apply_action`` refuses it if the experiment changed in between (the run
    then fails, and the next tick decides on the new state)."""
    from experiments.rollout import RolloutAction, RolloutError, apply_action
    from experiments.store import ExperimentStore
    from models.lifecycle.registry import Registry

    settings = encore.settings()
    name = context.partition_key
    store = ExperimentStore(settings.experiments_dir)
    experiment = store.snapshot().get(name)
    action = RolloutAction.model_validate(rollout_guard["action"])
    meta = _action_metadata(action)
    applied = None
    if action.kind != "hold":
        registry = Registry(mlflow_server.resolve(settings), settings.registry)
        try:
            done = apply_action(action, store=store, registry=registry, actor=ACTOR)
        except RolloutError as exc:
            raise dg.Failure(str(exc)) from exc
        applied = done.model_dump(mode="json", exclude={"action"})
        context.log.info(f"{name}: " + "; ".join(done.effects))
        alias = experiment.rollout_alias
        version = registry.alias_version(alias) if alias else None
        meta.update({
            "effects": dg.MetadataValue.md("\n".join(f"- {e}" for e in done.effects) or "(none)"),
            "promoted": done.promoted,
            "awaiting": done.awaiting or "",
            "alias": alias or "",
            "alias_version": version if version is not None else -1,  # -1: the alias holds no version
        })
    after = store.snapshot().get(name)
    meta.update({"status_after": after.status, "traffic_after": after.traffic_at()})
    return dg.MaterializeResult(metadata=meta, value={"action": action.model_dump(mode="json"), "applied": applied})


# ----------------------------------------------------------------------------------------------- helpers


def _srm_check(report: "ABReport | None") -> dg.AssetCheckResult:
    if report is None:
        return dg.AssetCheckResult(check_name="srm", passed=True,
                                   description="no report yet (not running, or no exposure): nothing to compare")
    srm = report.srm
    counts = ", ".join(f"{k}={v}" for k, v in srm.observed.items())
    return dg.AssetCheckResult(
        check_name="srm", passed=not srm.flagged,
        description=(f"sample ratio mismatch: p = {srm.p_value:.3g} < {srm.threshold:g} (users {counts})"
                     if srm.flagged else f"arms split as configured: p = {srm.p_value:.3g} (users {counts})"),
        metadata={"p_value": _num(srm.p_value), "threshold": srm.threshold,
                  "observed": dg.MetadataValue.json(dict(srm.observed))},
    )


def _guardrails_check(action: "RolloutAction", guardrails: list[str]) -> dg.AssetCheckResult:
    """Fails when a guardrail, or the primary metric (which the rule guards as well), is shown harmed."""
    watched = {m: action.evidence[m] for m in dict.fromkeys(guardrails + list(action.statistics))
               if m in action.evidence}
    # the rule's own verdict (experiments.rollout: treatment_worse at the rollout's share of α), not a re-reading
    harmed = list(action.statistics) if action.kind == "rollback" else []
    untested = [m for m in guardrails if m not in watched or watched[m].decision is None]
    if harmed:
        description = "harmed (sequential test decides treatment_worse at the rollout's α share): " + ", ".join(harmed)
    elif watched:
        description = "no guardrail harmed" + (f"; not tested yet: {', '.join(untested)}" if untested else "")
    else:
        description = "no guardrail tested yet"
    return dg.AssetCheckResult(
        check_name="guardrails", passed=not harmed, description=description,
        metadata={
            "harmed": dg.MetadataValue.json(harmed),
            "evidence": dg.MetadataValue.md(_evidence_table(watched.values())),
            **{m: dg.MetadataValue.json({"lift": e.lift, "lift_cs": [e.lift_cs_low, e.lift_cs_high],
                                         "diff": e.diff, "cs": [e.cs_low, e.cs_high],
                                         "always_valid_p": e.always_valid_p, "decision": e.decision})
               for m, e in watched.items()},
        },
    )


def _action_metadata(action: "RolloutAction") -> dict:
    meta = {
        "action": action.kind,
        "reason": dg.MetadataValue.text(action.reason),
        "evidence": dg.MetadataValue.md(_evidence_table(action.evidence.values())),
        "users": action.users,
        "users_in_step": action.users_in_step,
        "step": f"{action.step}/{action.steps}",
        "traffic": action.from_traffic,
        "to_traffic": action.to_traffic,
        "phase": action.phase,
        "action_json": dg.MetadataValue.json(action.model_dump(mode="json")),
    }
    if action.srm_p is not None:
        meta["srm_p"] = _num(action.srm_p)
    return meta


def _evidence_table(evidence) -> str:  # noqa: ANN001 - an iterable of experiments.rollout.MetricEvidence
    rows = ["| metric | lift | lift CS | diff CS | always-valid p | decision |", "|---|---|---|---|---|---|"]
    for e in evidence:
        rows.append(f"| {e.metric} | {_pct(e.lift)} | [{_pct(e.lift_cs_low)}, {_pct(e.lift_cs_high)}] | "
                    f"[{_g(e.cs_low)}, {_g(e.cs_high)}] | {_g(e.always_valid_p)} | {e.decision or 'no test'} |")
    return "\n".join(rows) if len(rows) > 2 else "(no metric tested yet)"


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:+.2%}"


def _g(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _num(x: float) -> float:
    """A float Dagster metadata accepts as a number (NaN and infinities become -1)."""
    return float(x) if math.isfinite(x) else -1.0
