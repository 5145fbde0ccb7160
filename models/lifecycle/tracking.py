"""MLflow tracking: where the server is, which experiment a pipeline logs to, and the runs themselves.

- :func:`tracking_uri` is the one rule for finding MLflow (explicit, configured, running, the sqlite file);
- :func:`experiment_name`: one experiment per pipeline, ``<mlflow_experiment>-training``, ``-scaling``, ``-ab``;
- :func:`training_run` / :func:`log_epoch`: the run open while a model trains (the registry finishes it);
- :func:`log_study_point` / :func:`log_study_result`: a study's points, one run each, and its fits (the scaling
  study), tagged with the study's name;
- :func:`log_ab_report`: one run per A/B report, with the HTML, the JSON and the lifts.

Metric names with ``@`` are logged with ``_at_`` (``hr@10`` -> ``hr_at_10``): MLflow allows no ``@``.
"""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow
from mlflow import MlflowClient

if TYPE_CHECKING:
    from infra.settings import EncoreSettings

TRAINING, SCALING, AB = "training", "scaling", "ab"  # the pipelines, one MLflow experiment each


def tracking_uri(settings: EncoreSettings, explicit: str | None = None, *, file_fallback: bool = True) -> str:
    """The MLflow tracking URI: ``explicit`` (a ``--tracking-uri`` option, a Dagster resource's config), else
    ``ENCORE_MLFLOW_TRACKING_URI``, else the embedded server now running for the data dir, else (with
    ``file_fallback``) the embedded server's sqlite database, read directly.

    The file is enough for the registry's aliases and tags, which is all the commands that fall back to it
    touch. Writers of runs and models pass ``file_fallback=False``: the experiments of a stopped embedded server
    keep their artifacts behind ``mlflow-artifacts:`` URIs that only the server resolves.
    Raises RuntimeError naming what to configure or start when none of them exists."""
    from infra.services import resolve_mlflow

    if explicit:
        return explicit
    try:
        return resolve_mlflow(settings)
    except RuntimeError:
        if not file_fallback:
            raise
    db = settings.mlflow_dir / "mlflow.db"
    if db.is_file():
        return f"sqlite:///{db}"
    raise RuntimeError(f"no MLflow registry for data dir {settings.root}: set ENCORE_MLFLOW_TRACKING_URI, start "
                       "the embedded services (`encore services up`) or train a model first (`encore run`)")


def experiment_name(base: str, pipeline: str) -> str:
    """One MLflow experiment per pipeline: ``encore-training``, ``encore-scaling``, ``encore-ab``."""
    return f"{base}-{pipeline}"


def use_experiment(tracking_uri: str, experiment: str, artifact_root: Path | None = None) -> str:
    """Select (creating if needed) an experiment. With a direct database URI (no tracking server) new
    experiments keep their artifacts under ``artifact_root`` rather than the current directory."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if artifact_root is not None and not tracking_uri.startswith(("http://", "https://", "databricks")):
            location = Path(artifact_root).resolve().as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextmanager
def training_run(tracking_uri: str, experiment: str, *, run_name: str, params: dict[str, Any],
                 tags: dict[str, str], system_metrics: bool = True, artifact_root: Path | None = None,
                 recipe: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run open while a model trains: parameters now, per-epoch metrics via :func:`log_epoch`,
    system metrics (CPU, memory, GPU when present) sampled every second in the background. ``recipe``: the
    resolved recipe (``TrainConfig.to_yaml``), kept as the run's ``recipe.yaml`` so that the run can be trained
    again from its own page (``encore train --config recipe.yaml``)."""
    use_experiment(tracking_uri, experiment, artifact_root)
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    with mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics) as run:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.set_tags({**tags, "git_revision": git_revision()})
        if recipe is not None:
            mlflow.log_text(recipe, "recipe.yaml")
        yield run


def log_epoch(row: dict[str, Any], step: int) -> None:
    """One epoch's numbers on the active run (``epoch`` itself is the step)."""
    mlflow.log_metrics(numeric_metrics({k: v for k, v in row.items() if k != "epoch"}), step=step)


STUDY_TAG = "encore.study"  # the study a scaling run belongs to
POINT_TAG = "encore.study.point"  # a point's key (models.scaling.PointSpec.key); absent on the fits' run


def log_study_point(tracking_uri: str, experiment: str, *, study: str, key: str, params: dict[str, Any],
                    metrics: dict[str, Any], artifact_root: Path | None = None) -> str:
    """One point of a study as its own run (points are trained one Dagster partition at a time, possibly on
    different days): named by its key, tagged with the study. Returns the run id."""
    return _log_study_run(tracking_uri, experiment, run_name=key, tags={STUDY_TAG: study, POINT_TAG: key},
                          params=params, metrics=metrics, artifact_root=artifact_root)


def log_study_result(tracking_uri: str, experiment: str, *, study: str, params: dict[str, Any],
                     metrics: dict[str, Any], folder: Path, artifact_path: str,
                     artifact_root: Path | None = None) -> str:
    """A study's fits: their numbers, and the folder of tables and plots as artefacts. Returns the run id."""
    return _log_study_run(tracking_uri, experiment, run_name=f"{study}-fits", tags={STUDY_TAG: study},
                          params=params, metrics=metrics, artifacts=(folder, artifact_path),
                          artifact_root=artifact_root)


def _log_study_run(tracking_uri: str, experiment: str, *, run_name: str, tags: dict[str, str],
                   params: dict[str, Any], metrics: dict[str, Any], artifacts: tuple[Path, str] | None = None,
                   artifact_root: Path | None = None) -> str:
    use_experiment(tracking_uri, experiment, artifact_root)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.log_metrics(numeric_metrics(metrics))
        if artifacts is not None:
            mlflow.log_artifacts(str(artifacts[0]), artifacts[1])
        mlflow.set_tag("git_revision", git_revision())
        return run.info.run_id


def log_ab_report(tracking_uri: str, experiment: str, *, run_name: str, html: Path, report: dict,
                  metrics: dict[str, float], artifact_root: Path | None = None) -> str:
    """One run per A/B report: the HTML page, the report as JSON, and its numbers. Returns the run id."""
    use_experiment(tracking_uri, experiment, artifact_root)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_artifact(str(html), "report")
        mlflow.log_dict(report, "report/report.json")
        mlflow.log_metrics(numeric_metrics(metrics))
        return run.info.run_id


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mlflow_name(metric: str) -> str:
    """MLflow names allow no '@': ``hr@10`` is logged as ``hr_at_10``."""
    return metric.replace("@", "_at_")


def numeric_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (no bools, no NaN), under MLflow-safe names."""
    return {mlflow_name(k): float(v) for k, v in values.items() if _is_number(v)}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _param(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
