"""The production profile against real servers: Redis (Feast online store), PostgreSQL (Feast registry,
MLflow backend store, Dagster instance storage) and a Kafka-protocol broker, all on 127.0.0.1.

The same ``encore`` commands run as in the local profile; only configuration changes (environment here).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis as redis_client

from features.feature_repo import feature_store
from features.ingest import HISTORY_FEATURES, ingest
from features.kafka_io import make_producer, publish_events
from features.simulator import MusicWorld
from infra.services import EmbeddedServices, start_mlflow
from infra.settings import EncoreSettings
from tests.conftest import small_settings
from tests.servers import PASSWORD, Postgres, Redis, start_postgres, start_redis

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
_db_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def redis_server():
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres_server():
    server = start_postgres()
    yield server
    server.stop()


def fresh_database(pg: Postgres, prefix: str) -> str:
    name = f"{prefix}_{next(_db_numbers)}"
    pg.psql("postgres", f"CREATE DATABASE {name}")
    return name


def production_overrides(redis: Redis, pg: Postgres, redis_db: int) -> dict:
    """Everything the production profile needs besides Kafka and MLflow, each test on fresh databases."""
    return {
        "feast": {"redis": f"{redis.connection_string},db={redis_db}",
                  "registry": pg.url(fresh_database(pg, "feast"), "postgresql+psycopg")},
        "dagster": {"postgres_url": pg.url(fresh_database(pg, "dagster"))},
    }


def test_the_iceberg_catalog_lives_in_postgres_and_hosts_that_share_it_fence_each_other(postgres_server, tmp_path):
    """The production catalog (#39): PostgreSQL, shared by ingest hosts that share nothing else but the warehouse."""
    from features.iceberg_store import Fenced, IcebergStore
    from features.offline_read import read_interactions
    from tests.test_iceberg_store import GROUP, TOPIC, staged

    database = fresh_database(postgres_server, "iceberg")
    url = postgres_server.url(database, "postgresql+psycopg")

    def host(name: str) -> EncoreSettings:
        return EncoreSettings(data_dir=tmp_path / name, offline={
            "backend": "iceberg", "catalog_url": url, "warehouse": str(tmp_path / "warehouse"), "commit_retries": 5})

    a, b = IcebergStore(host("a")), IcebergStore(host("b"))
    a.append_batch(staged(range(0, 10), 0), {0: 10}, group=GROUP, topic=TOPIC, expected={0: None})
    b.append_batch(staged(range(100, 105), 1), {1: 105}, group=GROUP, topic=TOPIC, expected={1: None})
    assert b.recorded_offsets(GROUP, TOPIC, [0, 1]) == {0: 10, 1: 105}  # each host sees the other's commits
    with pytest.raises(Fenced):  # a stale writer of partition 0 on the other host stores nothing
        b.append_batch(staged(range(10, 14), 0), {0: 14}, group=GROUP, topic=TOPIC, expected={0: None})
    stored = read_interactions(host("reader"), columns=["event_id"])["event_id"]
    assert sorted(stored) == sorted([f"e{i}" for i in range(10)] + [f"e{i}" for i in range(100, 105)])
    # the catalog is PostgreSQL's, not a file on either host
    assert "interactions" in postgres_server.psql(database, "SELECT table_name FROM iceberg_tables")
    assert not list(tmp_path.glob("*/**/*.sqlite"))


def redis_keys(redis: Redis, db: int) -> int:
    return redis_client.Redis(host="127.0.0.1", port=redis.port, password=PASSWORD, db=db).dbsize()


def test_production_profile_names_every_missing_endpoint():
    with pytest.raises(ValueError) as err:
        EncoreSettings(profile="production", kafka_bootstrap="kafka:9092")
    message = str(err.value)
    for name in ("ENCORE_MLFLOW_TRACKING_URI", "ENCORE_FEAST__REDIS", "ENCORE_FEAST__REGISTRY",
                 "ENCORE_DAGSTER__POSTGRES_URL"):
        assert name in message
    assert "ENCORE_KAFKA_BOOTSTRAP" not in message


def test_secrets_are_masked_in_repr_but_reach_child_processes(redis_server, postgres_server, tmp_path):
    settings = small_settings(tmp_path / "encore", **production_overrides(redis_server, postgres_server, 1))
    assert PASSWORD not in repr(settings)
    assert EncoreSettings(**json.loads(settings.model_dump_json())).feast.redis == settings.feast.redis


def test_feast_pushes_to_redis_and_keeps_its_registry_in_postgres(broker, redis_server, postgres_server):
    settings, bootstrap = broker
    db = 2
    settings = small_settings(settings.root, **production_overrides(redis_server, postgres_server, db))
    world = MusicWorld(settings.simulator)
    events = list(world.history())[:1500]
    producer = make_producer(bootstrap)
    publish_events(producer, settings.topics.interactions, events)
    producer.flush()
    producer.close()

    report = ingest(settings, bootstrap)

    assert report.written == len(events) and report.dlq == 0
    assert redis_keys(redis_server, db) > 0
    # nothing fell back to the local SQLite files
    assert not (settings.feast_dir / "online.db").exists() and not (settings.feast_dir / "registry.db").exists()
    # a new client (as a serving replica would be) finds the views in the PostgreSQL registry ...
    store = feature_store(settings, apply=False)
    assert {v.name for v in store.list_feature_views()} >= {"user_history", "user_stats", "item_stats"}
    # ... and reads each user's history from Redis, oldest first, as long as the offline store says
    user = events[0].user_id
    mine = sorted((e for e in events if e.user_id == user), key=lambda e: e.timestamp_ms)
    online = store.get_online_features(HISTORY_FEATURES, [{"user_id": user}]).to_dict()
    assert online["item_ids"][0] == [e.item_id for e in mine][-settings.ingest.history_length:]
    assert online["timestamps_ms"][0] == sorted(online["timestamps_ms"][0])


@pytest.fixture(scope="module")
def production_platform(redis_server, postgres_server, tmp_path_factory):
    """`encore run` (the main job) in the production profile: nothing embedded, every endpoint external.

    The test plays the operator: it runs the Kafka-protocol broker and an MLflow server on PostgreSQL, as a
    deployment would run them as their own services, then hands their addresses to Encore by environment.
    """
    root = tmp_path_factory.mktemp("prod")
    ops = small_settings(root / "ops", mlflow_backend_store_uri=postgres_server.url(fresh_database(postgres_server,
                                                                                                   "mlflow")))
    with EmbeddedServices(ops, with_mlflow=False) as kafka:
        mlflow = start_mlflow(ops)
        try:
            overrides = production_overrides(redis_server, postgres_server, 3)
            env = {k: v for k, v in os.environ.items() if not k.startswith("ENCORE_")}
            env.update({
                "ENCORE_PROFILE": "production",
                "ENCORE_KAFKA_BOOTSTRAP": kafka.kafka_bootstrap,
                "ENCORE_MLFLOW_TRACKING_URI": mlflow.endpoint,
                "ENCORE_FEAST__REDIS": overrides["feast"]["redis"],
                "ENCORE_FEAST__REGISTRY": overrides["feast"]["registry"],
                "ENCORE_DAGSTER__POSTGRES_URL": overrides["dagster"]["postgres_url"],
                # the scale-out offline store (#39): Iceberg tables, their catalog on PostgreSQL (the local
                # profile's tests keep the Parquet store, so both backends run the main job)
                "ENCORE_OFFLINE__BACKEND": "iceberg",
                "ENCORE_OFFLINE__CATALOG_URL": postgres_server.url(fresh_database(postgres_server, "iceberg"),
                                                                   "postgresql+psycopg"),
            })
            # the sizes of the test platform, as a YAML file (the third settings source)
            sizes = small_settings(root / "encore").model_dump(mode="json", include={
                "data_dir", "simulator", "train", "experiment", "ingest"})
            (root / "encore.yaml").write_text(json.dumps(sizes))
            env["ENCORE_CONFIG"] = str(root / "encore.yaml")

            def encore(*args: str, check: bool = True) -> subprocess.CompletedProcess:
                return subprocess.run([str(Path(sys.executable).with_name("encore")), *args], env=env, cwd=REPO,
                                      capture_output=True, text=True, timeout=900, check=check)

            run = encore("run", "--fresh", "--no-progress", check=False)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            yield {"encore": encore, "env": env, "run": run, "settings": small_settings(root / "encore"),
                   "overrides": overrides, "redis_db": 3, "mlflow": mlflow.endpoint}
        finally:
            mlflow.stop()


def test_the_main_job_runs_end_to_end_in_the_production_profile(production_platform, postgres_server,
                                                                 redis_server):
    summary = json.loads((production_platform["settings"].reports_dir / "last_run.json").read_text())
    assert summary["ingest"]["written"] == summary["replayed"] > 1000 and summary["ingest"]["dlq"] == 3
    assert summary["ab_traffic"]["errors"] == 0 and summary["feedback_ingest"]["written"] > 0
    # the stores are the external servers, not files under the data dir
    root = production_platform["settings"].root
    assert not list(root.rglob("*.db")) and not list(root.rglob("online.db"))
    assert redis_keys(redis_server, production_platform["redis_db"]) > 0
    dagster_db = production_platform["overrides"]["dagster"]["postgres_url"].rsplit("/", 1)[1]
    runs = [row.split(":") for row in postgres_server.psql(dagster_db, "SELECT pipeline_name || ':' || status FROM runs").split()]
    # ingest, train, ingest, report succeed; the ranking job trains and evaluates a ranker, and its run fails only
    # when the ranker gate (a blocking check) blocked it, which at this tiny size it may
    ranker = summary["ranker"]
    assert "auc" in ranker and ranker.get("gate"), ranker
    allowed = {"ranking_job": {"SUCCESS", "FAILURE"} if ranker["gate"].startswith("blocked") else {"SUCCESS"}}
    assert len(runs) >= 5 and all(status in allowed.get(job, {"SUCCESS"}) for job, status in runs), runs
    feast_db = production_platform["overrides"]["feast"]["registry"].rsplit("/", 1)[1]
    assert int(postgres_server.psql(feast_db, "SELECT count(*) FROM feature_views")) >= 3
    # the system of record is the Iceberg table whose catalog PostgreSQL holds; no Parquet store was written
    iceberg_db = production_platform["env"]["ENCORE_OFFLINE__CATALOG_URL"].rsplit("/", 1)[1]
    assert "interactions" in postgres_server.psql(iceberg_db, "SELECT table_name FROM iceberg_tables")
    assert not list(production_platform["settings"].offline_dir.glob("date=*/*.parquet"))


def test_the_registry_lives_in_postgres_and_the_same_commands_read_it(production_platform, postgres_server):
    mlflow_dbs = [d for d in postgres_server.psql("postgres", "SELECT datname FROM pg_database").split()
                  if d.startswith("mlflow_")]
    aliases = [postgres_server.psql(d, "SELECT alias || ':' || version FROM registered_model_aliases") for d in mlflow_dbs]
    assert "champion:1" in "\n".join(aliases)
    listing = production_platform["encore"]("models", "list")
    assert "champion" in listing.stdout and listing.returncode == 0
    status = production_platform["encore"]("services", "status")
    assert production_platform["mlflow"] in status.stdout


def test_a_replica_whose_redis_hangs_answers_degraded_and_recovers_when_it_answers(production_platform,
                                                                                   redis_server):
    """Redis hung (SIGSTOP: connections accepted, never answered, the worst case for a client without a
    socket timeout): requests are answered from popularity marked degraded within the read deadline and
    /readyz answers 503; once Redis answers again the replica reads histories again, without a restart."""
    import signal
    import time

    import httpx

    from infra.services import free_port, spawn_service, wait_until

    settings = production_platform["settings"]
    port = free_port()
    server = spawn_service("serve-redis-hang", [str(Path(sys.executable).with_name("encore")), "serve", "--port",
                                                str(port), "--experiment", "none"], settings,
                           endpoint=f"http://127.0.0.1:{port}", env=production_platform["env"])

    def answer() -> dict:
        r = httpx.post(f"{server.endpoint}/v1/recommendations", json={"user_id": 0, "k": 5}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    try:
        wait_until(lambda: httpx.get(f"{server.endpoint}/readyz", timeout=2).status_code == 200, timeout_s=120,
                   what="the replica ready", proc=server.proc)
        assert answer()["degraded"] is False
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            first = answer()
            took = time.monotonic() - t0
            assert first["degraded"] is True and first["source"] == "popularity"
            assert took < 3.0, took  # the read deadline (0.25 s) and the request's own work
            assert all(answer()["degraded"] for _ in range(5))
            ready = httpx.get(f"{server.endpoint}/readyz", timeout=5)
            assert ready.status_code == 503 and "online store" in ready.text
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        wait_until(lambda: answer()["degraded"] is False, timeout_s=30, what="recovery once Redis answers",
                   proc=server.proc)
        assert httpx.get(f"{server.endpoint}/readyz", timeout=5).status_code == 200
    finally:
        server.stop()


def test_a_half_configured_production_profile_fails_with_the_missing_names():
    result = subprocess.run([str(Path(sys.executable).with_name("encore")), "models", "list"],
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("ENCORE_")},
                                 "ENCORE_PROFILE": "production"}, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ENCORE_FEAST__REDIS" in result.stderr and "Traceback" not in result.stderr


def test_the_dagster_daemon_on_postgres_runs_the_lag_sensor_and_its_ingest_run(broker, redis_server,
                                                                              postgres_server):
    """Production runs sensors and schedules in ``dagster-daemon``; here it evaluates ``ingest_on_lag``,
    which launches an ingest run (DefaultRunLauncher) that drains the topic into Feast."""
    import time

    from infra.settings import child_env
    from cli.jobs import dagster_instance

    settings, bootstrap = broker
    settings = small_settings(settings.root, kafka_bootstrap=bootstrap,
                              **production_overrides(redis_server, postgres_server, 4))
    events = list(MusicWorld(settings.simulator).history())[:500]
    producer = make_producer(bootstrap)
    publish_events(producer, settings.topics.interactions, events)
    producer.flush()
    producer.close()

    dagster_instance(settings)  # writes dagster.yaml (PostgreSQL storage) under the data dir
    env = {**child_env(settings, settings.root / "daemon.yaml"), "DAGSTER_HOME": str(settings.dagster_home)}
    bindir = Path(sys.executable).parent
    started = subprocess.run([str(bindir / "dagster"), "sensor", "start", "ingest_on_lag", "-m",
                              "orchestration.definitions"], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    log = (settings.root / "daemon.log").open("w")
    daemon = subprocess.Popen([str(bindir / "dagster-daemon"), "run", "-m", "orchestration.definitions"], env=env,
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    db = settings.dagster.postgres_url.get_secret_value().rsplit("/", 1)[1]
    try:
        deadline = time.monotonic() + 240
        statuses: list[str] = []
        while time.monotonic() < deadline and "SUCCESS" not in statuses:
            assert daemon.poll() is None, (settings.root / "daemon.log").read_text()[-3000:]
            statuses = postgres_server.psql(db, "SELECT status FROM runs").split()
            assert "FAILURE" not in statuses, (settings.root / "daemon.log").read_text()[-3000:]
            time.sleep(2)
        assert statuses == ["SUCCESS"], (settings.root / "daemon.log").read_text()[-3000:]
    finally:
        os.killpg(daemon.pid, 15)
        daemon.wait(timeout=60)
        log.close()
    sensor_ticks = postgres_server.psql(db, "SELECT count(*) FROM job_ticks")
    assert int(sensor_ticks) >= 1
    store = feature_store(settings, apply=False)
    user = events[0].user_id
    online = store.get_online_features(HISTORY_FEATURES, [{"user_id": user}]).to_dict()
    assert online["item_ids"][0][-1] == [e.item_id for e in events if e.user_id == user][-1]
