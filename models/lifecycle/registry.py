"""The MLflow model registry: pickle-free model versions, aliases with an audit trail, loading a version.

Conventions (the names come from the settings' ``registry`` group, ``infra.settings.RegistrySettings``):

- one registered model, ``registry.model_name`` (``encore-recommender``); every new version gets the
  challenger alias and tags naming its data (snapshot, Kafka offsets, Feast feature view versions), code
  (git revision) and metrics (``metric.<name>``);
- the champion alias is what serving loads. Aliases only, never the deprecated stages. Every alias move is an
  audit entry, stored as a tag on the version *and* on the registered model (``audit.<unix_ms>.<alias>``) so
  ``encore models rollback`` can replay the champion history from the registry alone;
- the promotion gate's verdict is a set of version tags (:data:`GATE_PASSED` ...), written by
  ``models.lifecycle.promotion`` and read here by :meth:`Registry.versions`;
- a VISTA version is tied to its summariser: :data:`SUMMARISER_VERSION` on the version (set by
  :meth:`Registry.register` from the model's metadata), and a completed backfill of that summariser's cached
  states is a tag on the registered model, ``summaries.<summariser version>`` (JSON: users, events, until,
  when), written by the ``user_summaries`` asset (:meth:`Registry.record_summaries`) once its states are
  stored. The gate reads both (``gate.summaries_check``). A registry tag rather than a file: the gate already
  talks to the registry, and every process that can promote sees the same one.

The tag names below are what existing registries hold: renaming one would hide their history.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from models.lifecycle.tracking import git_revision, mlflow_name, numeric_metrics, tracking_uri

if TYPE_CHECKING:
    from infra.settings import RegistrySettings
    from models.recommender import Recommender

log = logging.getLogger("encore.registry")

GATE_PASSED = "gate.passed"  # "true" / "false"
GATE_REASON = "gate.reason"  # the verdict in one line
GATE_CHECKS = "gate.checks"  # JSON {check: passed}
AWAITING_APPROVAL = "awaiting_approval"  # manual mode: passed the gate, waits for a person
AUDIT_PREFIX = "audit."
METRIC_PREFIX = "metric."
SUMMARISER_VERSION = "summariser_version"  # a VISTA version: its summariser's Summariser.version()
SUMMARIES_PREFIX = "summaries."  # registered-model tag per summariser version with a completed backfill

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
PIP_REQUIREMENTS = ["torch==2.13.0", "torchrec==1.8.0", "fbgemm-gpu-cpu==1.8.0", "mlflow", "pandas", "numpy"]


def bound_client_waits(timeout_s: int, max_retries: int) -> None:
    """Bound how long one MLflow client call of this process may wait: ``timeout_s`` per HTTP request and
    ``max_retries`` retries (MLflow's defaults, 120 s and 7 retries with exponential backoff, let one call to a
    hung server take many minutes). Process-wide (MLflow reads these variables at each call): for long-lived
    processes that poll the registry and must stay responsive, such as the recommendation service."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(max_retries))


class NotRegistered(LookupError):
    """A version or alias that the registered model does not have."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    run_id: str
    metrics: dict[str, float]


class Registry:
    """The settings' registered model (name and aliases: ``names``) on the tracking server ``tracking_uri``."""

    def __init__(self, tracking_uri: str, names: RegistrySettings) -> None:
        self.tracking_uri, self.names = tracking_uri, names
        self.client = MlflowClient(tracking_uri)

    @property
    def name(self) -> str:
        return self.names.model_name

    # ------------------------------------------------------------------------------------------ versions

    def register(self, recommender: Any, *, run_id: str, metrics: dict[str, float], tags: dict[str, str],
                 input_example: pd.DataFrame, artifacts: dict[str, Path] | None = None) -> RegisteredVersion:
        """Finish a training run: evaluation metrics and artifacts, the pyfunc model, a new version that gets
        the challenger alias."""
        from mlflow.models import infer_signature

        from models.lifecycle.pyfunc import predict_frame

        mlflow.set_tracking_uri(self.tracking_uri)
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(numeric_metrics(metrics))
            for artifact_path, path in (artifacts or {}).items():
                path = Path(path)
                if path.is_dir():
                    mlflow.log_artifacts(str(path), artifact_path)
                elif path.exists():
                    mlflow.log_artifact(str(path), artifact_path)
            model_dir = Path(tmp) / "recommender"
            recommender.save(model_dir)
            mlflow.log_artifact(str(model_dir / "config.json"), "config")
            if (model_dir / "vocab.json").exists():  # a ServedRanker hashes ids: it has no vocabulary
                mlflow.log_artifact(str(model_dir / "vocab.json"), "vocabulary")
            output_example = predict_frame(recommender, input_example, k=10)
            signature = infer_signature(input_example, output_example, params={"k": 10})
            signature = _with_optional_inputs(signature, getattr(recommender, "optional_inputs", ()))
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={"recommender": str(model_dir)},
                signature=signature,
                input_example=input_example,
                registered_model_name=self.name,
                pip_requirements=PIP_REQUIREMENTS,
            )
            version = int(info.registered_model_version)
        summariser = getattr(recommender, "summariser_version", None)  # VISTA: the summaries it must be served with
        tie = {SUMMARISER_VERSION: summariser} if summariser else {}
        self.set_tags(version, {**tags, **tie, "run_id": run_id, "git_revision": git_revision(),
                                **{f"{METRIC_PREFIX}{k}": f"{v:.6f}" for k, v in numeric_metrics(metrics).items()}})
        self.set_alias(self.names.challenger_alias, version, reason=f"registered from run {run_id}",
                       actor="pipeline")
        log.info("registered %s version %d (run %s)", self.name, version, run_id)
        return RegisteredVersion(self.name, version, run_id, metrics)

    def tags(self, version: int) -> dict[str, str]:
        """The version's tags; NotRegistered when there is no such version."""
        try:
            return dict(self.client.get_model_version(self.name, str(version)).tags)
        except MlflowException as exc:
            raise NotRegistered(f"{self.name} has no version {version}: {exc.message}") from exc

    def set_tags(self, version: int, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, str(value)[:4900])

    def delete_tag(self, version: int, key: str) -> None:
        if key in self.tags(version):
            self.client.delete_model_version_tag(self.name, str(version), key)

    def version_metric(self, version: int, metric: str) -> float | None:
        """A metric the version was registered with (``metric.<name>`` tag), e.g. ``test_ndcg@10``."""
        return _float(self.tags(version).get(f"{METRIC_PREFIX}{mlflow_name(metric)}"))

    def versions(self, metric: str = "ndcg@10") -> list[dict]:
        """One row per version, newest first: aliases, run, data snapshot, metric, gate outcome."""
        try:
            aliases = self.client.get_registered_model(self.name).aliases  # {alias: version}
        except MlflowException:
            return []
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        rows = []
        for mv in self.client.search_model_versions(f"name='{self.name}'"):
            t = mv.tags
            rows.append({
                "version": int(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "model": t.get("model", ""),
                "metric": _float(t.get(f"{METRIC_PREFIX}{mlflow_name(metric)}")),
                "dataset_snapshot": t.get("dataset_snapshot", ""),
                "gate": t.get(GATE_PASSED, ""),
                "gate_reason": t.get(GATE_REASON, ""),
                "awaiting_approval": t.get(AWAITING_APPROVAL, ""),
                "created": pd.Timestamp(mv.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
                "run_id": mv.run_id,
            })
        return sorted(rows, key=lambda r: -r["version"])

    # ------------------------------------------------------------------------------------------- aliases

    def alias_version(self, alias: str) -> int | None:
        try:
            return int(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException:
            return None

    def champion_version(self) -> int | None:
        return self.alias_version(self.names.champion_alias)

    def aliases_of(self, version: int) -> list[str]:
        """The aliases that point at ``version`` now (sorted)."""
        return sorted(self.client.get_model_version(self.name, str(version)).aliases)

    def resolve(self, target: str) -> int:
        """The version a serving target names: ``alias:<a>`` (where the alias points now) or ``version:<n>``."""
        kind, _, value = target.partition(":")
        if kind == "version":
            return int(value)
        if kind != "alias":
            raise ValueError(f"{target!r} is not a registry target (alias:<name> or version:<n>)")
        try:
            return int(self.client.get_model_version_by_alias(self.name, value).version)
        except MlflowException as exc:
            raise NotRegistered(f"{self.name} has no alias {value!r} ({exc.message})") from exc

    def target_problem(self, target: str) -> str | None:
        """Why ``target`` (``alias:<a>`` / ``version:<n>``) names nothing in the registry; None when it exists."""
        kind, _, value = target.partition(":")
        try:
            if kind == "alias":
                self.client.get_model_version_by_alias(self.name, value)
            elif kind == "version":
                self.client.get_model_version(self.name, value)
        except Exception:  # noqa: BLE001 - MLflow raises one exception type for "not found" and outages alike
            return f"{target!r} does not exist in the registry for model {self.name!r}"
        return None

    def set_alias(self, alias: str, version: int, *, reason: str, actor: str | None = None,
                  action: str = "set") -> dict:
        """Move ``alias`` to ``version`` and record who, why and from where, on the version and the model."""
        previous = self.alias_version(alias)
        self.client.set_registered_model_alias(self.name, alias, str(version))
        at_ms = int(time.time() * 1000)
        entry = {"alias": alias, "from": previous, "to": int(version), "action": action, "reason": reason,
                 "actor": actor or _actor(), "at_ms": at_ms}
        key = f"{AUDIT_PREFIX}{at_ms}.{alias}"
        value = json.dumps(entry)[:4900]
        self.client.set_model_version_tag(self.name, str(version), key, value)
        self.client.set_registered_model_tag(self.name, key, value)
        log.info("alias %s of %s: %s -> %s (%s)", alias, self.name, previous, version, reason)
        return entry

    def record_summaries(self, summariser_version: str, info: dict[str, Any]) -> None:
        """Mark the cached summaries of ``summariser_version`` as backfilled (what the promotion gate requires of a
        VISTA version with that summariser); ``info``: a few numbers about them (users, events, until)."""
        self.client.set_registered_model_tag(self.name, f"{SUMMARIES_PREFIX}{summariser_version}",
                                             json.dumps({**info, "at_ms": int(time.time() * 1000)})[:4900])

    def summary_backfills(self) -> dict[str, dict]:
        """Summariser version -> its backfill record, for every version with a completed backfill."""
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return {}
        return {k.removeprefix(SUMMARIES_PREFIX): json.loads(v) for k, v in tags.items()
                if k.startswith(SUMMARIES_PREFIX)}

    def audit_log(self) -> list[dict]:
        """Every alias move of the registered model, oldest first."""
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return []
        entries = [json.loads(v) for k, v in tags.items() if k.startswith(AUDIT_PREFIX)]
        return sorted(entries, key=lambda e: (e["at_ms"], e["alias"]))

    def champion_stack(self) -> list[int]:
        """Champion history as a stack: promotions push, rollbacks pop; the top is the current champion."""
        stack: list[int] = []
        for e in self.audit_log():
            if e["alias"] != self.names.champion_alias:
                continue
            if e.get("action") == "rollback":
                while stack and stack[-1] != e["to"]:
                    stack.pop()
                if not stack:
                    stack.append(e["to"])
            else:
                stack.append(e["to"])
        return stack

    def pinned_snapshot_ids(self) -> set[int]:
        """The offline table snapshots (tag ``snapshot_id``, Iceberg only) of the versions that may serve: every
        version an alias points at, and each version on the champion stack (a rollback may return to it).
        Snapshot expiry keeps these, so a serving model's data can always be read again."""
        try:
            aliases = self.client.get_registered_model(self.name).aliases  # {alias: version}
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # no model registered yet: nothing to keep
                return set()
            raise  # an unreachable registry must not read as "nothing pinned"
        versions = {int(v) for v in aliases.values()} | set(self.champion_stack())
        ids = (self.tags(v).get("snapshot_id", "") for v in sorted(versions))
        return {int(i) for i in ids if i.strip().lstrip("-").isdigit()}

    # ------------------------------------------------------------------------------------------- loading

    def download(self, dst: Path, *, alias: str | None = None, version: int | None = None) -> tuple[Path, int]:
        """Fetch the ``recommender`` artifact directory of a version (by number, else by alias, else the
        champion) under ``dst``.

        ``dst`` is required: the caller owns the copy and its removal (:meth:`load` uses a temporary
        directory). A default temp dir here would leave every download behind."""
        mv = self.client.get_model_version(self.name, str(version)) if version is not None else \
            self.client.get_model_version_by_alias(self.name, alias or self.names.champion_alias)
        mlflow.set_tracking_uri(self.tracking_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{self.name}/{mv.version}",
                                                         dst_path=str(dst)))
        candidates = [p for p in local.rglob("config.json") if (p.parent / "state_dict.pt").exists()]
        if not candidates:
            raise FileNotFoundError(f"model version {mv.version} has no recommender artifact under {local}")
        return candidates[0].parent, int(mv.version)

    def load(self, *, alias: str | None = None, version: int | None = None,
             device: str = "cpu") -> tuple[Recommender | Any, int]:
        """A version (by number, else by alias, else the champion) loaded into memory, and its number: a
        ``Recommender`` (a retriever, an ARGUS ranker) or, when its config names a ``ranker_family``, a
        ``models.served_ranker.ServedRanker`` (``load_artifact``, the one loader).

        The artifact is downloaded into a temporary directory that is removed once the weights are loaded: the
        service loads a model at start and on every alias move, and the gate re-scores the champion for every
        challenger, so leaving each download behind would fill the disk with copies of the item table."""
        from models.served_ranker import load_artifact  # the registry itself needs no torch

        with tempfile.TemporaryDirectory(prefix="encore-model-") as tmp:
            path, found = self.download(Path(tmp), alias=alias, version=version)
            return load_artifact(path, device), found


def _float(v: str | None) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None


def _actor() -> str:
    return os.environ.get("ENCORE_ACTOR") or os.environ.get("USER") or "unknown"


def pinned_snapshot_ids(settings: Any) -> set[int]:  # settings: infra.settings.EncoreSettings
    """``Registry.pinned_snapshot_ids`` of the retrievers' registry of ``settings`` (the registry's file when
    its server is not running: tags are all it reads); empty when no registry exists anywhere yet. Raises when
    a configured registry cannot be read: expiring a serving model's snapshot is not undoable."""
    try:
        uri = tracking_uri(settings)
    except RuntimeError:  # no server, no file: no model was ever registered here
        return set()
    return Registry(uri, settings.registry).pinned_snapshot_ids()


def _with_optional_inputs(signature: Any, names: Sequence[str]) -> Any:
    """``signature`` with the input columns ``names`` made optional and of any type (a ``ServedRanker``'s attribute
    columns: a caller may leave them out or send unknown values, which the model reads as unknown)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    if not names:
        return signature
    columns = [ColSpec(AnyType(), c.name, required=False) if c.name in names else c for c in signature.inputs.inputs]
    return ModelSignature(inputs=Schema(columns), outputs=signature.outputs, params=signature.params)
