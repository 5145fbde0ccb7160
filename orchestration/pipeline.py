"""The end-to-end road, as ``encore run`` (and ``make run``) drives it.

replay → Kafka → Dagster ``ingest_job`` (Feast offline + online) → Dagster ``training_job`` (snapshot →
TorchRec model → MLflow run + registry → promotion gate) → ``encore serve`` (a real HTTP server) →
simulated users under a two-arm A/B split call it and react → their feedback returns through Kafka →
``ingest_job`` again → ``ab_report_job`` (per-arm metrics with confidence intervals).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import httpx
from tqdm import tqdm

from infra.services import EmbeddedServices, ManagedProcess, free_port, spawn_service, wait_until
from infra.settings import EncoreSettings, child_env, write_private_file

log = logging.getLogger("encore.run")


def dagster_instance(settings: EncoreSettings) -> dg.DagsterInstance:
    """The persistent Dagster instance of these settings, so runs launched here show up in the UI.

    Its ``dagster.yaml`` lives under the data dir and is written from the settings: SQLite storage there
    (local), or with ``dagster.postgres_url`` set, dagster-postgres storage shared with the deployed webserver
    and daemon (production).
    """
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    text = instance_yaml(settings)
    if not path.exists() or path.read_text() != text:
        write_private_file(path, text)  # may hold a database password
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def psycopg2_url(url: str) -> str:
    """dagster-postgres sends statements (``NOTIFY run_events, %(id)s``) that only psycopg2's client-side
    parameter binding accepts, while SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3: pin the driver."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if sep and scheme in ("postgresql", "postgres") else url


def instance_yaml(settings: EncoreSettings) -> str:
    import yaml

    config: dict = {"telemetry": {"enabled": False}}
    if settings.dagster.postgres_url is not None:
        config["storage"] = {"postgres": {"postgres_url": psycopg2_url(settings.dagster.postgres_url.get_secret_value())}}
    header = "# Written by Encore from its settings (ENCORE_DAGSTER__*); edits here are overwritten.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def run_job(settings: EncoreSettings, job_name: str, instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    from orchestration.definitions import defs
    from orchestration.resources import encore_resource

    instance = instance or dagster_instance(settings)
    job = defs.resolve_job_def(job_name)
    log.info("Dagster: running %s", job_name)
    result = job.execute_in_process(
        instance=instance,
        resources={"encore": encore_resource(settings)},
        # Dagster's console logger narrates every engine event at DEBUG; assets' own logs are INFO.
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        raise_on_error=True,
    )
    return result


def start_server(settings: EncoreSettings, kafka: str, mlflow_uri: str) -> ManagedProcess:
    """``encore serve`` as a real HTTP server in its own process, tracked like the other services."""
    port = settings.serve.port or free_port()
    # The server runs with exactly this run's settings (tests and callers may have built them in code).
    env = child_env(settings.model_copy(update={"kafka_bootstrap": kafka, "mlflow_tracking_uri": mlflow_uri}),
                    settings.run_dir / "serve-settings.yaml")
    cmd = [sys.executable, "-m", "orchestration.cli", "serve", "--port", str(port), "--experiment", "default"]
    server = spawn_service("serve", cmd, settings, endpoint=f"http://127.0.0.1:{port}", env=env)
    try:
        wait_until(lambda: httpx.get(f"{server.endpoint}/readyz", timeout=1).status_code == 200, timeout_s=120,
                   what="recommendation service", proc=server.proc)
    except Exception:
        server.stop()
        raise
    log.info("recommendation service on %s", server.endpoint)
    return server


def closed_loop(settings: EncoreSettings, url: str, kafka: str, *, progress: bool = True) -> dict:
    """Simulated users call the live service, react to what they see, and their events go to Kafka."""
    from features.kafka_io import make_producer, publish_events
    from features.simulator import MusicWorld

    world = MusicWorld(settings.simulator)
    exp = settings.experiment
    users = list(world.users)[: exp.users]
    producer = make_producer(kafka, **settings.kafka.client_options())
    counts = {"requests": 0, "errors": 0, "events": 0}

    def one_user(user_id: int) -> tuple[int, int, int]:
        requests = errors = events = 0
        with httpx.Client(base_url=url, timeout=10) as client:
            for r in range(exp.requests_per_user):
                resp = client.post("/v1/recommendations", json={"user_id": int(user_id), "k": 10})
                requests += 1
                if resp.status_code != 200:
                    errors += 1
                    continue
                body = resp.json()
                now_ms = int(time.time() * 1000)
                reactions = world.respond(int(user_id), body["items"], request_id=body["request_id"],
                                          variant=body["variant"] or "none", now_ms=now_ms)
                events += publish_events(producer, settings.topics.interactions, reactions)
        return requests, errors, events

    with ThreadPoolExecutor(max_workers=8) as pool:
        for req, err, ev in tqdm(pool.map(one_user, users), total=len(users), desc="simulated users",
                                 unit="user", disable=not progress):
            counts["requests"] += req
            counts["errors"] += err
            counts["events"] += ev
    producer.flush()
    producer.close()
    return counts


def run_end_to_end(settings: EncoreSettings, *, progress: bool = True) -> dict:
    from features.kafka_io import make_producer
    from features.replay import open_source, replay

    t0 = time.monotonic()
    summary: dict = {"data_dir": str(settings.root)}
    with EmbeddedServices(settings) as services:
        kafka, mlflow_uri = services.kafka_bootstrap, services.mlflow_uri
        instance = dagster_instance(settings)

        # 1. replay the synthetic history, plus a few malformed messages that must land in the DLQ
        rep = replay(open_source("synthetic", settings), kafka, settings.topics.interactions, progress=progress,
                     kafka_options=settings.kafka.client_options())
        producer = make_producer(kafka, **settings.kafka.client_options())
        for bad in (b"{not json", b'{"event_id": "x", "user_id": -1}', b"[]"):
            producer.send(settings.topics.interactions, value=bad)
        producer.flush()
        producer.close()
        summary["replayed"] = rep.sent
        log.info("replayed %d events (%.0f/s)", rep.sent, rep.events_per_s)

        # 2. ingest and train through Dagster
        ing = run_job(settings, "ingest_job", instance)
        mat = _materialization(ing, "ingested_interactions")
        summary["ingest"] = {k: mat[k] for k in ("consumed", "written", "duplicates", "dlq")}
        tr = run_job(settings, "training_job", instance)
        trained = tr.output_for_node("trained_model")
        champion = tr.output_for_node("champion_model")
        summary["model"] = {"name": trained["config"]["model"], "test": trained["test_metrics"],
                            "version": champion["version"], "promotion": champion["reason"]}

        # 3. serve it and run the A/B test with simulated users
        server = start_server(settings, kafka, mlflow_uri)
        try:
            summary["ab_traffic"] = closed_loop(settings, server.endpoint, kafka, progress=progress)
        finally:
            server.stop()

        # 4. feedback back through Kafka into Feast, then the A/B analysis
        ing2 = run_job(settings, "ingest_job", instance)
        summary["feedback_ingest"] = {k: _materialization(ing2, "ingested_interactions")[k]
                                      for k in ("consumed", "written", "dlq")}
        ab = run_job(settings, "ab_report_job", instance).output_for_node("ab_report")
        summary["ab_report"] = {k: ab[k] for k in ("html", "headline", "tests", "srm_flagged", "guardrail_breaches")}
        summary["mlflow_uri"] = mlflow_uri
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    (settings.reports_dir).mkdir(parents=True, exist_ok=True)
    (settings.reports_dir / "last_run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        if mat.asset_key == dg.AssetKey(asset):
            return {k: v.value for k, v in mat.metadata.items()}
    raise KeyError(f"no materialization of {asset}")


def format_summary(summary: dict, settings: EncoreSettings) -> str:
    m = summary["model"]
    t = m["test"]
    lines = [
        "",
        "Encore end-to-end run complete",
        "==============================",
        f"events replayed            {summary['replayed']}",
        f"ingested                   {summary['ingest']['written']} stored, {summary['ingest']['dlq']} to DLQ "
        f"(of {summary['ingest']['consumed']} messages)",
        f"model                      {m['name']}  v{m['version']}  "
        + "  ".join(f"{k}={t[k]:.4f}" for k in ("hr@10", "ndcg@10", "mrr") if k in t),
        f"promotion                  {m['promotion']}",
        f"A/B traffic                {summary['ab_traffic']['requests']} requests, "
        f"{summary['ab_traffic']['errors']} errors, {summary['ab_traffic']['events']} feedback events",
        f"A/B result                 {summary['ab_report']['headline']}",
        f"A/B report                 {summary['ab_report']['html']}",
        f"run summary                {settings.reports_dir / 'last_run.json'}",
        f"wall time                  {summary['wall_s']} s",
        "",
        "Open the UIs:  encore ui     (Dagster at http://127.0.0.1:3000, MLflow at the printed address)",
        "",
    ]
    return "\n".join(lines)
