"""Build the A/B report of the running experiment from its real sources.

Exposures come from the Kafka ``exposures`` topic (the service writes one per response); interactions come
from the offline store (the system of record, where the users' reactions arrived through Kafka and ingest).
Pre-experiment behaviour (organic events before the first exposure) feeds CUPED.
"""

from __future__ import annotations

import json
import logging
import time

import pandas as pd

from features.kafka_io import read_topic
from features.offline_store import read_interactions
from infra.settings import EncoreSettings
from experiments.report import ab_report, render_html, sequential_png
from experiments.assignment import default_experiment

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


def build_ab_report(settings: EncoreSettings, bootstrap: str, tracking_uri: str | None = None) -> dict:
    exp = _experiment(settings)
    exposures = read_exposures(bootstrap, settings.topics.exposures, **settings.kafka.client_options())
    if not exposures.empty:
        exposures = exposures[exposures["variant"].notna()]
        if "experiment" in exposures.columns:  # other experiments (other layers) share the topic
            exposures = exposures[exposures["experiment"] == exp.name]
    if exposures.empty:
        raise RuntimeError("no exposures with an experiment variant yet: serve recommendations first")
    interactions = read_interactions(settings.offline_dir)
    start_ms = int(exposures["timestamp_ms"].min())
    pre = interactions[(interactions["timestamp_ms"] < start_ms) & (interactions["source"] == "organic")]
    report = ab_report(
        exposures, interactions, control="control", window_s=settings.experiment.attribution_window_s,
        weights=exp.weights, pre_period=pre if not pre.empty else None, name=exp.name, plan=exp.plan,
    )
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
            "exposures": int(len(exposures)), "srm_flagged": bool(report.srm.flagged),
            "guardrail_breaches": [t.metric for t in report.guardrail_breaches]}


def _experiment(settings: EncoreSettings):  # noqa: ANN202 - experiments.assignment.Experiment
    """The analysed experiment as the store holds it (weights may have been changed), else the default."""
    from experiments.store import ExperimentStore, NotFound

    try:
        return ExperimentStore(settings.experiments_dir).snapshot().get(settings.experiment.name)
    except NotFound:
        return default_experiment(settings)


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
