"""Build the A/B report of the running experiment from its real sources.

Exposures come from the Kafka ``exposures`` topic (the service writes one per response); interactions come
from the offline store (the system of record, where the users' reactions arrived through Kafka and ingest).
Pre-experiment behaviour (organic events before the first exposure) feeds CUPED.

**Phases.** A change of an experiment's variants opens a new phase (``experiments.store``): some units changed
arm, so exposures from different phases are not one experiment. The readout analyses one phase, the current
one by default. Each exposure names the config version that assigned it (``assignments[].version``); the
store's history maps versions to phases, so exposures logged before phases existed are placed too.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

import pandas as pd

from features.kafka_io import read_topic
from features.offline_read import read_interactions
from infra.settings import EncoreSettings
from experiments.metrics import DEFAULT_GUARDRAILS
from experiments.report import ABReport, ab_report, render_html, sequential_png
from experiments.assignment import Experiment, default_experiment

if TYPE_CHECKING:
    from experiments.rollout import RolloutAction
    from experiments.store import ExperimentStore

log = logging.getLogger("encore.report")


def read_exposures(bootstrap: str, topic: str, **options: object) -> pd.DataFrame:
    rows = []
    for m in read_topic(bootstrap, topic, **options):
        try:
            rows.append(json.loads(m.value))
        except (TypeError, ValueError):
            log.warning("skipping unreadable exposure at offset %d", m.offset)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # one exposure per request even if a producer retry duplicated it
    return df.drop_duplicates("request_id").reset_index(drop=True)


def _assignment_of(assignments: list | tuple, name: str) -> dict | None:
    """Experiment ``name``'s entry in an exposure's ``assignments`` (one per experiment), or None."""
    return next((a for a in assignments if isinstance(a, dict) and a.get("experiment") == name), None)


def exposures_of(exposures: pd.DataFrame, name: str) -> pd.DataFrame:
    """The exposures in which experiment ``name`` assigned the user, with ``variant`` its arm there.

    An exposure lists every experiment that assigned its user (``assignments``, one per layer); the top-level
    ``experiment``/``variant`` name only the first, which chooses the model. Reading the top level alone would
    drop every exposure where another layer's experiment came first. Exposures logged before ``assignments``
    existed are read from the top level."""
    def arm(row: pd.Series) -> str | None:
        assignments = row.get("assignments")
        if isinstance(assignments, (list, tuple)):
            mine = _assignment_of(assignments, name)
            return mine.get("variant") if mine else None
        return row.get("variant") if row.get("experiment", name) == name else None

    if exposures.empty:
        return exposures
    variants = exposures.apply(arm, axis=1)
    out = exposures[variants.notna()].copy()
    out["variant"], out["experiment"] = variants[variants.notna()], name
    return out.reset_index(drop=True)


def exposure_versions(exposures: pd.DataFrame, name: str) -> pd.Series:
    """The config version of experiment ``name`` that assigned each exposure (NaN where the row does not say)."""
    def version(assignments: object) -> float:
        mine = _assignment_of(assignments, name) if isinstance(assignments, (list, tuple)) else None
        return float(mine["version"]) if mine and mine.get("version") is not None else float("nan")

    if "assignments" not in exposures.columns:
        return pd.Series(float("nan"), index=exposures.index)
    return exposures["assignments"].map(version)


def select_phase(exposures: pd.DataFrame, name: str, phase_of_version: dict[int, int], phase: int) -> pd.DataFrame:
    """The exposures of experiment ``name`` made in ``phase`` (``phase_of_version``: the store's version -> phase).

    An exposure whose version is unknown (logged without one) can only be placed when the experiment never had
    another phase; otherwise it is left out rather than mixed into the wrong phase."""
    if set(phase_of_version.values()) <= {phase} and phase == 1:
        return exposures  # one phase only: every exposure belongs to it, with or without a version
    phases = exposure_versions(exposures, name).map(
        lambda v: phase_of_version.get(int(v)) if v == v else None)  # v == v: not NaN
    unplaced = int(phases.isna().sum())
    if unplaced:
        log.warning("%d exposures of %s name no known config version; left out of the phase %d readout",
                    unplaced, name, phase)
    return exposures[phases == phase]


def read_report(settings: EncoreSettings, bootstrap: str, name: str | None = None,
                phase: int | None = None) -> tuple[Experiment, ABReport, int]:
    """``(experiment, report, exposures analysed)`` of experiment ``name`` (the settings' experiment by
    default), on its current phase unless ``phase`` names another. The report watches the experiment's
    rollout guardrails when it has a rollout policy, else the default guardrails."""
    exp, history = _experiment(settings, name)
    phase = exp.phase if phase is None else phase
    analysed = _phase_config(exp, history, phase)
    exposures = read_exposures(bootstrap, settings.topics.exposures, **settings.kafka.client_options())
    exposures = exposures_of(exposures, exp.name)  # other experiments (other layers) share the topic
    if exposures.empty:
        raise RuntimeError("no exposures with an experiment variant yet: serve recommendations first")
    # The pre-period ends at the experiment's first exposure in any phase: behaviour in an earlier phase was
    # shaped by that phase's arms, and a covariate that depends on the arm would bias CUPED.
    start_ms = int(exposures["timestamp_ms"].min())
    phase_of_version = {h["version"]: int(h["config"].get("phase", 1)) for h in history}
    exposures = select_phase(exposures, exp.name, phase_of_version, phase)
    if exposures.empty:
        raise RuntimeError(f"no exposures of phase {phase} of {exp.name!r} yet: serve recommendations first")
    interactions = read_interactions(settings)
    pre = interactions[(interactions["timestamp_ms"] < start_ms) & (interactions["source"] == "organic")]
    control = exp.rollout.control if exp.rollout is not None else "control"
    guardrails = exp.rollout.guardrails if exp.rollout is not None else DEFAULT_GUARDRAILS
    report = ab_report(
        exposures, interactions, control=control, window_s=settings.experiment.attribution_window_s,
        # the exact share of units each arm gets, which the SRM check should expect (see assignment's docstring)
        weights=analysed.realised_weights, pre_period=pre if not pre.empty else None,
        name=exp.name if phase == 1 else f"{exp.name} (phase {phase})", plan=exp.plan, guardrails=guardrails,
    )
    return exp, report, int(len(exposures))


def observe_rollout(settings: EncoreSettings, bootstrap: str | Callable[[], str], name: str, *, now: datetime | None = None,
                    store: ExperimentStore | None = None) -> tuple[Experiment, ABReport | None, RolloutAction]:
    """``(experiment, report, next action)`` of experiment ``name``'s rollout, from its real sources: the
    current phase's report (None while the experiment is not running or has no exposure yet), the step's
    progress from the store's audit log, and ``experiments.rollout.next_action`` on both. Reads only: the
    CLI (``encore ab rollout``), the Dagster sensor and assets, and the closed-loop simulation all decide
    through this one function, then act through ``experiments.rollout.apply_action``."""
    from experiments.rollout import next_action, step_progress
    from experiments.store import ExperimentStore

    store = store or ExperimentStore(settings.experiments_dir)
    experiment = store.snapshot().get(name)
    if experiment.rollout is None:
        raise ValueError(f"{name!r} has no rollout policy: add a `rollout:` block and save it with "
                         "`encore ab create FILE --replace`")
    report = None
    if experiment.status == "running" and experiment.traffic_at() > 0:
        try:
            _, report, _ = read_report(settings, bootstrap() if callable(bootstrap) else bootstrap, name)
        except (RuntimeError, ValueError) as exc:
            # no exposure yet, or an arm without users (a small first step): no evidence yet, the rule holds
            if "no exposures" not in str(exc) and "no exposed users" not in str(exc):
                raise
    policy = experiment.rollout
    users = sum(report.srm.observed.get(v, 0) for v in (policy.treatment, policy.control)) if report else 0
    users_in_step, started = step_progress(store, experiment, users)
    action = next_action(experiment, report, now=now or datetime.now(timezone.utc), users_in_step=users_in_step,
                         step_started_at=started)
    return experiment, report, action


def build_ab_report(settings: EncoreSettings, bootstrap: str, tracking_uri: str | None = None,
                    phase: int | None = None) -> dict:
    """The report of the settings' experiment, on its current phase unless ``phase`` names another."""
    exp, report, n_exposures = read_report(settings, bootstrap, phase=phase)
    phase = exp.phase if phase is None else phase
    settings.reports_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    html_path = render_html(report, settings.reports_dir / f"ab-{exp.name}-{stamp}.html")
    markdown = report.to_markdown()
    boundary_png = html_path.with_suffix(".sequential.png")
    boundary_png.write_bytes(sequential_png(report))
    headline = _headline(report)
    if tracking_uri:
        _log_to_mlflow(tracking_uri, settings, html_path, report)
    lifts = {t.metric: {"diff": t.result.diff, "lift": t.result.rel_lift, "p_adjusted": t.p_adjusted,
                        "significant": t.significant, "variance_reduction": t.variance_reduction,
                        "always_valid_p": t.always_valid_p,
                        "decision": t.sequential.decision if t.sequential else None}
             for t in report.tests}
    return {"html": str(html_path), "markdown": markdown, "sequential_png": str(boundary_png), "headline": headline, "tests": lifts,
            "phase": phase,
            "exposures": n_exposures, "srm_flagged": bool(report.srm.flagged),
            "guardrail_breaches": [t.metric for t in report.guardrail_breaches]}


def _experiment(settings: EncoreSettings, name: str | None = None) -> tuple[Experiment, list[dict]]:
    """The analysed experiment as the store holds it, with its saved versions; else, for the settings'
    experiment, the default, unversioned (another name must be in the store)."""
    from experiments.store import ExperimentStore, NotFound

    store = ExperimentStore(settings.experiments_dir)
    wanted = name or settings.experiment.name
    try:
        return store.snapshot().get(wanted), store.history(wanted)
    except NotFound:
        if wanted != settings.experiment.name:
            raise
        return default_experiment(settings), []


def _phase_config(current: Experiment, history: list[dict], phase: int) -> Experiment:
    """The config in force during ``phase`` (its variants do not change within a phase: the last saved one)."""
    if phase == current.phase:
        return current
    configs = [h["config"] for h in history if int(h["config"].get("phase", 1)) == phase]
    if not configs:
        raise ValueError(f"{current.name!r} has no phase {phase} (phases 1..{current.phase})")
    return Experiment.model_validate(configs[-1])


def _headline(report) -> str:  # noqa: ANN001 - experiments.report.ABReport
    parts = []
    for metric in ("hit_rate", "listening_time", "like_rate"):
        try:
            t = report.test(metric)
        except KeyError:
            continue
        lift = "n/a" if t.result.rel_lift is None else f"{t.result.rel_lift:+.1%}"
        sig = "significant" if t.significant else "not significant"
        parts.append(f"{metric} {lift} ({sig}, adjusted p={t.p_adjusted:.3g})")
    srm = "SRM FLAGGED" if report.srm.flagged else "no SRM"
    return "; ".join(parts) + f"; {srm}"


def _log_to_mlflow(tracking_uri: str, settings: EncoreSettings, html_path, report) -> None:  # noqa: ANN001
    from models.lifecycle.tracking import AB, experiment_name, log_ab_report

    metrics = {}
    for t in report.tests:
        key = f"{t.metric}.{t.treatment}"
        if t.result.rel_lift is not None:
            metrics[f"lift.{key}"] = float(t.result.rel_lift)
        metrics[f"p_adj.{key}"] = float(t.p_adjusted)
    log_ab_report(tracking_uri, experiment_name(settings.mlflow_experiment, AB), run_name=report.name,
                  html=html_path, report=json.loads(report.model_dump_json()), metrics=metrics,
                  artifact_root=settings.mlflow_dir / "artifacts")
