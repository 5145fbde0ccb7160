"""``ranking.recipe: wukong-ml1m`` (Wukong reading user and item attributes, the engaged history and the champion
retriever's item vectors) on the platform: the ranking assets
train, evaluate, register and gate a Wukong ranker, MLflow loads the registered version and scores its input
example, and a real HTTP service (uvicorn, a tansu broker for its exposures, the Feast online store for its
histories and attributes, an sqlite MLflow registry) loads that version from the rankers' registry and reranks
with it.

What stands in: the ``ranking_dataset`` asset, which reads the exposures topic and the offline store, is
replaced by an asset of the same name that writes a simulated snapshot (served slates and the simulator's
reactions) in its format, with the attributes read as the real asset reads them; everything downstream of it
is the real asset graph."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from orchestration.resources import EncoreResource, MLflowResource, encore_resource
from tests.conftest import attribute_frames, simulated_slates, small_settings

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
    from orchestration.assets.ranking import read_attributes

    times = np.sort(exposures["timestamp_ms"].to_numpy(np.int64))
    info = {"snapshot": "sim", "exposures": str(out / "exposures.parquet"),
            "interactions": str(out / "interactions.parquet"),
            "cutoff_ms": int(times[int(len(times) * (1 - settings.ranking.test_share))]), "window_s": 3600,
            "labels_complete_ms": int(times[-1]), "sampled_negatives": settings.ranking.sampled_negatives,
            "seed": 0}
    info["attributes"] = read_attributes(settings, info, out)  # the Feast views' rows as of each request
    return info


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


class _Records(logging.Handler):
    """The records MLflow logs (its ``mlflow`` logger does not propagate to the root, so caplog sees none)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_ranking_job_with_an_attribute_wukong_recipe_registers_a_ranker_mlflow_and_the_cascade_serve(
        tmp_path: Path):
    """Registering a ranker that reads attributes used to fail: ``Registry.register`` scores the pyfunc's input
    example, and the ranker had no attribute reader (only the service binds one). The input example now carries
    the attributes as columns (read offline as of its time), MLflow validates it without a warning, the
    registered model loads and scores through ``mlflow.pyfunc`` with no store, and the service reads the
    attributes online."""
    import mlflow

    from features.attributes import ATTRIBUTE_FEATURES, write_attributes
    from features.feature_repo import feature_store
    from orchestration.assets import ranking as R

    torch.set_num_threads(1)
    settings = small_settings(tmp_path / "encore", ranking={"recipe": "wukong-ml1m", "min_examples": 20,
                                                            "sampled_negatives": 2},
                              # the default read deadline: the service warms the attribute read when it opens the
                              # store, so the first cascade batch's attribute read meets it (a cold one did not)
                              serve={"ranker": "alias:challenger", "model_poll_s": 0.5, "torch_threads": 1})
    settings.mlflow_dir.mkdir(parents=True)
    uri = f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"
    user_rows, item_rows = attribute_frames(USERS, ITEMS)
    write_attributes(feature_store(settings), settings, users=user_rows, items=item_rows)  # as entity_attributes
    retriever = register_retriever(settings, uri)  # the champion whose item vectors the recipe's Wukong reads
    records = _Records()
    logging.getLogger("mlflow").addHandler(records)
    try:
        result = dg.materialize(
            [simulated_ranking_dataset, R.trained_ranker, R.ranker_evaluation, R.registered_ranker, R.ranker_gate,
             R.champion_ranker],
            resources={"encore": encore_resource(settings), "mlflow_server": MLflowResource(tracking_uri=uri)},
            raise_on_error=False)
    finally:
        logging.getLogger("mlflow").removeHandler(records)
    assert result.output_for_node("ranking_dataset")["attributes"] is not None
    trained = result.output_for_node("trained_ranker")
    assert trained["family"] == "wukong" and trained["base_version"] is None
    assert MlflowClient(uri).get_run(trained["run_id"]).data.params["item_vectors_version"] == str(retriever)
    assert not [m for m in records.messages if "Failed to validate" in m], records.messages
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

    # the registered model, loaded by MLflow alone (no reader bound), scores its input example from its columns
    mlflow.set_tracking_uri(uri)
    model_uri = f"models:/{settings.registry.ranker_model_name}/{version}"
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    local = mlflow.artifacts.download_artifacts(model_uri)
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert set(ATTRIBUTE_FEATURES) <= set(example.columns) and set(ATTRIBUTE_FEATURES) <= set(
        pyfunc.metadata.get_input_schema().input_names())
    scores = pyfunc.predict(example)["scores"].iloc[0]
    assert len(scores) == len(example["candidates"].iloc[0]) and all(0 < s < 1 for s in scores)
    # a caller who knows nothing of the user: the schema takes unknown attributes (the model reads them as unknown)
    unknown = example.assign(gender=[None], age=[None], occupation=[None])
    assert len(pyfunc.predict(unknown)["scores"].iloc[0]) == len(scores)

    interactions, _ = simulated_log()
    users = sorted(int(u) for u in interactions["user_id"].unique()[:6])
    write_histories(settings, interactions, users)
    with serving_http(settings, uri, timeout=20) as http:
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
    assert body.get("ranker_version") == version, body
    assert all(a["source"] == "model" and a["ranker_version"] == version and len(a["items"]) == 5 for a in answers)
    assert all(a["scores"] == sorted(a["scores"], reverse=True) for a in answers)
    assert "encore_ranker_failures_total 0.0" in metrics  # the Wukong ranker answered every pass


def register_attribute_ranker(settings, uri: str) -> int:  # noqa: ANN001 - EncoreSettings
    """A small Wukong ranker that reads user and item attributes, trained on the simulated slates, champion of
    the rankers' registry."""
    from features.attributes import attributes_as_of
    from models.lifecycle.registry import Registry
    from models.lifecycle.tracking import TRAINING, experiment_name, training_run
    from models.ranking_data import build_ranking_examples, with_attributes
    from models.ranking_recipe import resolve_ranking_recipe
    from models.served_ranker import attribute_columns, train_served_ranker

    interactions, exposures = simulated_log()
    users, items = attribute_frames(USERS, ITEMS)
    examples = build_ranking_examples(interactions, exposures, window_s=3600, sampled_negatives=2,
                                      catalogue=np.arange(ITEMS), seed=0)
    examples = with_attributes(examples, attributes_as_of(examples.examples[["user_id", "item_id", "t_ms"]],
                                                          users, items))
    recipe = resolve_ranking_recipe("wukong", attributes=True, item_vectors=False, dim=8, item_buckets=128,
                                    user_buckets=64, history_len=5, mlp_hidden=16, epochs=1)
    ranker = train_served_ranker(recipe, examples, "engaged", max_history=settings.ingest.history_length)
    assert ranker.reads_attributes
    mine = interactions[interactions["user_id"] == 0].sort_values("timestamp_ms", kind="stable").tail(5)
    now_ms = int(mine["timestamp_ms"].max()) + 1
    # the pyfunc's input example carries the attributes as columns (as ``registered_ranker`` writes it)
    read = attributes_as_of(pd.DataFrame({"user_id": 0, "item_id": [1, 2, 3], "t_ms": now_ms}), users, items)
    example = pd.DataFrame({"user_id": [0], "item_ids": [mine["item_id"].astype(int).tolist()],
                            "event_types": [mine["event_type"].astype(str).tolist()],
                            "timestamps_ms": [mine["timestamp_ms"].astype(int).tolist()],
                            "candidates": [[1, 2, 3]], "now_ms": [now_ms],
                            **{name: [value] for name, value in attribute_columns(read).items()}})
    with training_run(uri, experiment_name(settings.mlflow_experiment, TRAINING), run_name="attribute-ranker",
                      params={}, tags={}, system_metrics=False, artifact_root=settings.mlflow_dir / "artifacts") as run:
        pass
    registry = Registry(uri, settings.registry.for_rankers())
    version = registry.register(ranker, run_id=run.info.run_id, metrics={}, tags={}, input_example=example).version
    registry.set_alias(settings.registry.champion_alias, version, reason="test")
    return version


@contextmanager
def serving_http(settings, uri: str, timeout: float):  # noqa: ANN001, ANN201 - EncoreSettings; yields an httpx.Client
    """The real service (embedded broker, uvicorn on a free port, the MLflow registry at ``uri``, no experiment)
    and an HTTP client of it; the server is stopped on the way out."""
    import uvicorn

    from infra.services import EmbeddedServices, free_port
    from serving.app import create_app

    with EmbeddedServices(settings, with_mlflow=False) as svc:
        app = create_app(settings, svc.kafka_bootstrap, uri, experiment=None)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as http:
                yield http
        finally:
            server.should_exit = True
            thread.join(timeout=20)


@contextmanager
def _hung_feast_registry(settings):  # noqa: ANN001, ANN202
    """The Feast registry file replaced by a named pipe nobody writes to: a read of it waits until a writer
    comes, as a read of a hung registry database would. Only the attribute read waits, when Feast's
    ``get_online_features`` next loads the registry (its cache expired: the test sets a short TTL); the history
    read (``HistoryReader``: the provider's ``online_read`` with the view read at start) never reads the
    registry. (Locking the SQLite online store, as tests/test_serving.py does, stops the history read first: the
    micro-batch degrades to popularity before its ranker reads anything.) On the way out the file is put back,
    then every read still waiting on the pipe is released."""
    path = settings.feast_dir / "registry.db"
    saved = path.read_bytes()
    pipe, staged = path.with_name("registry.pipe"), path.with_name("registry.staged")
    os.mkfifo(pipe)
    os.link(pipe, staged)
    os.replace(staged, path)  # the pipe, under the registry's name
    try:
        yield
    finally:
        staged.write_bytes(saved)
        os.replace(staged, path)
        for _ in range(50):
            try:  # opens only while a reader is waiting on the pipe (else ENXIO)
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                break
            os.set_blocking(fd, True)
            try:
                os.write(fd, saved)
            except OSError:  # the reader went away
                pass
            finally:
                os.close(fd)
            time.sleep(0.05)
        pipe.unlink()


def test_a_hung_attribute_read_fails_the_ranker_step_within_the_deadline_and_no_request(tmp_path: Path):
    """A served ranker's attribute read had no deadline: a store that did not answer held the micro-batch
    worker, and every request after it, for as long as it hung. Now the read has the online store's deadline:
    the micro-batch it hangs is answered in retrieval order (no ranker version; the ranker failure counted)
    within the deadline, the replica degrades (popularity, marked degraded) until the probe reconnects, and
    once the store answers again the ranker reranks again, without a restart."""
    from experiments.assignment import ranker_key
    from features.attributes import write_attributes
    from features.feature_repo import feature_store

    torch.set_num_threads(1)
    # A one-second registry cache: the service warms the attribute read when it opens the store, which plans it
    # against the registry then; an expired cache makes the next attribute read load the registry again, which
    # is where the hung registry below holds it.
    settings = small_settings(tmp_path / "encore", serve={"ranker": "alias:champion", "model_poll_s": 0.5,
                                                          "torch_threads": 1}, feast={"registry_cache_ttl_s": 1})
    settings.mlflow_dir.mkdir(parents=True)
    uri = f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"
    register_retriever(settings, uri)
    version = register_attribute_ranker(settings, uri)
    interactions, _ = simulated_log()
    users = sorted(int(u) for u in interactions["user_id"].unique()[:6])
    write_histories(settings, interactions, users)
    user_rows, item_rows = attribute_frames(USERS, ITEMS)
    write_attributes(feature_store(settings), settings, users=user_rows, items=item_rows)
    deadline = settings.serve.online_read_timeout_s

    with serving_http(settings, uri, timeout=10) as http:
        def answer(user: int) -> tuple[int, dict, float]:
            t0 = time.monotonic()
            r = http.post("/v1/recommendations", json={"user_id": user, "k": 5})
            return r.status_code, r.json() if r.status_code == 200 else {}, time.monotonic() - t0

        def reranked(user: int) -> bool:
            try:
                return answer(user)[1].get("ranker_version") == version
            except httpx.TransportError:
                return False

        def loaded() -> bool:  # both models loaded (the ranker reads nothing until a request comes)
            try:
                ready = http.get("/readyz").status_code == 200
                return ready and f'{{target="{ranker_key(settings.serve.ranker)}"}} {float(version)}' in \
                    http.get("/metrics").text
            except httpx.TransportError:
                return False

        _wait(loaded, 60.0, "the retriever and the attribute ranker loaded")
        time.sleep(1.5)  # past the registry cache's TTL
        with _hung_feast_registry(settings):
            answers, until = [], time.monotonic() + 4.0
            while time.monotonic() < until:  # through a few degrade -> probe -> hang cycles
                answers += [answer(u) for u in users]
            metrics = http.get("/metrics").text
        _wait(lambda: reranked(users[1]), 30.0, "the ranker back once the store answers")

    assert all(status == 200 for status, _, _ in answers), answers
    # a request waits at most the history read's deadline and the attribute read's
    assert max(took for _, _, took in answers) < 2 * deadline + 2.0, [took for _, _, took in answers]
    bodies = [body for _, body, _ in answers]
    assert all(b["ranker_version"] is None for b in bodies)  # no answer claims a ranker that did not rank it
    unranked = [b for b in bodies if b["source"] == "model"]
    assert unranked and all(not b["degraded"] and b["model_version"] is not None for b in unranked)
    assert any(b["degraded"] and b["source"] == "popularity" for b in bodies)  # the timed-out read degraded it
    failures = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("encore_ranker_failures_total "))
    assert failures >= len(unranked) > 0  # each unranked answer counted


def _wait(check, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def test_a_recipe_with_item_vectors_and_no_champion_retriever_fails_saying_so(tmp_path: Path):
    """The vectors come from the @champion retriever: with none registered the job stops with a Dagster failure
    that says what to do, not a bare registry error."""
    from orchestration.assets.ranking import _champion_item_vectors

    settings = small_settings(tmp_path / "encore", ranking={"recipe": "wukong"})
    settings.mlflow_dir.mkdir(parents=True)
    with pytest.raises(dg.Failure, match="promote a retriever first"):
        _champion_item_vectors(settings, f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}")
    uri = f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}"
    version = register_retriever(settings, uri)
    vectors, got = _champion_item_vectors(settings, uri)
    assert got == version and vectors.vectors.shape == (ITEMS, 16) and vectors.source == f"retriever v{version}"
