"""Closed loop for the ranking stage: the cascade (retrieval → ARGUS ranker) against retrieval alone, A/B.

    encore bench cascade-loop [--data-dir DIR] [--users 2500] [--requests 8] [--seed 0] [--quality-weight 1]

The platform's own road, really running, nothing by hand between the stages:

1. the synthetic history replayed into the embedded Kafka broker, Dagster's ``ingest_job`` into Feast, and
   ``training_job``: the ARGUS recipe (next item + feedback) becomes the champion retriever (v1);
2. ``encore serve`` with the settings' default experiment (champion against popularity): the simulated users
   (``MusicWorld``) call it, react to what they are shown, and their events return through Kafka. These
   slates and reactions are the ranker's training data (the popularity arm explores beyond what the retriever
   would show, as a production log's exploration traffic does);
3. ``ingest_job`` then ``ranking_job``: the champion's feedback head fine-tuned on the served slates, gated on
   the later requests, registered as ``encore-ranker`` and promoted to its ``champion``;
4. the default experiment stops and ``cascade-vs-retrieval`` starts in its layer (a new salt, so a fresh
   split): control = the champion retriever's top 10; treatment = the same retriever's top
   ``serve.retrieval_k`` (200) reranked by ``ranker: alias:champion``, top 10. Users arrive again;
5. ``ingest_job`` and the A/B report (``experiments.readout.read_report``): like rate and listening time per
   arm, Welch / delta-method tests with Benjamini–Hochberg correction across the report's metrics, SRM.

Before the A/B, ``paired_replay`` shows the same users both policies' slates with common random numbers (the
simulator's reactions, offline): the effect the A/B is looking for, free of between-user variance, which says
how many users an A/B needs to resolve it.

The world: ``--quality-weight`` (default 1) gives each track a hidden quality that moves reactions but never
choices (``features/simulator.py``). At 0, the platform's default world, a reaction is a function of the same
score that draws the choices, which the retriever already learns: a reaction-trained ranker has nothing to add
there, and the loop measures it level.

The bar: the cascade beats retrieval alone on like rate and listening time, significant after correction,
with no SRM. The LAST stdout line is one JSON object (``bench: cascade-loop``): the ranker's offline figures,
each metric's arm means, lift, interval and adjusted p, the SRM p, requests and errors, and seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from infra.settings import EncoreSettings

log = logging.getLogger("encore.cascade_drill")

EXPERIMENT = "cascade-vs-retrieval"
METRICS = ("like_rate", "listening_time", "hit_rate", "skip_rate")
BAR = ("like_rate", "listening_time")


def drill_settings(data_dir: Path, users: int, requests: int, seed: int, quality_weight: float = 0.0) -> EncoreSettings:
    """The default world at ``users`` users (tracks' hidden quality at ``quality_weight``), each making
    ``requests`` requests per traffic phase."""
    return EncoreSettings(data_dir=data_dir,
                          simulator={"users": users, "seed": 7 + seed, "quality_weight": quality_weight},
                          experiment={"users": users, "requests_per_user": requests,
                                      "salt": f"cascade-drill-warmup-{seed}"})


def cascade_experiment(seed: int) -> Any:  # noqa: ANN401 - experiments.assignment.Experiment
    from experiments.assignment import Experiment

    return Experiment.model_validate({
        "name": EXPERIMENT, "salt": f"cascade-drill-{seed}",
        "variants": [{"name": "control", "weight": 0.5, "target": "alias:champion"},
                     {"name": "treatment", "weight": 0.5, "target": "alias:champion", "ranker": "alias:champion"}],
        "description": "the cascade (retrieval top 200 → ARGUS ranker → 10) against retrieval's own top 10",
    })


def _wait_for_experiment(url: str, name: str, timeout_s: float = 60.0) -> None:
    """Until the service assigns requests to ``name`` (it holds a new experiment back until its models load)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.post(f"{url}/v1/recommendations", json={"user_id": 0, "k": 1}, timeout=10).json()
        if body.get("experiment") == name:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the service did not put {name!r} in force within {timeout_s:.0f} s")


def _metric_row(report: Any, metric: str) -> dict:
    t = report.test(metric)
    r = t.result
    return {"control": r.mean_a, "treatment": r.mean_b, "lift": r.rel_lift, "lift_ci": [r.rel_lift_ci_low,
            r.rel_lift_ci_high], "diff_ci": [r.ci_low, r.ci_high], "p": r.p_value, "p_adjusted": t.p_adjusted,
            "significant": t.significant}


def paired_replay(settings: EncoreSettings, tracking: str, *, users: int, requests: int, seed: int = 0) -> dict:
    """The same users, the same random draws, both policies: the effect the A/B is looking for, without the
    between-user variance an A/B has to average out.

    For ``users`` users (histories: the offline store's last ``ingest.history_length`` events, as serving reads
    them), each policy's top 10 (retrieval alone; the cascade with the champion ranker) is shown ``requests``
    times to the simulator with common random numbers (``MusicWorld.respond(rng_key=...)``). Per user, likes
    and listening time per request; the paired difference, relative to retrieval, with a 95% bootstrap interval
    over users. This is offline evaluation on the simulator's known reaction model, not an experiment."""
    from features.offline_read import read_interactions
    from features.simulator import MusicWorld
    from models.lifecycle.registry import Registry
    from serving.cascade import rerank, retrieval_temperature

    world = MusicWorld(settings.simulator)
    retriever, _ = Registry(tracking, settings.registry).load(alias=settings.registry.champion_alias)
    ranker, _ = Registry(tracking, settings.registry.for_rankers()).load(alias=settings.registry.champion_alias)
    ids = list(world.users)[:users]
    ev = read_interactions(settings, columns=["user_id", "item_id", "event_type", "timestamp_ms"])
    ev = ev[ev["user_id"].isin(ids)]
    n = settings.ingest.history_length
    hist = {int(u): {"user_id": int(u), "item_ids": g["item_id"].tolist()[-n:], "event_types": g["event_type"].tolist()[-n:],
                     "timestamps_ms": g["timestamp_ms"].tolist()[-n:]} for u, g in ev.groupby("user_id")}
    ids = [u for u in ids if u in hist]
    now_ms = int(time.time() * 1000)
    histories = [hist[u] for u in ids]
    recs = retriever.recommend(histories, k=settings.serve.retrieval_k, now_ms=now_ms)
    cascade = rerank(ranker, histories, recs, k=[10] * len(ids), weights=settings.serve.cascade_weights,
                     temperature=retrieval_temperature(retriever), now_ms=now_ms)
    slates = {"retrieval": [[i for i, _ in r[:10]] for r in recs], "cascade": [[i for i, _ in c.items] for c in cascade]}
    per_user = {}
    for policy, lists in slates.items():
        likes, listening = np.zeros(len(ids)), np.zeros(len(ids))
        for j, (u, items) in enumerate(zip(ids, lists)):
            for r in range(requests):
                events = world.respond(u, items, request_id=f"replay-{policy}", variant=policy, now_ms=now_ms,
                                       rng_key=f"replay-{seed}-{u}-{r}")
                likes[j] += sum(str(getattr(e.event_type, "value", e.event_type)) == "like" for e in events)
                listening[j] += sum(float(e.played_ratio or 0.0) for e in events)
        per_user[policy] = {"like_rate": likes / requests, "listening_time": listening / requests}
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, len(ids), size=(2000, len(ids)))
    out: dict[str, Any] = {"users": len(ids), "requests_per_user": requests}
    for metric in ("like_rate", "listening_time"):
        a, b = per_user["retrieval"][metric], per_user["cascade"][metric]
        base = a[boot].mean(1)
        lifts = np.divide(b[boot].mean(1), base, out=np.full(len(base), np.nan), where=base > 0) - 1
        lift = float(b.mean() / a.mean() - 1) if a.mean() > 0 else None  # none: retrieval drew no like at all
        ci = [float(np.nanquantile(lifts, q)) for q in (0.025, 0.975)] if np.isfinite(lifts).any() else [None, None]
        out[metric] = {"retrieval": float(a.mean()), "cascade": float(b.mean()), "lift": lift, "lift_ci": ci}
    return out


def run_cascade_loop(settings: EncoreSettings, *, seed: int = 0, say: Callable[[str], None] = print) -> dict:
    from cli.jobs import dagster_instance, run_job
    from cli.run import closed_loop, ranker_summary
    from experiments.readout import read_report
    from experiments.store import ExperimentStore
    from features.replay import open_source, replay
    from infra.services import EmbeddedServices
    from serving.launch import start_server

    seconds: dict[str, float] = {}
    out: dict[str, Any] = {"bench": "cascade-loop", "users": settings.simulator.users,
                           "quality_weight": settings.simulator.quality_weight,
                           "requests_per_user": settings.experiment.requests_per_user, "seed": seed}
    t_all = time.monotonic()
    with EmbeddedServices(settings) as svc:
        kafka, mlflow_uri = svc.kafka_bootstrap, svc.mlflow_uri
        instance = dagster_instance(settings)

        t0 = time.monotonic()
        replay(open_source("synthetic", settings), kafka, settings.topics.interactions, progress=False,
               kafka_options=settings.kafka.client_options())
        run_job(settings, "ingest_job", instance, log_level="WARNING")
        tr = run_job(settings, "training_job", instance, log_level="WARNING")
        out["retriever"] = {"version": tr.output_for_node("champion_model")["version"],
                            "test": tr.output_for_node("trained_model")["test_metrics"]}
        seconds["history_and_retriever"] = round(time.monotonic() - t0, 1)
        say(f"retriever v{out['retriever']['version']} champion ({seconds['history_and_retriever']} s)")

        server = start_server(settings, kafka, mlflow_uri)
        try:
            t0 = time.monotonic()
            out["warmup_traffic"] = closed_loop(settings, server.endpoint, kafka, progress=False)
            run_job(settings, "ingest_job", instance, log_level="WARNING")
            out["ranker"] = ranker_summary(run_job(settings, "ranking_job", instance, log_level="WARNING",
                                                   raise_on_error=False))
            seconds["warmup_and_ranker"] = round(time.monotonic() - t0, 1)
            say(f"ranker: {json.dumps(out['ranker'])} ({seconds['warmup_and_ranker']} s)")
            if not out["ranker"].get("promoted"):
                out["bar_met"] = False
                out["why"] = "the ranker was not promoted, so there is no cascade to test"
                return out
            t0 = time.monotonic()
            out["paired_replay"] = paired_replay(settings, mlflow_uri, users=settings.simulator.users,
                                                 requests=settings.experiment.requests_per_user, seed=seed)
            seconds["paired_replay"] = round(time.monotonic() - t0, 1)
            say(f"paired replay: {json.dumps(out['paired_replay'])} ({seconds['paired_replay']} s)")

            t0 = time.monotonic()
            store = ExperimentStore(settings.experiments_dir)
            store.set_status(settings.experiment.name, "stopped", actor="drill")
            store.create(cascade_experiment(seed), actor="drill")
            _wait_for_experiment(server.endpoint, EXPERIMENT)
            out["ab_traffic"] = closed_loop(settings, server.endpoint, kafka, progress=False)
            seconds["ab_traffic"] = round(time.monotonic() - t0, 1)
            say(f"A/B traffic: {out['ab_traffic']} ({seconds['ab_traffic']} s)")
        finally:
            server.stop()

        t0 = time.monotonic()
        run_job(settings, "ingest_job", instance, log_level="WARNING")
        _, report, analysed = read_report(settings, kafka, EXPERIMENT)
        seconds["report"] = round(time.monotonic() - t0, 1)
    out["exposures"] = analysed
    out["users_per_arm"] = {v.variant: v.users for v in report.variants}
    out["srm_p"] = report.srm.p_value
    out["srm_flagged"] = report.srm.flagged
    out["metrics"] = {m: _metric_row(report, m) for m in METRICS if any(t.metric == m for t in report.tests)}
    out["bar_met"] = (not report.srm.flagged) and all(
        out["metrics"][m]["significant"] and out["metrics"][m]["lift"] is not None and out["metrics"][m]["lift"] > 0
        for m in BAR)
    seconds["total"] = round(time.monotonic() - t_all, 1)
    out["seconds"] = seconds
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="encore bench cascade-loop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="the platform's data dir (default: a temporary one)")
    ap.add_argument("--users", type=int, default=2500, help="simulated users (each arrives in both traffic phases)")
    ap.add_argument("--requests", type=int, default=8, help="requests per user per traffic phase")
    ap.add_argument("--seed", type=int, default=0, help="the world's seed (7 + seed) and the experiment's salt")
    ap.add_argument("--quality-weight", type=float, default=1.0,
                    help="tracks' hidden quality in reactions (simulator.quality_weight). 0 is the default world, "
                         "where reactions follow the choice model alone and a reaction-trained ranker has "
                         "nothing to add to a next-item retriever")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="encore-cascade-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "encore"
        settings = drill_settings(data_dir, args.users, args.requests, args.seed, args.quality_weight)
        result = run_cascade_loop(settings, seed=args.seed, say=lambda s: print(s, file=sys.stderr, flush=True))
    result["argv"] = sys.argv[1:] if argv is None else argv
    print(json.dumps(result, default=str))
    return 0 if result.get("bar_met") else 1


if __name__ == "__main__":
    raise SystemExit(main())
