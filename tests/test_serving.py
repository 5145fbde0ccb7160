"""The live service on real services: a real uvicorn process, tansu broker, MLflow registry, Feast online store.

One small platform (replay → Dagster ingest → Dagster training → champion v1) is shared by the module; each
test starts from it. The fuzz test runs last: it may create experiments and flip the kill switch.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow import MlflowClient

from bench.serve import driver_result, spawn_driver
from infra.services import EmbeddedServices, frozen
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
        # live first (/healthz), then built (requests answered), then ready once a model holds the alias
        wait_until(lambda: httpx.get(f"{server.endpoint}/healthz", timeout=1).status_code == 200, timeout_s=120,
                   what="service", proc=server.proc)
        wait_until(lambda: _post(server.endpoint, user_id=1, k=5).status_code == 200, timeout_s=120,
                   what="the service built", proc=server.proc)
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


def test_admin_api_returns_the_generated_salt_and_rerandomises_into_a_new_phase(platform):
    _, _, server = platform
    auth = {"Authorization": f"Bearer {TOKEN}"}
    config = {"name": "salted", "layer": "salted",
              "variants": [{"name": "a", "weight": 0.5, "target": "popularity"},
                           {"name": "b", "weight": 0.5, "target": "popularity"}]}
    with httpx.Client(base_url=server.endpoint, timeout=20) as http:
        first = http.post("/admin/experiments", json=config, headers=auth)
        assert first.status_code == 201, first.text
        created = first.json()
        assert len(created["salt"]) == 16 and created["phase"] == 1 and created["version"] == 1
        kept = http.post("/admin/experiments", params={"replace": "true"}, headers=auth,
                         json={**config, "description": "same arms"}).json()
        assert kept["salt"] == created["salt"] and kept["phase"] == 1  # no new arms, no new draw: same phase
        redrawn = http.post("/admin/experiments", params={"replace": "true", "rerandomise": "true"}, headers=auth,
                            json=config).json()
        assert redrawn["salt"] != created["salt"] and redrawn["phase"] == 2
        detail = http.get("/admin/experiments/salted", headers=auth).json()
        assert detail["salt"] == redrawn["salt"] and detail["phase"] == 2
        assert http.post("/admin/experiments/salted/stop", headers=auth).status_code == 200


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


def _exposures_tagged(svc, settings, tag: str, expected: int, timeout_s: float = 30.0) -> list[dict]:  # noqa: ANN001
    """The exposures whose context carries ``run: tag``, once at least ``expected`` have arrived (or the
    deadline passed); read again after that, so that late extra ones are seen too."""
    from features.kafka_io import read_topic

    def read() -> list[dict]:
        rows = [json.loads(m.value) for m in read_topic(svc.kafka_bootstrap, settings.topics.exposures, idle_ms=1500)]
        return [r for r in rows if (r.get("context") or {}).get("run") == tag]

    deadline = time.monotonic() + timeout_s
    rows = read()
    while len(rows) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = read()
    time.sleep(1.0)
    return read()


def test_an_arm_with_a_ranker_reranks_the_retrievers_top_k_and_its_exposures_name_the_ranker(platform):
    import mlflow

    settings, svc, server = platform
    client = MlflowClient(svc.mlflow_uri)
    mlflow.set_tracking_uri(svc.mlflow_uri)
    rankers = settings.registry.ranker_model_name
    champion = client.get_model_version_by_alias(MODEL, "champion")  # the default recipe has the ARGUS head
    ranker = mlflow.register_model(champion.source, rankers)
    client.set_registered_model_alias(rankers, "champion", ranker.version)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    arms = [{"name": "retrieval", "weight": 0.5, "target": "alias:champion"},
            {"name": "cascade", "weight": 0.5, "target": "alias:champion", "ranker": "alias:champion"}]
    # the first layer by name chooses the model (and the ranker): sort before every layer other tests leave running
    exp = {"name": "cascade-test", "salt": "cascade-1", "layer": "a0-cascade", "variants": arms}
    tag = uuid.uuid4().hex
    with httpx.Client(base_url=server.endpoint, timeout=20) as http:
        bad = {**exp, "variants": [{**arms[1], "weight": 1.0, "ranker": "alias:nope"}]}
        r = http.post("/admin/experiments", json=bad, headers=auth)
        assert r.status_code == 422 and "ranker" in r.text and rankers in r.text, r.text
        popular = {**exp, "variants": [{**arms[1], "weight": 1.0, "target": "popularity"}]}
        assert http.post("/admin/experiments", json=popular, headers=auth).status_code == 422
        assert http.post("/admin/experiments", json=exp, headers=auth).status_code == 201
        try:
            # the experiment is held back until the service has tried its models (the ranker is new to it)
            _within(30, lambda: _post(server.endpoint, user_id=0).json()["experiment"] == "cascade-test",
                    "the cascade experiment in force")
            bodies = [_post(server.endpoint, user_id=u, k=5, context={"run": tag}).json()
                      for u in range(settings.simulator.users)]
        finally:
            assert http.post("/admin/experiments/cascade-test/stop", headers=auth).status_code == 200
    by_arm: dict[str, list[dict]] = {}
    for b in bodies:
        if b["source"] == "model":
            by_arm.setdefault(b["variant"], []).append(b)
    assert by_arm.get("cascade") and by_arm.get("retrieval"), {a: len(v) for a, v in by_arm.items()}
    assert {b["ranker_version"] for b in by_arm["cascade"]} == {int(ranker.version)}
    assert {b["ranker_version"] for b in by_arm["retrieval"]} == {None}
    for b in by_arm["cascade"]:
        assert len(b["items"]) == 5 and b["scores"] == sorted(b["scores"], reverse=True)
    exposures = {e["request_id"]: e for e in _exposures_tagged(svc, settings, tag, len(bodies))}
    for b in by_arm["cascade"]:
        e = exposures[b["request_id"]]
        assert e["ranker_version"] == int(ranker.version)
        p = np.array(e["ranker_scores"])  # what placed each item: the ranker's P, beside the retriever's logit
        assert len(p) == 5 and np.all((p > 0) & (p < 1))
    assert all("ranker_scores" not in exposures[b["request_id"]] for b in by_arm["retrieval"])


def test_an_oversized_request_fails_alone_and_exposures_are_logged_exactly_for_200_answers(platform):
    """One request with a huge context among concurrent normal ones: it used to make its exposure larger than
    the Kafka producer accepts, which failed its whole micro-batch (neighbours answered 503, and those served
    before it in the batch had logged exposures for requests answered 503)."""
    from concurrent.futures import ThreadPoolExecutor

    settings, svc, server = platform
    tag = uuid.uuid4().hex
    over_kafka = {"user_id": 7, "k": 5, "context": {"run": tag, "blob": "x" * 1_500_000}}  # > 1 MiB exposure
    over_context = {"user_id": 8, "k": 5, "context": {"run": tag, "blob": "y" * 40_000}}  # within the body limit
    answers: list[tuple[dict, httpx.Response]] = []
    with httpx.Client(base_url=server.endpoint, timeout=30) as http, ThreadPoolExecutor(24) as pool:
        for burst in range(5):
            normal = [{"user_id": (burst * 60 + i) % 80, "k": 5, "context": {"run": tag, "device": "web"}}
                      for i in range(60)]
            bodies = normal[:30] + [over_kafka, over_context] + normal[30:]
            answers += list(zip(bodies, pool.map(lambda b: http.post("/v1/recommendations", json=b), bodies)))
    good = [r for b, r in answers if b is not over_kafka and b is not over_context]
    statuses = [r.status_code for r in good]
    answered = {r.json()["request_id"] for r in good if r.status_code == 200}
    logged = _exposures_tagged(svc, settings, tag, expected=len(answered))
    assert statuses.count(200) == len(good) == 300, {s: statuses.count(s) for s in set(statuses)}
    assert len(logged) == len({e["request_id"] for e in logged})  # one exposure per answer
    assert {e["request_id"] for e in logged} == answered, (
        f"{len(logged)} exposures for {len(answered)} answers; "
        f"{len({e['request_id'] for e in logged} - answered)} of requests not answered 200")
    assert all(e["context"] == {"run": tag, "device": "web"} for e in logged)
    assert {r.status_code for b, r in answers if b is over_kafka} == {413}  # the body limit
    assert {r.status_code for b, r in answers if b is over_context} == {422}  # the context bounds


def test_a_request_whose_exposure_fails_fails_alone_in_its_micro_batch(platform):
    """The micro-batcher in-process on the platform's Feast store, registry and broker: one batch of 12
    requests, one of which cannot log its exposure (as the producer refuses an oversized record). That request
    fails alone and logs nothing; the other 11 are answered and log theirs."""
    import asyncio
    import threading

    from experiments.store import Snapshot
    from serving.app import RecommendationRequest, Recommendations

    settings, svc, _ = platform
    service = Recommendations(settings, svc.kafka_bootstrap, svc.mlflow_uri, static=Snapshot())
    real, sent = service.producer, []

    class RefusingProducer:
        def send(self, topic: str, key: bytes, value: bytes) -> object:
            if key == b"13":
                raise RuntimeError("record refused")
            sent.append(json.loads(value))
            return real.send(topic, key=key, value=value)

    service.producer = RefusingProducer()
    service.models.ensure({service.models.default_target})
    service.refresh_popularity()
    users = list(range(8, 20))

    async def run() -> list:
        tasks = [asyncio.ensure_future(service.submit(RecommendationRequest(user_id=u, k=5))) for u in users]
        # The worker takes everything queued when it wakes, so it is started only once the queue holds all 12
        # jobs: one batch, whatever the scheduling. Each task queues its job the first time the loop runs it;
        # the queue's size, not a count of yields, says when they all have, so a busy box cannot split the batch.
        for _ in range(100):
            if service.queue.qsize() == len(users):
                break
            await asyncio.sleep(0)
        assert service.queue.qsize() == len(users), "the requests were not all queued"
        threading.Thread(target=service._work, daemon=True).start()  # noqa: SLF001
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(run())
    finally:
        service.queue.put(None)
        real.flush(timeout=10)
        real.close(timeout=5)
    batches = service.registry.get_sample_value("encore_batch_size_count")
    assert batches == 1, f"{batches} batches for {service.registry.get_sample_value('encore_batch_size_sum')} requests"
    by_user = dict(zip(users, results))
    assert isinstance(by_user.pop(13), RuntimeError)
    assert all(isinstance(r, bytes) for r in by_user.values()), by_user
    answered = {json.loads(r)["request_id"] for r in by_user.values()}
    assert {e["request_id"] for e in sent} == answered and len(sent) == len(answered) == 11
    assert sum(service.registry.get_sample_value("encore_requests_total", {"variant": "none", "source": s}) or 0
               for s in ("model", "popularity")) == 11


def _raw_status(endpoint: str, payload: bytes) -> bytes:
    """The status line the service answers to ``payload`` sent as is on a fresh connection."""
    url = httpx.URL(endpoint)
    with socket.create_connection((url.host, url.port), timeout=15) as conn:
        try:
            conn.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) before everything was sent: the answer is still there to read
        received = b""
        while b"\r\n" not in received:
            chunk = conn.recv(4096)
            if not chunk:
                break
            received += chunk
    return received.split(b"\r\n", 1)[0]


def test_a_body_over_the_limit_is_answered_413_before_it_is_read(platform):
    settings, _, server = platform
    limit = settings.serve.max_body_bytes
    head = (b"POST /v1/recommendations HTTP/1.1\r\nHost: encore\r\nContent-Type: application/json\r\n")
    # a declared 300 MB body, of which 1 KiB is sent: the answer comes without waiting for the rest
    declared = head + b"Content-Length: 300000000\r\n\r\n" + b'{"user_id": 1, "pad": "' + b"x" * 1000
    assert _raw_status(server.endpoint, declared).split()[1] == b"413"
    # no length (chunked): counted as it streams in; the chunk that crosses the limit is answered 413
    chunk = b"x" * 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 1))
    streamed = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks  # never finished
    assert _raw_status(server.endpoint, streamed).split()[1] == b"413"
    with httpx.Client(base_url=server.endpoint, timeout=10) as http:
        r = http.post("/v1/recommendations", content=b"{" + b" " * limit, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
        # up to the limit, a body is read: whitespace padding is still valid JSON
        body = b'{"user_id": 1, "k": 3}'
        r = http.post("/v1/recommendations", content=body + b" " * (limit - len(body)),
                      headers={"content-type": "application/json"})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        spec = http.get("/openapi.json").json()
        assert "413" in spec["paths"]["/v1/recommendations"]["post"]["responses"]


def test_request_types_are_strict_and_undecodable_bodies_a_documented_422(platform):
    _, _, server = platform
    with httpx.Client(base_url=server.endpoint, timeout=10) as http:
        for bad in ({"user_id": True}, {"user_id": False}, {"user_id": "5"}, {"user_id": 5.5},
                    {"user_id": 1, "k": "5"}, {"user_id": 1, "k": True}, {"user_id": 1, "k": 5.5},
                    {"user_id": 1, "exclude_seen": 0}, {"user_id": 1, "exclude_seen": 1},
                    {"user_id": 1, "exclude_seen": "true"}, {"user_id": 1, "exclude_seen": None},
                    {"user_id": 1, "context": {"device": 1}}, {"user_id": 1, "context": {"device": True}},
                    {"user_id": 1, "context": {"": "x"}}, {"user_id": 1, "context": {"k" * 65: "x"}},
                    {"user_id": 1, "context": {"a": "x" * 257}},
                    {"user_id": 1, "context": {f"key{i}": "x" for i in range(33)}},
                    {"user_id": 1, "context": {f"key{i}": "x" * 200 for i in range(11)}}):  # 2,233 characters
            r = http.post("/v1/recommendations", json=bad)
            assert r.status_code == 422, (bad, r.status_code, r.text)
        ok = http.post("/v1/recommendations", json={"user_id": 1, "k": 3, "exclude_seen": False,
                                                    "context": {f"key{i}": "x" * 200 for i in range(10)}})
        assert ok.status_code == 200, ok.text
        # 5.0 is an integer to JSON Schema (the spec's "integer") and to ingest: served as 5
        integral = http.post("/v1/recommendations", json={"user_id": 5.0, "k": 3.0})
        assert integral.status_code == 200 and integral.json()["user_id"] == 5 and len(integral.json()["items"]) == 3
        for raw in (b'{"user_id": 1, "context": {"device": "\xff"}}', b'{"user_id": 1, "k": 3}\xc3\x28',
                    b"[" * 5000, b'{"user_id": ' + b"9" * 5000 + b"}"):
            r = http.post("/v1/recommendations", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422, (raw[:40], r.status_code, r.text)
            assert r.json()["detail"][0]["type"] == "json_invalid"
        post = http.get("/openapi.json").json()["paths"]["/v1/recommendations"]["post"]
        assert {"200", "413", "422", "503"} <= set(post["responses"])
        schema = http.get("/openapi.json").json()["components"]["schemas"]["RecommendationRequest"]
        bounded = next(s for s in schema["properties"]["context"]["anyOf"] if s.get("type") == "object")
        assert bounded["maxProperties"] == 32 and bounded["additionalProperties"]["maxLength"] == 256
        assert bounded["propertyNames"] == {"minLength": 1, "maxLength": 64}


@contextmanager
def _frozen_mlflow(svc):  # noqa: ANN001, ANN202
    """The module's MLflow server hung (SIGSTOP on its process group: the server and its workers): connections
    are accepted by the kernel and never answered, the worst case for a client. Always resumed on exit."""
    server = next(p for p in svc.started if p.name == "mlflow")
    with frozen(server):
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"{server.endpoint}/health", timeout=1)
        yield server


def _within(seconds: float, check, what: str) -> float:  # noqa: ANN001
    """Seconds until ``check()`` holds; fails if it does not hold within ``seconds``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_the_kill_switch_takes_effect_within_seconds_while_the_registry_hangs(platform):
    """The kill switch (as `encore ab kill` flips it, in the store) must not wait on MLflow: with the registry
    hung while the model thread is inside a registry call, it is in force within 2 s, and so is turning it off."""
    from experiments.store import ExperimentStore

    settings, svc, server = platform
    store = ExperimentStore(settings.experiments_dir)
    user = _user_in(settings, "treatment", 60_000_000)

    def variant() -> str | None:  # the user's arm of the default experiment (earlier tests may add others)
        r = _post(server.endpoint, user_id=user, k=5)
        assert r.status_code == 200, r.text
        arms = [a["variant"] for a in r.json()["assignments"] if a["experiment"] == settings.experiment.name]
        return arms[0] if arms else None

    assert variant() == "treatment"
    with _frozen_mlflow(svc):
        time.sleep(3 * settings.serve.model_poll_s + 0.5)  # the model thread is now waiting on the registry
        try:
            store.set_kill(True, actor="test", reason="registry hang drill")
            took = _within(2.0, lambda: variant() is None, "kill switch with MLflow hung")
            assert _post(server.endpoint, user_id=user, k=5).json()["assignments"] == []
        finally:
            store.set_kill(False, actor="test")
        _within(2.0, lambda: variant() == "treatment", "kill switch off with MLflow hung")
        # the replica keeps serving the model it has and stays ready
        assert httpx.get(f"{server.endpoint}/readyz", timeout=2).status_code == 200
    assert took < 2.0
    print(f"kill switch in force {took:.2f} s after it was set, with MLflow hung")


@contextmanager
def _locked_online_store(settings):  # noqa: ANN001, ANN202
    """Another process's exclusive lock on the SQLite online store: every read waits (SQLite's busy wait is
    5 s) and then fails: a slow store, then a failing one."""
    import sqlite3

    conn = sqlite3.connect(settings.feast_dir / "online.db", timeout=1, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@contextmanager
def _truncated_online_store(settings):  # noqa: ANN001, ANN202
    """The online store's file truncated to nothing, then its bytes written back (the same file)."""
    path = settings.feast_dir / "online.db"
    saved = path.read_bytes()
    with path.open("r+b") as f:
        f.truncate(0)
    try:
        yield
    finally:
        with path.open("r+b") as f:
            f.write(saved)


def test_an_unreadable_online_store_degrades_to_popularity_and_recovers_without_restart(platform):
    """A slow or unreadable online store used to answer 503 (about 5 s each, one after the other) with
    /readyz 200, and a replica whose SQLite file was truncated and restored never recovered. Now every
    request is answered 200 from popularity marked degraded, within the read deadline, /readyz says why it
    is not ready, and the replica serves histories again once the store reads, without a restart."""
    from experiments.store import ExperimentStore

    settings, _, server = platform
    url = server.endpoint
    _within(60.0, lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, "the model loaded")
    # the kill switch sends every user to the default model, whatever experiments earlier tests left running
    store = ExperimentStore(settings.experiments_dir)
    store.set_kill(True, actor="test", reason="online store drill")
    try:
        _within(5.0, lambda: _post(url, user_id=0, k=5).json()["assignments"] == [], "kill switch")
        user = next(u for u in range(500) if _post(url, user_id=u, k=5).json()["source"] == "model")
        _online_store_drill(settings, url, user)
    finally:
        store.set_kill(False, actor="test")


def _online_store_drill(settings, url: str, user: int) -> None:  # noqa: ANN001
    from concurrent.futures import ThreadPoolExecutor

    deadline = settings.serve.online_read_timeout_s

    def answer(user: int) -> tuple[int, bool | None, float]:
        t0 = time.monotonic()
        r = _post(url, user_id=user, k=5)
        return r.status_code, r.json().get("degraded") if r.status_code == 200 else None, time.monotonic() - t0

    def healthy() -> bool:
        return answer(user)[1] is False and httpx.get(f"{url}/readyz", timeout=5).status_code == 200

    before = _post(url, user_id=user, k=5).json()
    assert before["degraded"] is False and before["source"] == "model"
    for outage in (_locked_online_store, _truncated_online_store):
        with outage(settings):
            with ThreadPoolExecutor(8) as pool:  # requests in flight together, as under load
                answers = list(pool.map(answer, [user, user + 1, user + 2, user + 3] * 6))
            assert all(status == 200 for status, _, _ in answers), answers
            assert all(degraded for _, degraded, _ in answers[-8:]), answers  # all, once the first read failed
            # the deadline bounds a request's wait: no request sits behind a read SQLite keeps waiting on
            assert max(took for _, _, took in answers) < deadline + 3.0, answers
            body = _post(url, user_id=user, k=5).json()
            assert body["source"] == "popularity" and body["degraded"] is True and body["model_version"] is None
            ready = httpx.get(f"{url}/readyz", timeout=5)
            assert ready.status_code == 503 and "online store" in ready.json()["detail"], ready.text
            assert "encore_online_store_up 0.0" in httpx.get(f"{url}/metrics", timeout=5).text
        took = _within(20.0, healthy, f"recovery after {outage.__name__}")
        print(f"{outage.__name__}: {len(answers)} answers, all 200 and degraded; recovered {took:.1f} s after")
    after = _post(url, user_id=user, k=5).json()
    assert after["source"] == "model" and after["items"] == before["items"]
    assert "encore_degraded_answers_total" in httpx.get(f"{url}/metrics", timeout=5).text


def test_a_service_started_while_the_registry_hangs_is_live_at_once_and_ready_once_it_answers(platform):
    """A replica started during an MLflow outage used to answer nothing (not even /healthz) while the MLflow
    client retried at start-up, so a liveness probe restarted it. Now it listens at once, answers from
    popularity with /readyz 503, and picks the model up once MLflow answers again."""
    from infra.services import free_port, spawn_service, wait_until
    from infra.settings import child_env

    settings, svc, _ = platform
    mine = settings.model_copy(update={"kafka_bootstrap": svc.kafka_bootstrap, "mlflow_tracking_uri": svc.mlflow_uri})
    port = free_port()
    env = child_env(mine, settings.run_dir / "serve-hung-registry.yaml")
    with _frozen_mlflow(svc):
        t0 = time.monotonic()
        server = spawn_service("serve-hung-registry", [sys.executable, "-m", "cli", "serve", "--port", str(port),
                                                       "--experiment", "none"], settings,
                               endpoint=f"http://127.0.0.1:{port}", env=env)
        try:
            # the server listens before the service is imported (serving.boot): the bound is the interpreter
            # start-up and the CLI's imports on a shared box. MLflow's client, which the old start-up waited
            # on, alone waits 120 s per attempt
            wait_until(lambda: httpx.get(f"{server.endpoint}/healthz", timeout=1).status_code == 200,
                       timeout_s=20, what="/healthz with MLflow hung", proc=server.proc)
            up_s = time.monotonic() - t0
            # the service is built behind it (imports): until then requests are a 503 that says so
            early = _post(server.endpoint, user_id=1, k=5)
            assert early.status_code == 200 or "starting" in early.text, early.text
            wait_until(lambda: _post(server.endpoint, user_id=1, k=5).status_code == 200, timeout_s=60,
                       what="the service built", proc=server.proc)
            for _ in range(3):  # and it keeps answering at once, whatever the model thread waits on
                t1 = time.monotonic()
                assert httpx.get(f"{server.endpoint}/healthz", timeout=5).status_code == 200
                assert time.monotonic() - t1 < 5
                ready = httpx.get(f"{server.endpoint}/readyz", timeout=5)
                assert ready.status_code == 503 and ("model not loaded" in ready.text or "starting" in ready.text)
                body = _post(server.endpoint, user_id=1, k=5)
                assert body.status_code == 200 and body.json()["source"] == "popularity", body.text
                time.sleep(1.0)
            # after the first registry attempt timed out, /readyz says why it is not ready
            wait_until(lambda: "registry" in httpx.get(f"{server.endpoint}/readyz", timeout=2).text,
                       timeout_s=30, what="/readyz naming the registry", proc=server.proc)
        except BaseException:
            server.stop()
            raise
    try:
        wait_until(lambda: httpx.get(f"{server.endpoint}/readyz", timeout=1).status_code == 200, timeout_s=60,
                   what="model pick-up after MLflow answers again", proc=server.proc)
        assert _post(server.endpoint, user_id=1, k=5).json()["source"] == "model"
    finally:
        server.stop()
    print(f"/healthz answered {up_s:.1f} s after spawning the service with MLflow hung")


def test_fuzzing_the_openapi_spec_with_every_check_finds_nothing(platform, tmp_path):
    """schemathesis runs all its checks over the live spec: no 5xx, only documented statuses, content types,
    headers and bodies, schema-invalid input refused and schema-valid input accepted, auth enforced. Once with the
    admin token (the admin API's logic) and once without (what each route answers an anonymous caller)."""
    _, _, server = platform
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis==4.32.5)")
    config = Path(__file__).with_name("schemathesis.toml")
    for who, headers in (("admin", ["-H", f"Authorization: Bearer {TOKEN}"]), ("anonymous", [])):
        proc = subprocess.run(
            [exe, "--config-file", str(config), "run", f"{server.endpoint}/openapi.json", "--checks", "all",
             "--max-examples", "25", "--seed", "7", *headers, "--report-dir", str(tmp_path / who)],
            capture_output=True, text=True, timeout=400,
        )
        assert proc.returncode == 0, (who, proc.stdout[-4000:])
        assert "passed" in proc.stdout
    # the service is still healthy afterwards
    assert httpx.get(f"{server.endpoint}/readyz", timeout=5).status_code == 200
    assert json.loads(httpx.get(f"{server.endpoint}/healthz", timeout=5).text)["status"] == "ok"
