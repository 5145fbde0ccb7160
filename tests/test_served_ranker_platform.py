"""``ranking.recipe: wukong`` on the platform: the ranking assets train, evaluate, register and gate a Wukong
ranker, and a real HTTP service (uvicorn, a tansu broker for its exposures, the Feast online store for its
histories, an sqlite MLflow registry) loads that version from the rankers' registry and reranks with it.

What stands in: the ``ranking_dataset`` asset, which reads the exposures topic and the offline store, is
replaced by an asset of the same name that writes a simulated snapshot (served slates and the simulator's
reactions) in its format; everything downstream of it is the real asset graph."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from orchestration.resources import EncoreResource, MLflowResource, encore_resource
from tests.conftest import simulated_slates, small_settings

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
USERS, ITEMS = 40, 60


def simulated_log() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, exposures): the simulator's histories, then 160 served slates of 6 and their reactions."""
    interactions, exposures = simulated_slates(users=USERS, items=ITEMS, requests=160, slate=6, seed=1,
                                               sessions_per_user=2, events_per_session=8, t0_ms=T0)
    interactions["event_id"] = [f"e{i}" for i in range(len(interactions))]
    interactions["event_type"] = interactions["event_type"].map(lambda t: str(getattr(t, "value", t)))
    return interactions, pd.DataFrame(exposures)


@dg.asset(name="ranking_dataset", group_name="ranking")
def simulated_ranking_dataset(encore: EncoreResource) -> dict:
    """Stands in for ``ranking_dataset``: the same value (snapshot files, time cutoff, attribution window)."""
    settings = encore.settings()
    interactions, exposures = simulated_log()
    out = settings.root / "datasets" / "ranking-sim"
    out.mkdir(parents=True, exist_ok=True)
    interactions.to_parquet(out / "interactions.parquet", index=False)
    exposures.to_parquet(out / "exposures.parquet", index=False)
    times = np.sort(exposures["timestamp_ms"].to_numpy(np.int64))
    return {"snapshot": "sim", "exposures": str(out / "exposures.parquet"),
            "interactions": str(out / "interactions.parquet"),
            "cutoff_ms": int(times[int(len(times) * (1 - settings.ranking.test_share))]), "window_s": 3600,
            "labels_complete_ms": int(times[-1]), "sampled_negatives": settings.ranking.sampled_negatives,
            "seed": 0, "attributes": None}


def register_retriever(settings, uri: str) -> int:  # noqa: ANN001 - EncoreSettings
    """A small untrained HSTU retriever over the simulated catalogue, champion of the retrievers' registry."""
    from models.data import ItemVocab
    from models.lifecycle.registry import Registry
    from models.lifecycle.tracking import TRAINING, experiment_name, training_run
    from models.recommender import Recommender, build_model
    from orchestration.assets.training import _input_example
    from tests.test_models import model_config

    torch.manual_seed(0)
    rec = Recommender(build_model(model_config(model="hstu", num_items=ITEMS, max_len=20, dim=16, blocks=1, heads=2,
                                               dropout=0.0)), ItemVocab(list(range(ITEMS))))
    with training_run(uri, experiment_name(settings.mlflow_experiment, TRAINING), run_name="retriever", params={},
                      tags={}, system_metrics=False, artifact_root=settings.mlflow_dir / "artifacts") as run:
        pass
    registry = Registry(uri, settings.registry)
    version = registry.register(rec, run_id=run.info.run_id, metrics={}, tags={},
                                input_example=_input_example(rec)).version
    registry.set_alias(settings.registry.champion_alias, version, reason="test")
    return version


def write_histories(settings, interactions: pd.DataFrame, users: list[int]) -> None:  # noqa: ANN001
    """The users' last ``ingest.history_length`` events in the online ``user_history`` view, as ingest writes it."""
    from datetime import datetime, timezone

    from features.feature_repo import feature_store, write_online

    store = feature_store(settings)
    n = settings.ingest.history_length
    rows = []
    for u in users:
        mine = interactions[interactions["user_id"] == u].sort_values("timestamp_ms", kind="stable").tail(n)
        rows.append({"user_id": u, "item_ids": mine["item_id"].astype(int).tolist(),
                     "event_types": mine["event_type"].astype(str).tolist(),
                     "timestamps_ms": mine["timestamp_ms"].astype(int).tolist(),
                     "played_ratios": mine["played_ratio"].fillna(0.0).astype(float).tolist(),
                     "length": len(mine), "event_timestamp": datetime.now(timezone.utc)})
    write_online(store, "user_history", "user_id", rows, "event_timestamp")


def test_ranking_job_with_a_wukong_recipe_registers_a_ranker_the_cascade_serves_over_http(tmp_path: Path):
    import uvicorn

    from infra.services import EmbeddedServices, free_port
    from orchestration.assets import ranking as R
    from serving.app import create_app

    torch.set_num_threads(1)
    settings = small_settings(tmp_path / "encore", ranking={"recipe": "wukong", "min_examples": 20,
                                                            "sampled_negatives": 2},
                              serve={"ranker": "alias:challenger", "model_poll_s": 0.5, "torch_threads": 1})
    settings.mlflow_dir.mkdir(parents=True)
    uri = f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"
    result = dg.materialize(
        [simulated_ranking_dataset, R.trained_ranker, R.ranker_evaluation, R.registered_ranker, R.ranker_gate,
         R.champion_ranker],
        resources={"encore": encore_resource(settings), "mlflow_server": MLflowResource(tracking_uri=uri)},
        raise_on_error=False)
    trained = result.output_for_node("trained_ranker")
    assert trained["family"] == "wukong" and trained["base_version"] is None
    report = result.output_for_node("ranker_evaluation")["evaluation"]
    assert "base" not in report and 0.0 <= report["ranker"]["auc"] <= 1.0 and report["scored"] == report["examples"]
    version = result.output_for_node("registered_ranker")["version"]
    client = MlflowClient(uri)
    tags = client.get_model_version(settings.registry.ranker_model_name, str(version)).tags
    assert tags["model"] == "wukong-ranker" and "base_version" not in tags and tags["task"] == settings.ranking.task
    checks = tags["gate.checks"]
    assert "beats_popularity" in checks and "beats_base" not in checks  # no head it started from
    aliases = {a: str(v) for a, v in client.get_registered_model(settings.registry.ranker_model_name).aliases.items()}
    assert (aliases.get("champion") == str(version)) == (tags["gate.passed"] == "true")  # promoted iff it passed

    register_retriever(settings, uri)
    interactions, _ = simulated_log()
    users = sorted(int(u) for u in interactions["user_id"].unique()[:6])
    write_histories(settings, interactions, users)
    with EmbeddedServices(settings, with_mlflow=False) as svc:
        app = create_app(settings, svc.kafka_bootstrap, uri, experiment=None)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
                deadline, body = time.monotonic() + 60, {}
                while time.monotonic() < deadline:  # until the service has loaded both models
                    try:
                        body = http.post("/v1/recommendations", json={"user_id": users[0], "k": 5}).json()
                    except httpx.TransportError:
                        body = {}
                    if body.get("ranker_version") is not None:
                        break
                    time.sleep(0.3)
                answers = [http.post("/v1/recommendations", json={"user_id": u, "k": 5}).json() for u in users]
                metrics = http.get("/metrics").text
        finally:
            server.should_exit = True
            thread.join(timeout=20)
    assert body.get("ranker_version") == version, body
    assert all(a["source"] == "model" and a["ranker_version"] == version and len(a["items"]) == 5 for a in answers)
    assert all(a["scores"] == sorted(a["scores"], reverse=True) for a in answers)
    assert "encore_ranker_failures_total 0.0" in metrics  # the Wukong ranker answered every pass
