"""MLflow tracking and the model registry: log a trained recommender, register it, move aliases.

Conventions: registered model ``encore-recommender``; every new version gets the alias ``challenger``;
``champion`` is what serving loads. Aliases, not the deprecated stages. Every alias move is recorded as a
tag on the version (``audit.<unix_ms>``) so the registry itself holds the audit trail.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

log = logging.getLogger("encore.registry")

MODEL_NAME = "encore-recommender"
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    run_id: str
    metrics: dict[str, float]


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_and_register(
    recommender: Any,
    *,
    tracking_uri: str,
    experiment: str,
    params: dict[str, Any],
    history: list[dict[str, float]],
    metrics: dict[str, float],
    tags: dict[str, str],
    input_example: pd.DataFrame,
    name: str = MODEL_NAME,
    run_name: str | None = None,
) -> RegisteredVersion:
    """One MLflow run: params, per-epoch metrics, artifacts, a pickle-free pyfunc; then a registry version."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(params)
        for epoch, row in enumerate(history, start=1):
            mlflow.log_metrics({mlflow_name(k): float(v) for k, v in row.items() if _is_number(v)}, step=epoch)
        mlflow.log_metrics({f"test_{mlflow_name(k)}": float(v) for k, v in metrics.items() if _is_number(v)})
        mlflow.set_tags({**tags, "git_revision": git_revision()})
        model_dir = Path(tmp) / "recommender"
        recommender.save(model_dir)
        mlflow.log_dict(metrics, "evaluation/test_metrics.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"recommender": str(model_dir)},
            input_example=input_example,
            registered_model_name=name,
            pip_requirements=["torch==2.13.0", "torchrec==1.8.0", "fbgemm-gpu-cpu==1.8.0", "mlflow", "pandas"],
        )
        version = int(info.registered_model_version)
        client = MlflowClient(tracking_uri)
        for key, value in {**tags, **{f"metric.{mlflow_name(k)}": f"{v:.6f}" for k, v in metrics.items() if _is_number(v)}}.items():
            client.set_model_version_tag(name, str(version), key, str(value))
        set_alias(client, name, "challenger", version, reason=f"registered from run {run.info.run_id}")
        log.info("registered %s version %d (run %s)", name, version, run.info.run_id)
        return RegisteredVersion(name, version, run.info.run_id, metrics)


def set_alias(client: MlflowClient, name: str, alias: str, version: int, *, reason: str) -> None:
    previous = alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, str(version))
    entry = {"alias": alias, "from": previous, "to": version, "reason": reason, "at_ms": int(time.time() * 1000)}
    client.set_model_version_tag(name, str(version), f"audit.{entry['at_ms']}.{alias}", json.dumps(entry))
    log.info("alias %s of %s: %s -> %s (%s)", alias, name, previous, version, reason)


def alias_version(client: MlflowClient, name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_metric(client: MlflowClient, name: str, version: int, metric: str) -> float | None:
    tags = client.get_model_version(name, str(version)).tags
    value = tags.get(f"metric.{mlflow_name(metric)}")
    return None if value is None else float(value)


def promote_if_better(
    tracking_uri: str, version: int, *, metric: str = "ndcg@10", margin: float = 0.0, name: str = MODEL_NAME
) -> tuple[bool, str]:
    """The simple gate: promote ``version`` to champion when it beats the champion by ``margin``."""
    client = MlflowClient(tracking_uri)
    champion = alias_version(client, name, "champion")
    challenger_value = version_metric(client, name, version, metric)
    if challenger_value is None or challenger_value != challenger_value:
        return False, f"version {version} has no valid {metric}"
    if champion is None:
        set_alias(client, name, "champion", version, reason="first model: no champion yet")
        return True, f"version {version} is the first champion ({metric}={challenger_value:.4f})"
    if champion == version:
        return True, f"version {version} is already champion"
    champion_value = version_metric(client, name, champion, metric) or 0.0
    if challenger_value >= champion_value + margin:
        reason = f"{metric} {challenger_value:.4f} beats champion v{champion} {champion_value:.4f} by >= {margin}"
        set_alias(client, name, "champion", version, reason=reason)
        return True, reason
    return False, (
        f"{metric} {challenger_value:.4f} does not beat champion v{champion} {champion_value:.4f} by {margin}"
    )


def download_recommender_dir(tracking_uri: str, *, alias: str | None = "champion", version: int | None = None,
                             name: str = MODEL_NAME, dst: Path | None = None) -> tuple[Path, int]:
    """Fetch the ``recommender`` artifact directory of a registered version (by alias or number)."""
    client = MlflowClient(tracking_uri)
    mv = client.get_model_version(name, str(version)) if version is not None else \
        client.get_model_version_by_alias(name, alias or "champion")
    mlflow.set_tracking_uri(tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="encore-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst)))
    candidates = list(local.rglob("config.json"))
    if not candidates:
        raise FileNotFoundError(f"model version {mv.version} has no recommender artifact under {local}")
    return candidates[0].parent, int(mv.version)


def mlflow_name(metric: str) -> str:
    """MLflow names allow no '@': ``hr@10`` is logged as ``hr_at_10``."""
    return metric.replace("@", "_at_")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
