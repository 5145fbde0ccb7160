"""The live service on real services: a real uvicorn process, tansu broker, MLflow registry, Feast online store.

One small platform (replay → Dagster ingest → Dagster training → champion v1) is shared by the module; each
test starts from it. The fuzz test runs last: it may create experiments and flip the kill switch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from bench.serve import driver_result, spawn_driver
from infra.services import EmbeddedServices
from cli.jobs import run_job
from serving.launch import start_server
from experiments.assignment import default_experiment
from experiments.assignment import assign
from tests.conftest import small_settings

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-0123456789"  # serve.admin_token: the actor 'admin'
NAMED_TOKENS = {"alice": "alice-admin-token-0123456789", "ci": "ci-admin-token-0123456789"}  # serve.admin_tokens
MODEL = "encore-recommender"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    from features.replay import open_source, replay

    settings = small_settings(tmp_path_factory.mktemp("serving") / "encore",
                              serve={"model_poll_s": 0.5, "experiments_poll_s": 0.3, "admin_token": TOKEN,
                                     "admin_tokens": NAMED_TOKENS},
                              # the gate's latency probe is about the model, not this service; the box is shared
                              promotion={"latency_budget_ms": 60_000})
    with EmbeddedServices(settings) as svc:
        replay(open_source("synthetic", settings), svc.kafka_bootstrap, settings.topics.interactions, progress=False)
        run_job(settings, "ingest_job")
        run_job(settings, "training_job")
        server = start_server(settings, svc.kafka_bootstrap, svc.mlflow_uri)
        try:
            yield settings, svc, server
        finally:
            server.stop()


def _post(url: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/recommendations", json=body, timeout=10)


def _user_in(settings, arm: str, start: int) -> int:  # noqa: ANN001
    exp = default_experiment(settings)
    return next(u for u in range(start, start + 10_000) if assign(exp, u) == arm)


def test_fast_feast_path_reads_what_get_online_features_returns(platform):
    from serving.app import HistoryReader

    settings, _, _ = platform
    reader = HistoryReader(settings)
    users = [0, 1, 2, 57, 10_000_000]
    fast, slow = reader.read(users), reader.read_slow(users)
    assert fast == slow
    assert len(fast[0]["item_ids"]) > 0 and fast[10_000_000]["item_ids"] == []


def test_an_event_ingested_seconds_ago_is_visible_and_excluded(platform):
    from features.events import InteractionEvent
    from features.ingest import ingest
    from features.kafka_io import make_producer, publish_events

    settings, svc, server = platform
    user = _user_in(settings, "treatment", 50_000_000)  # a new user in the model arm
    cold = _post(server.endpoint, user_id=user, k=5).json()
    assert cold["source"] == "popularity" and cold["variant"] == "treatment"
    item = cold["items"][0]
    producer = make_producer(svc.kafka_bootstrap)
    publish_events(producer, settings.topics.interactions, [InteractionEvent(
        event_id=uuid.uuid4().hex, user_id=user, item_id=item, event_type="like",
        timestamp_ms=int(time.time() * 1000), played_ratio=1.0)])
    producer.flush()
    producer.close()
    t0 = time.monotonic()
    assert ingest(settings, svc.kafka_bootstrap).written == 1
    warm = _post(server.endpoint, user_id=user, k=5).json()
    assert time.monotonic() - t0 < 30
    assert warm["source"] == "model" and warm["model_version"] == 1
    assert item not in warm["items"] and len(warm["items"]) == 5
    kept = _post(server.endpoint, user_id=user, k=800, exclude_seen=False).json()
    assert item in kept["items"]


def test_concurrent_requests_are_micro_batched_and_all_answered(platform):
    settings, _, server = platform
    users = list(range(40))
    with httpx.Client(base_url=server.endpoint, timeout=10) as http:
        before = _metric(http, "encore_batch_size_count")
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda u: http.post("/v1/recommendations", json={"user_id": u, "k": 7}),
                                    users * 3))
        after = _metric(http, "encore_batch_size_count")
    assert all(a.status_code == 200 for a in answers)
    bodies = [a.json() for a in answers]
    assert all(len(b["items"]) == 7 and len(set(b["items"])) == 7 for b in bodies)
    assert len({b["request_id"] for b in bodies}) == len(bodies)
    # the same user gets the same arm every time
    arms = {}
    for b in bodies:
        assert arms.setdefault(b["user_id"], b["variant"]) == b["variant"]
    assert 0 < after - before <= len(answers)


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _register_again(uri: str, version):  # noqa: ANN001, ANN202 - a second registry version of the same model
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.register_model(version.source, MODEL)


def test_moving_the_champion_alias_under_load_fails_no_request(platform):
    settings, svc, server = platform
    client = MlflowClient(svc.mlflow_uri)
    v1 = client.get_model_version_by_alias(MODEL, "champion")
    v2 = _register_again(svc.mlflow_uri, v1)
    proc = spawn_driver(server.endpoint, rate=100, duration_s=7, warmup_s=0, users=settings.simulator.users,
                        cold_share=0.0, inspect=True, timeout_s=10)
    try:
        time.sleep(2.0)
        client.set_registered_model_alias(MODEL, "champion", v2.version)
        result = driver_result(proc, timeout_s=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result["errors"] == 0, result
    assert result["statuses"] == {"200": 700}
    # both models answered during the run: the swap happened under load
    assert {"1", str(v2.version)} <= set(result["model_versions"]), result
    ready = httpx.get(f"{server.endpoint}/readyz", timeout=5).json()
    assert ready["model_version"] == int(v2.version)


def test_a_service_started_before_the_first_promotion_serves_popularity_until_a_model_arrives(platform):
    """A fresh deployment: replicas come up before any model holds the alias. They stay up (popularity,
    /readyz 503) and pick the model up once the alias points at one, without a restart."""
    from infra.services import free_port, spawn_service, wait_until
    from infra.settings import child_env

    settings, svc, _ = platform
    alias = f"fresh-{uuid.uuid4().hex[:6]}"
    mine = settings.model_copy(update={"registry": settings.registry.model_copy(update={"champion_alias": alias}),
                                       "kafka_bootstrap": svc.kafka_bootstrap, "mlflow_tracking_uri": svc.mlflow_uri})
    port = free_port()
    env = child_env(mine, settings.run_dir / f"serve-{alias}.yaml")
    server = spawn_service(f"serve-{alias}", [sys.executable, "-m", "cli", "serve", "--port", str(port),
                                              "--experiment", "none"], settings,
                           endpoint=f"http://127.0.0.1:{port}", env=env)
    try:
        wait_until(lambda: httpx.get(f"{server.endpoint}/healthz", timeout=1).status_code == 200, timeout_s=120,
                   what="service", proc=server.proc)
        assert httpx.get(f"{server.endpoint}/readyz", timeout=5).status_code == 503
        body = _post(server.endpoint, user_id=1, k=5).json()
        assert body["source"] == "popularity" and len(body["items"]) == 5
        MlflowClient(svc.mlflow_uri).set_registered_model_alias(MODEL, alias, "1")
        wait_until(lambda: httpx.get(f"{server.endpoint}/readyz", timeout=1).status_code == 200, timeout_s=60,
                   what="model pick-up", proc=server.proc)
        assert httpx.get(f"{server.endpoint}/readyz", timeout=5).json()["model_version"] == 1
        assert _post(server.endpoint, user_id=1, k=5).json()["source"] == "model"
    finally:
        server.stop()
        MlflowClient(svc.mlflow_uri).delete_registered_model_alias(MODEL, alias)


def test_invalid_input_is_a_clear_4xx(platform):
    _, _, server = platform
    with httpx.Client(base_url=server.endpoint, timeout=10) as http:
        for bad in ({"user_id": -1}, {"user_id": "x"}, {}, {"user_id": 1, "k": 0}, {"user_id": 1, "k": 1001},
                    {"user_id": 2**63}, {"user_id": 1, "context": {"a": 1}}, {"user_id": 1.5},
                    {"user_id": 1, "exclude_seen": "maybe"}, [1, 2], {"user_id": 1, "extra": True}):
            r = http.post("/v1/recommendations", json=bad)
            assert r.status_code == 422, (bad, r.status_code, r.text)
            assert r.json()["detail"]
        for raw in (b"{nope", b"\xff\xfe", b""):
            r = http.post("/v1/recommendations", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422, (raw, r.status_code)
        assert http.get("/v1/recommendations").status_code == 405
        assert http.get("/healthz").json() == {"status": "ok"}
        assert "encore_batch_size_bucket" in http.get("/metrics").text
        spec = http.get("/openapi.json").json()
        assert {"/v1/recommendations", "/admin/experiments", "/admin/kill"} <= set(spec["paths"])


def test_admin_api_manages_experiments_with_a_token(platform):
    settings, _, server = platform
    auth = {"Authorization": f"Bearer {TOKEN}"}
    new = {"name": "ui-test", "salt": "ui-1", "layer": "ui",
           "variants": [{"name": "a", "weight": 0.5, "target": "version:1"},
                        {"name": "b", "weight": 0.5, "target": "popularity"}]}
    with httpx.Client(base_url=server.endpoint, timeout=20) as http:
        assert http.get("/admin/experiments").status_code == 401
        assert http.get("/admin/experiments", headers={"Authorization": "Bearer wrong"}).status_code == 401
        unknown = {**new, "name": "ui-bad", "variants": [{"name": "a", "weight": 1.0, "target": "alias:nope"}]}
        r = http.post("/admin/experiments", json=unknown, headers=auth)
        assert r.status_code == 422 and "alias:nope" in r.text
        overlap = {**new, "name": "overlap", "layer": "default"}  # the default experiment owns that layer
        assert http.post("/admin/experiments", json=overlap, headers=auth).status_code == 422
        r = http.post("/admin/experiments", json=new, headers=auth)
        assert r.status_code == 201, r.text
        assert http.post("/admin/experiments", json=new, headers=auth).status_code == 409
        body = _post(server.endpoint, user_id=3).json()
        assert {a["experiment"] for a in body["assignments"]} == {settings.experiment.name, "ui-test"}
        assert body["experiment"] == settings.experiment.name  # layers in name order: 'default' < 'ui'
        assert http.post("/admin/experiments/ui-test/pause", headers=auth).json()["status"] == "paused"
        assert [a["experiment"] for a in _post(server.endpoint, user_id=3).json()["assignments"]] == \
            [settings.experiment.name]
        assert http.post("/admin/kill", json={"on": True, "reason": "test"}, headers=auth).status_code == 200
        killed = _post(server.endpoint, user_id=3).json()
        assert killed["assignments"] == [] and killed["variant"] is None and killed["source"] == "model"
        assert http.post("/admin/kill", json={"on": False}, headers=auth).status_code == 200
        assert _post(server.endpoint, user_id=3).json()["variant"] is not None
        detail = http.get("/admin/experiments/ui-test", headers=auth).json()
        assert detail["version"] == 2 and [h["version"] for h in detail["history"]] == [1, 2]
        assert [a["action"] for a in http.get("/admin/audit", headers=auth).json()][-4:] == \
            ["create", "paused", "kill", "unkill"]
        assert http.post("/admin/experiments/nope/stop", headers=auth).status_code == 404


def test_admin_changes_are_audited_under_the_actor_of_the_token(platform):
    settings, _, server = platform
    as_ = {actor: {"Authorization": f"Bearer {token}"} for actor, token in {**NAMED_TOKENS, "admin": TOKEN}.items()}
    new = {"name": "audit-test", "salt": "audit-1", "layer": "audit",
           "variants": [{"name": "a", "weight": 1.0, "target": "popularity"}]}
    with httpx.Client(base_url=server.endpoint, timeout=20) as http:
        assert http.post("/admin/experiments", json=new, headers=as_["alice"]).status_code == 201
        assert http.post("/admin/experiments/audit-test/pause", headers=as_["ci"]).status_code == 200
        assert http.post("/admin/experiments/audit-test/resume", headers=as_["admin"]).status_code == 200
        almost = {"Authorization": f"Bearer {NAMED_TOKENS['alice']}x"}
        assert http.post("/admin/experiments/audit-test/stop", headers=almost).status_code == 401
        detail = http.get("/admin/experiments/audit-test", headers=as_["ci"]).json()
        assert [a["actor"] for a in detail["audit"]] == ["api:alice", "api:ci", "api:admin"]
        assert [h["actor"] for h in detail["history"]] == ["api:alice", "api:ci", "api:admin"]
        assert http.get("/admin/audit", headers=as_["alice"]).json()[-1]["actor"] == "api:admin"


def test_admin_api_refuses_an_experiment_name_that_is_a_path(platform):
    settings, _, server = platform
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.endpoint, timeout=20) as http:
        for name in ("../../escaped", "../escaped", "a/b", ".."):
            body = {"name": name, "salt": "s", "layer": "escape",
                    "variants": [{"name": "a", "weight": 1.0, "target": "popularity"}]}
            r = http.post("/admin/experiments", json=body, headers=auth)
            assert r.status_code == 422 and "experiment name" in r.text, (name, r.status_code, r.text)
        assert http.post("/admin/experiments/..%2F..%2Fescaped/pause", headers=auth).status_code == 404
        assert http.get("/admin/experiments/..%2F..%2Fescaped", headers=auth).status_code == 404
    assert not (settings.root / "escaped").exists() and not (settings.experiments_dir / "escaped").exists()
    assert not (settings.experiments_dir / "versions" / "a").exists()


def test_fuzzing_the_openapi_spec_yields_no_5xx(platform, tmp_path):
    """schemathesis generates requests from the live spec (including the admin API, authenticated)."""
    _, _, server = platform
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis==4.32.5)")
    proc = subprocess.run(
        [exe, "run", f"{server.endpoint}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
         "--seed", "7", "-H", f"Authorization: Bearer {TOKEN}", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "passed" in proc.stdout
    # the service is still healthy afterwards
    assert httpx.get(f"{server.endpoint}/readyz", timeout=5).status_code == 200
    assert json.loads(httpx.get(f"{server.endpoint}/healthz", timeout=5).text)["status"] == "ok"
