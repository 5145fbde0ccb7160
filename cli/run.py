"""The end-to-end road, as ``encore run`` (and ``make run``) drives it.

replay → Kafka → Dagster ``ingest_job`` (Feast offline + online) and ``attributes_job`` (the tracks' genres
and albums into Feast, for the rankers) → Dagster ``training_job`` (snapshot →
TorchRec model → MLflow run + registry → promotion gate) → ``encore serve`` (a real HTTP server) →
simulated users under a two-arm A/B split call it and react → their feedback returns through Kafka →
``ingest_job`` again → ``ab_report_job`` (per-arm metrics with confidence intervals).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import httpx
from tqdm import tqdm

from cli.jobs import dagster_instance, run_job
from infra.services import EmbeddedServices
from infra.settings import EncoreSettings
from serving.launch import start_server

log = logging.getLogger("encore.run")


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

        # 2. ingest (events, and the tracks' genres and albums for the rankers) and train through Dagster
        ing = run_job(settings, "ingest_job", instance)
        attrs = _materialization(run_job(settings, "attributes_job", instance), "entity_attributes")
        summary["attributes"] = {k: attrs[k] for k in ("items_read", "item_rows_written")}
        mat = _materialization(ing, "ingested_interactions")
        summary["ingest"] = {k: mat[k] for k in ("consumed", "written", "duplicates", "dlq")}
        tr = run_job(settings, "training_job", instance)
        trained = tr.output_for_node("trained_model")
        champion = tr.output_for_node("champion_model")
        summary["model"] = {"name": trained["family"], "test": trained["test_metrics"],
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

        # 5. the ranking stage: the A/B test's served slates and their reactions fine-tune the champion's ARGUS
        # head into a ranker, gated and registered (a blocked gate is an outcome, not a failed run)
        summary["ranker"] = ranker_summary(run_job(settings, "ranking_job", instance, raise_on_error=False))
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


def ranker_summary(result: dg.ExecuteInProcessResult) -> dict:
    """What ``ranking_job`` did: the ranker's test AUC beside the head it started from, its version and the gate."""
    out: dict = {"success": result.success}
    try:
        ev = result.output_for_node("ranker_evaluation")["evaluation"]
        out.update(task=ev["task"], auc=ev["ranker"]["auc"],
                   base_auc=ev["base"]["auc"] if "base" in ev else None,  # ARGUS only: the head it started from
                   popularity_auc=ev["popularity"]["auc"], test_examples=ev["examples"])
        out["version"] = result.output_for_node("registered_ranker")["version"]
    except Exception:  # noqa: BLE001 - a step before these failed: its error is the story
        pass
    gate = [e for e in result.get_asset_check_evaluations() if e.check_name == "ranker_gate"]
    if gate:
        out["gate"] = gate[0].description or ("passed" if gate[0].passed else "blocked")
        out["promoted"] = bool(gate[0].passed and result.success)
    failures = [e.message for e in result.all_events if e.is_step_failure]
    if failures:
        out["error"] = failures[0]
    return out


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
        f"attributes                 {summary['attributes']['items_read']} tracks' genres and albums in Feast "
        f"({summary['attributes']['item_rows_written']} rows new or changed)",
        f"model                      {m['name']}  v{m['version']}  "
        + "  ".join(f"{k}={t[k]:.4f}" for k in ("hr@10", "ndcg@10", "mrr") if k in t),
        f"promotion                  {m['promotion']}",
        f"A/B traffic                {summary['ab_traffic']['requests']} requests, "
        f"{summary['ab_traffic']['errors']} errors, {summary['ab_traffic']['events']} feedback events",
        f"A/B result                 {summary['ab_report']['headline']}",
        f"A/B report                 {summary['ab_report']['html']}",
        f"ranker                     {_ranker_line(summary.get('ranker', {}))}",
        f"run summary                {settings.reports_dir / 'last_run.json'}",
        f"wall time                  {summary['wall_s']} s",
        "",
        "Open the UIs:  encore ui     (Dagster at http://127.0.0.1:3000, MLflow at the printed address)",
        "",
    ]
    return "\n".join(lines)


def _ranker_line(r: dict) -> str:
    if "auc" not in r:
        return f"not trained ({r.get('error', 'see the ranking_job run in Dagster')})"
    head = f"pre-trained head {r['base_auc']:.4f}, " if r.get("base_auc") is not None else ""
    return (f"v{r.get('version', '?')}  {r['task']} AUC {r['auc']:.4f} ({head}popularity {r['popularity_auc']:.4f}); "
            f"gate: {r.get('gate', 'not run')}")
