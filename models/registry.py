"""MLflow tracking and the model registry: training runs, pickle-free model versions, aliases, audit trail.

Conventions:
- one MLflow experiment per pipeline (``<mlflow_experiment>-training``, ``-scaling``, ``-ab``);
- one run per training: parameters, per-epoch metrics and system metrics while it trains, then the
  evaluation report, plots, config, item vocabulary and the model (Models From Code, no pickle);
- registered model ``encore-recommender``; every new version gets the alias ``challenger`` and tags naming
  its data (snapshot, Kafka offsets, Feast feature view versions), code (git revision) and metrics;
- ``champion`` is what serving loads. Aliases only, never the deprecated stages. Every alias move is an
  audit entry, stored as a tag on the version *and* on the registered model (``audit.<unix_ms>.<alias>``)
  so ``encore models rollback`` can replay the champion history from the registry alone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from models.recommender import Recommender

log = logging.getLogger("encore.registry")

MODEL_NAME = "encore-recommender"
CHALLENGER = "challenger"
CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
PIP_REQUIREMENTS = ["torch==2.13.0", "torchrec==1.8.0", "fbgemm-gpu-cpu==1.8.0", "mlflow", "pandas", "numpy"]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    run_id: str
    metrics: dict[str, float]


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def experiment_name(base: str, pipeline: str) -> str:
    """One MLflow experiment per pipeline: ``encore-training``, ``encore-scaling``, ``encore-ab``."""
    return f"{base}-{pipeline}"


# ---------------------------------------------------------------------------------------------- tracking


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
                 tags: dict[str, str], system_metrics: bool = True,
                 artifact_root: Path | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run open while a model trains: parameters now, per-epoch metrics via :func:`log_epoch`,
    system metrics (CPU, memory, GPU when present) sampled every second in the background."""
    use_experiment(tracking_uri, experiment, artifact_root)
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    with mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics) as run:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.set_tags({**tags, "git_revision": git_revision()})
        yield run


def log_epoch(row: dict[str, Any], step: int) -> None:
    mlflow.log_metrics({mlflow_name(k): float(v) for k, v in row.items() if _is_number(v) and k != "epoch"},
                       step=step)


def register_run_model(
    recommender: Any,
    *,
    tracking_uri: str,
    run_id: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    input_example: pd.DataFrame,
    artifacts: dict[str, Path] | None = None,
    name: str = MODEL_NAME,
) -> RegisteredVersion:
    """Finish a training run: evaluation metrics and artifacts, the pyfunc model, a new registry version."""
    from mlflow.models import infer_signature

    from models.mlflow_pyfunc import predict_frame

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({mlflow_name(k): float(v) for k, v in metrics.items() if _is_number(v)})
        for artifact_path, path in (artifacts or {}).items():
            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            elif path.exists():
                mlflow.log_artifact(str(path), artifact_path)
        model_dir = Path(tmp) / "recommender"
        recommender.save(model_dir)
        mlflow.log_artifact(str(model_dir / "config.json"), "config")
        mlflow.log_artifact(str(model_dir / "vocab.json"), "vocabulary")
        output_example = predict_frame(recommender, input_example, k=10)
        signature = infer_signature(input_example, output_example, params={"k": 10})
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"recommender": str(model_dir)},
            signature=signature,
            input_example=input_example,
            registered_model_name=name,
            pip_requirements=PIP_REQUIREMENTS,
        )
        version = int(info.registered_model_version)
    all_tags = {**tags, "run_id": run_id, "git_revision": git_revision(),
                **{f"metric.{mlflow_name(k)}": f"{v:.6f}" for k, v in metrics.items() if _is_number(v)}}
    for key, value in all_tags.items():
        client.set_model_version_tag(name, str(version), key, str(value)[:4900])
    set_alias(client, name, CHALLENGER, version, reason=f"registered from run {run_id}", actor="pipeline")
    log.info("registered %s version %d (run %s)", name, version, run_id)
    return RegisteredVersion(name, version, run_id, metrics)


# ---------------------------------------------------------------------------------------------- aliases


def set_alias(client: MlflowClient, name: str, alias: str, version: int, *, reason: str,
              actor: str | None = None, action: str = "set") -> dict:
    """Move ``alias`` to ``version`` and record who, why and from where, on the version and the model."""
    previous = alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, str(version))
    at_ms = int(time.time() * 1000)
    entry = {"alias": alias, "from": previous, "to": int(version), "action": action, "reason": reason,
             "actor": actor or _actor(), "at_ms": at_ms}
    key = f"audit.{at_ms}.{alias}"
    value = json.dumps(entry)[:4900]
    client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_tag(name, key, value)
    log.info("alias %s of %s: %s -> %s (%s)", alias, name, previous, version, reason)
    return entry


def alias_version(client: MlflowClient, name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def audit_log(client: MlflowClient, name: str = MODEL_NAME) -> list[dict]:
    """Every alias move of the registered model, oldest first."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return []
    entries = [json.loads(v) for k, v in tags.items() if k.startswith("audit.")]
    return sorted(entries, key=lambda e: (e["at_ms"], e["alias"]))


def champion_stack(client: MlflowClient, name: str = MODEL_NAME) -> list[int]:
    """Champion history as a stack: promotions push, rollbacks pop; the top is the current champion."""
    stack: list[int] = []
    for e in audit_log(client, name):
        if e["alias"] != CHAMPION:
            continue
        if e.get("action") == "rollback":
            while stack and stack[-1] != e["to"]:
                stack.pop()
            if not stack:
                stack.append(e["to"])
        else:
            stack.append(e["to"])
    return stack


def promote(tracking_uri: str, version: int, *, reason: str, actor: str | None = None,
            name: str = MODEL_NAME) -> dict:
    """Make ``version`` the champion (the gate's auto mode, or a person in manual mode)."""
    client = MlflowClient(tracking_uri)
    client.get_model_version(name, str(version))  # raises when the version does not exist
    current = alias_version(client, name, CHAMPION)
    if current == int(version):
        return {"alias": CHAMPION, "from": current, "to": current, "action": "noop",
                "reason": f"version {version} is already champion"}
    entry = set_alias(client, name, CHAMPION, version, reason=reason, actor=actor, action="promote")
    if "awaiting_approval" in client.get_model_version(name, str(version)).tags:
        client.delete_model_version_tag(name, str(version), "awaiting_approval")
    return entry


def rollback(tracking_uri: str, *, reason: str = "rollback", actor: str | None = None,
             name: str = MODEL_NAME) -> dict:
    """Give ``champion`` back to the version that held it before the current one."""
    client = MlflowClient(tracking_uri)
    stack = champion_stack(client, name)
    current = alias_version(client, name, CHAMPION)
    if current is None or len(stack) < 2:
        raise ValueError("nothing to roll back to: there has been at most one champion")
    target = stack[-2]
    return set_alias(client, name, CHAMPION, target, reason=f"{reason} (from v{current})", actor=actor,
                     action="rollback")


def list_versions(tracking_uri: str, *, metric: str = "ndcg@10", name: str = MODEL_NAME) -> list[dict]:
    """One row per version, newest first: aliases, run, data snapshot, metric, gate outcome."""
    client = MlflowClient(tracking_uri)
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        t = mv.tags
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(by_version.get(str(mv.version), [])),
            "model": t.get("model", ""),
            "metric": _float(t.get(f"metric.{mlflow_name(metric)}")),
            "dataset_snapshot": t.get("dataset_snapshot", ""),
            "gate": t.get("gate.passed", ""),
            "gate_reason": t.get("gate.reason", ""),
            "awaiting_approval": t.get("awaiting_approval", ""),
            "created": pd.Timestamp(mv.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
            "run_id": mv.run_id,
        })
    return sorted(rows, key=lambda r: -r["version"])


def version_metric(client: MlflowClient, name: str, version: int, metric: str) -> float | None:
    return _float(client.get_model_version(name, str(version)).tags.get(f"metric.{mlflow_name(metric)}"))


def download_recommender_dir(tracking_uri: str, dst: Path, *, alias: str | None = "champion", version: int | None = None,
                             name: str = MODEL_NAME) -> tuple[Path, int]:
    """Fetch the ``recommender`` artifact directory of a registered version (by alias or number) under ``dst``.

    ``dst`` is required: the caller owns the copy and its removal (``load_registered_recommender`` uses a
    temporary directory). A default temp dir here would leave every download behind."""
    client = MlflowClient(tracking_uri)
    mv = client.get_model_version(name, str(version)) if version is not None else \
        client.get_model_version_by_alias(name, alias or CHAMPION)
    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst)))
    candidates = [p for p in local.rglob("config.json") if (p.parent / "state_dict.pt").exists()]
    if not candidates:
        raise FileNotFoundError(f"model version {mv.version} has no recommender artifact under {local}")
    return candidates[0].parent, int(mv.version)


def load_registered_recommender(tracking_uri: str, *, alias: str | None = "champion", version: int | None = None,
                                name: str = MODEL_NAME, device: str = "cpu") -> tuple[Recommender, int]:
    """A registered version (by alias or number) loaded into memory, and its version number.

    The artifact is downloaded into a temporary directory that is removed once the weights are loaded: the
    service loads a model at start and on every alias move, and the gate re-scores the champion for every
    challenger, so leaving each download behind would fill the disk with copies of the item table."""
    from models.recommender import Recommender  # the registry itself needs no torch

    with tempfile.TemporaryDirectory(prefix="encore-model-") as tmp:
        path, found = download_recommender_dir(tracking_uri, Path(tmp), alias=alias, version=version, name=name)
        return Recommender.load(path, device), found


def mlflow_name(metric: str) -> str:
    """MLflow names allow no '@': ``hr@10`` is logged as ``hr_at_10``."""
    return metric.replace("@", "_at_")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _float(v: str | None) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None


def _param(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v


def _actor() -> str:
    return os.environ.get("ENCORE_ACTOR") or os.environ.get("USER") or "unknown"
