"""Closed-loop rollouts: a good model ramps to 50% and becomes champion; a planted harmful one is rolled back.

    encore bench rollout-loop [--data-dir DIR] [--users 2000] [--seed 0]

Everything is the platform's own road, really running: the synthetic history replayed into the embedded Kafka
broker, ingested by Dagster's ``ingest_job`` into Feast, two models trained by Dagster's ``training_job`` into
the MLflow registry (and a third planted there), ``encore serve`` as a real HTTP server reading the experiment store, simulated users (the
``MusicWorld``) calling it and reacting, their events back through Kafka and ``ingest_job``, and each look of the
rollout taken by Dagster's ``rollout_job`` (the run the ``rollout_sensor`` launches): ``rollout_guard`` (the
report, SRM and guardrails as blocking checks, a rollback at once) then ``rollout_step`` (advance, or decide and
promote through the gate). Nobody acts by hand between the looks.

The models:

- **v1**, the champion before the drill: the default recipe stopped after one epoch (a weaker model).
- **v2**, the good challenger: the default recipe trained in full; the offline gate passes it against v1, and
  since promotion waits for a person (``promotion.mode: manual``) it is not champion until the rollout decides.
- **v3**, the planted harm: v2 with its item vocabulary shuffled (an export bug: a loadable, fast, confident model
  that recommends items unrelated to each user's taste), registered last, so it holds ``challenger`` (taken
  from v2).

Two rollouts, one after the other, each a two-arm experiment (control ``alias:champion``, treatment
``version:N``) with the policy ``STEPS`` 1% → 5% → 25% → 50%, ``MIN_USERS`` new users per step, primary metric
``hit_rate`` and guardrail ``skip_rate``:

1. **good** (v2 against the champion v1): the bar is the ramp to 50%, a decision for the treatment, the gate,
   and v2 as ``champion``;
2. **harmful** (v3 against the new champion v2): the bar is a rollback before the ramp passes 5%, with every
   alias that held v3 (``challenger``) back on the version it replaced.

A *tick* is a simulated hour: a share ``ARRIVALS`` of the world's users arrive, each makes ``REQUESTS`` requests
and reacts to what is served; then ``ingest_job`` and ``rollout_job`` run. The timeline records each tick's
traffic, users per arm, the action with its reason, the primary and guardrail lifts with their confidence
sequences, and where the aliases point. The last stdout line is one JSON object; ``--out`` also writes the
timelines (JSON and a plot).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from infra.settings import EncoreSettings

log = logging.getLogger("encore.rollout_drill")

STEPS = [0.01, 0.05, 0.25, 0.5]
MIN_USERS = [10, 60, 150]  # new users (both arms) each step must see before the next
ARRIVALS = 0.25  # share of the world's users that arrive in a tick
REQUESTS = 2  # requests per arriving user per tick
MAX_TICKS = 24
PRIMARY, GUARDRAIL = "hit_rate", "skip_rate"
PLAN = {"mde": 0.10, "alpha": 0.05}  # a 10% relative change of the primary metric, the plan's horizon from it


@dataclass
class Tick:
    """One simulated hour of a rollout: what was served, what the rollout saw, what it did."""

    tick: int
    traffic: float
    requests: int
    treatment_requests: int
    treatment_fallbacks: int  # treatment requests not answered by the treatment's version (should be 0)
    users: dict[str, int]
    action: str
    reason: str
    to_traffic: float
    primary_lift: float | None
    primary_cs: tuple[float | None, float | None]
    guardrail_lift: float | None
    guardrail_cs: tuple[float | None, float | None]
    checks: dict[str, bool]
    aliases: dict[str, int | None]
    effects: list[str] = field(default_factory=list)
    seconds: float = 0.0


def loop_settings(data_dir: Path, users: int, seed: int) -> EncoreSettings:
    """The drill's platform: the default world at ``users`` users, promotion by a person (or a rollout)."""
    return EncoreSettings(
        data_dir=data_dir,
        simulator={"users": users, "seed": 7 + seed},
        promotion={"mode": "manual"},
    )


def train_models(settings: EncoreSettings, instance: Any, tracking: str, say: Callable[[str], None]) -> dict:
    """v1 (one epoch, then champion by hand: the platform's state before the drill) and v2 (the full recipe),
    both by Dagster's ``training_job``; v3 planted from v2 (``plant_harm``)."""
    from cli.models import run_training
    from models.lifecycle.promotion import promote
    from models.lifecycle.registry import Registry

    registry = Registry(tracking, settings.registry)
    out = {}
    for role, overrides in (("weak", {"epochs": 1}), ("good", {})):
        t0 = time.monotonic()
        s = settings.model_copy(update={"train": settings.train.model_copy(
            update={"overrides": {**settings.train.overrides, **overrides}})})
        summary = run_training(s, instance=instance, tracking=tracking)
        if summary.get("version") is None:
            raise RuntimeError(f"training the {role} model failed: {summary.get('reason')}")
        out[role] = {"version": int(summary["version"]), "gate_passed": summary.get("gate_passed"),
                     "gate_reason": summary.get("gate_reason"), "seconds": round(time.monotonic() - t0, 1)}
        say(f"{role} model: v{summary['version']} ({out[role]['seconds']} s; gate {summary.get('gate_reason')})")
        if role == "weak":
            promote(registry, out[role]["version"], reason="the champion before the drill", actor="drill")
    out["harmful"] = {"version": plant_harm(settings, tracking, out["good"]["version"]),
                      "planted_from": out["good"]["version"]}
    say(f"harmful model: v{out['harmful']['version']} (v{out['good']['version']} with its item vocabulary shuffled)")
    return out


def plant_harm(settings: EncoreSettings, tracking: str, good_version: int, seed: int = 0) -> int:
    """Register the good model with its item vocabulary shuffled: an export bug (ids written in another order
    than the one trained on) that leaves a loadable, fast, confident model recommending items unrelated to each
    user's taste. Registered like any version (``challenger`` moves to it), tagged as planted."""
    import pandas as pd

    from models.data import ItemVocab
    from models.lifecycle.registry import Registry
    from models.lifecycle.tracking import TRAINING, experiment_name, training_run

    registry = Registry(tracking, settings.registry)
    recommender, _ = registry.load(version=good_version)
    recommender.vocab = ItemVocab(np.random.default_rng(seed).permutation(recommender.vocab.raw_ids))
    # a run in the training pipeline's MLflow experiment, where every registered version's run lives
    with training_run(tracking, experiment_name(settings.mlflow_experiment, TRAINING),
                      run_name=f"planted-harm-from-v{good_version}", params={"planted_from": good_version},
                      tags={"encore.drill": "planted harm"}, system_metrics=False,
                      artifact_root=settings.mlflow_dir / "artifacts") as run:
        run_id = run.info.run_id
    sample = [int(i) for i in recommender.vocab.decode(list(range(1, min(len(recommender.vocab), 5) + 1)))]
    example = pd.DataFrame({"item_ids": [sample], "event_types": [["listen"] * len(sample)],
                            "timestamps_ms": [[1_700_000_000_000 + 60_000 * i for i in range(len(sample))]]})
    reg = registry.register(recommender, run_id=run_id, metrics={}, input_example=example, tags={
        "encore.drill": f"planted harm: version {good_version} with its item vocabulary shuffled"})
    return int(reg.version)


def _experiment(name: str, treatment: int) -> Any:  # noqa: ANN401 - experiments.assignment.Experiment
    from experiments.assignment import Experiment

    return Experiment.model_validate({
        "name": name, "traffic": 0.0,
        "variants": [{"name": "control", "weight": 0.5, "target": "alias:champion"},
                     {"name": "treatment", "weight": 0.5, "target": f"version:{treatment}"}],
        "plan": PLAN,
        "rollout": {"steps": STEPS, "min_users_per_step": MIN_USERS, "primary_metric": PRIMARY,
                    "guardrails": [GUARDRAIL], "on_decision": "promote"},
        "description": f"closed-loop rollout drill: version {treatment} against the champion",
    })


def serve_tick(settings: EncoreSettings, world: Any, url: str, producer: Any, users: list[int], treatment: int,
               rng: np.random.Generator) -> dict:
    """One simulated hour of traffic: arriving users call the service and react; their events go to Kafka."""
    from features.kafka_io import publish_events

    arriving = rng.choice(users, size=max(1, int(len(users) * ARRIVALS)), replace=False).tolist()
    counts = {"requests": 0, "treatment": 0, "fallbacks": 0, "errors": 0}

    def one(user_id: int) -> dict:
        c = {"requests": 0, "treatment": 0, "fallbacks": 0, "errors": 0}
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(REQUESTS):
                resp = client.post("/v1/recommendations", json={"user_id": int(user_id), "k": 10})
                c["requests"] += 1
                if resp.status_code != 200:
                    c["errors"] += 1
                    continue
                body = resp.json()
                if body["variant"] == "treatment":
                    c["treatment"] += 1
                    c["fallbacks"] += int(body["model_version"] != treatment)
                events = world.respond(int(user_id), body["items"], request_id=body["request_id"],
                                       variant=body["variant"] or "none", now_ms=int(time.time() * 1000))
                publish_events(producer, settings.topics.interactions, events)
        return c

    with ThreadPoolExecutor(max_workers=8) as pool:
        for c in pool.map(one, arriving):
            for k in counts:
                counts[k] += c[k]
    producer.flush()
    return counts


def rollout(settings: EncoreSettings, instance: Any, tracking: str, world: Any, url: str, producer: Any,
            name: str, treatment: int, rng: np.random.Generator, say: Callable[[str], None]) -> dict:
    """Create the experiment, then tick until the rollout acts to an end (stopped) or MAX_TICKS pass."""
    from cli.jobs import run_job
    from experiments.store import ExperimentStore
    from models.lifecycle.registry import Registry
    from orchestration.resources import MLflowResource

    store = ExperimentStore(settings.experiments_dir)
    registry = Registry(tracking, settings.registry)
    store.create(_experiment(name, treatment), actor="drill")
    instance.add_dynamic_partitions("rollouts", [name])
    users = list(world.users)
    timeline: list[Tick] = []
    resources = {"mlflow_server": MLflowResource(tracking_uri=tracking)}
    for tick in range(MAX_TICKS + 1):
        t0 = time.monotonic()
        exp = store.snapshot().get(name)
        traffic = exp.traffic_at()
        served = {"requests": 0, "treatment": 0, "fallbacks": 0}
        if tick > 0:  # tick 0 is the first look: it starts the ramp
            served = serve_tick(settings, world, url, producer, users, treatment, rng)
            run_job(settings, "ingest_job", instance, log_level="WARNING")
        action, effects, checks = look(settings, instance, name, resources)
        ev = action.get("evidence") or {}
        p, g = ev.get(PRIMARY) or {}, ev.get(GUARDRAIL) or {}
        row = Tick(
            tick=tick, traffic=traffic, requests=served["requests"], treatment_requests=served["treatment"],
            treatment_fallbacks=served["fallbacks"], users=_users(action), action=action["kind"],
            reason=action["reason"], to_traffic=action["to_traffic"], primary_lift=p.get("lift"),
            primary_cs=(p.get("lift_cs_low"), p.get("lift_cs_high")), guardrail_lift=g.get("lift"),
            guardrail_cs=(g.get("lift_cs_low"), g.get("lift_cs_high")), checks=checks,
            aliases={a: registry.alias_version(a) for a in (settings.registry.champion_alias,
                                                            settings.registry.challenger_alias)},
            effects=effects, seconds=round(time.monotonic() - t0, 1))
        timeline.append(row)
        say(f"  tick {tick:2d}  traffic {traffic:<5g} {row.action:<16} users {row.users}  "
            f"{PRIMARY} {_pct(row.primary_lift)}  {GUARDRAIL} {_pct(row.guardrail_lift)}  ({row.seconds} s)")
        if store.snapshot().get(name).status != "running":
            break
        time.sleep(settings.serve.experiments_poll_s * 1.5)  # the service re-reads the store within a poll
    final = store.snapshot().get(name)
    return {"experiment": name, "treatment": treatment, "status": final.status,
            "final_action": timeline[-1].action, "ticks": len(timeline),
            "max_traffic_served": max((t.traffic for t in timeline if t.requests), default=0.0),
            "aliases": timeline[-1].aliases, "timeline": [asdict(t) for t in timeline],
            "audit": [{k: r.get(k) for k in ("time", "actor", "action")} for r in store.audit(name)],
            "version_tags": {v: {k: val for k, val in registry.tags(v).items() if k.startswith("encore.rollout.")
                                 and ".log." not in k} for v in sorted({treatment, *[
                                     x for x in timeline[-1].aliases.values() if x]})}}


def look(settings: EncoreSettings, instance: Any, name: str, resources: dict) -> tuple[dict, list[str], dict[str, bool]]:
    """One look of the rollout: the Dagster run the ``rollout_sensor`` launches (``rollout_job`` on the
    experiment's partition), in this process. ``(action, effects, checks)`` from its materializations."""
    from cli.jobs import run_job

    result = run_job(settings, "rollout_job", instance, resources=resources, partition_key=name,
                     log_level="WARNING", raise_on_error=False)
    action: dict = {}
    effects: list[str] = []
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        meta = {k: v.value for k, v in mat.metadata.items()}
        action = meta.get("action_json") or action
        for key in ("applied", "effects"):
            if key in meta:
                effects += [line[2:] for line in str(meta[key]).splitlines() if line.startswith("- ")]
    checks = {ev.check_name: bool(ev.passed) for ev in result.get_asset_check_evaluations()}
    if not action:
        failures = [e.message for e in result.all_events if e.is_step_failure]
        raise RuntimeError(f"rollout_job for {name} materialised nothing: {failures}")
    return action, effects, checks


def _users(action: dict) -> dict[str, int]:
    return {"all": int(action.get("users", 0)), "in_step": int(action.get("users_in_step", 0))}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1%}"


def run(data_dir: Path, *, users: int, seed: int, say: Callable[[str], None]) -> dict:
    from cli.jobs import dagster_instance, run_job
    from features.kafka_io import make_producer
    from features.replay import open_source, replay
    from features.simulator import MusicWorld
    from infra.services import EmbeddedServices
    from serving.launch import start_server

    t0 = time.monotonic()
    settings = loop_settings(data_dir, users, seed)
    rng = np.random.default_rng(seed)
    with EmbeddedServices(settings) as services:
        kafka, tracking = services.kafka_bootstrap, services.mlflow_uri
        instance = dagster_instance(settings)
        rep = replay(open_source("synthetic", settings), kafka, settings.topics.interactions, progress=False,
                     kafka_options=settings.kafka.client_options())
        run_job(settings, "ingest_job", instance, log_level="WARNING")
        say(f"replayed and ingested {rep.sent} events of {users} users")
        models = train_models(settings, instance, tracking, say)
        world = MusicWorld(settings.simulator)
        producer = make_producer(kafka, **settings.kafka.client_options())
        server = start_server(settings, kafka, tracking, experiment="store")
        try:
            say(f"good rollout: v{models['good']['version']} against champion v{models['weak']['version']}")
            good = rollout(settings, instance, tracking, world, server.endpoint, producer, "drill-good",
                           models["good"]["version"], rng, say)
            say(f"harmful rollout: v{models['harmful']['version']} against champion v{good['aliases']['champion']}")
            harmful = rollout(settings, instance, tracking, world, server.endpoint, producer, "drill-harmful",
                              models["harmful"]["version"], rng, say)
        finally:
            server.stop()
            producer.close()
    h_roll = [t for t in harmful["timeline"] if t["action"] == "rollback"]
    g_final = good["timeline"][-1]
    summary = {
        "bench": "rollout_loop", "users": users, "seed": seed, "steps": STEPS, "min_users_per_step": MIN_USERS,
        "models": models,
        "harmful_rolled_back": bool(h_roll),
        "harmful_rollback_traffic": h_roll[0]["traffic"] if h_roll else None,
        "harmful_rolled_back_by_5pct": bool(h_roll) and h_roll[0]["traffic"] <= 0.05 + 1e-9,
        "harmful_challenger_restored_to": harmful["aliases"].get(settings.registry.challenger_alias),
        "good_reached_traffic": max(t["traffic"] for t in good["timeline"]),
        "good_decision": g_final["action"],
        "good_champion": good["aliases"].get(settings.registry.champion_alias),
        "good_promoted": good["aliases"].get(settings.registry.champion_alias) == models["good"]["version"],
        "treatment_fallbacks": sum(t["treatment_fallbacks"] for r in (harmful, good) for t in r["timeline"]),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    return {"summary": summary, "harmful": harmful, "good": good}


def timeline_png(result: dict, path: Path) -> Path:
    """Both rollouts side by side: traffic by tick with each action marked, and the primary metric's and the
    guardrail's lift with their confidence sequences (the band a decision waits for to leave 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("good", result["good"]), ("harmful", result["harmful"])]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex="col")
    marks = {"advance": ("^", "tab:blue"), "hold": (".", "grey"), "rollback": ("X", "tab:red"),
             "decide_treatment": ("*", "tab:green"), "decide_control": ("s", "tab:orange")}
    for col, (label, run) in enumerate(runs):
        ticks = run["timeline"]
        x = [t["tick"] for t in ticks]
        top, bottom = axes[0][col], axes[1][col]
        top.step(x, [t["traffic"] for t in ticks], where="post", color="black", lw=1)
        for kind, (marker, colour) in marks.items():  # each tick's action, at the traffic it was taken at
            at = [(t["tick"], t["traffic"]) for t in ticks if t["action"] == kind]
            if at:
                top.scatter(*zip(*at), marker=marker, color=colour, s=80 if marker in "X*" else 30, zorder=3,
                            label=kind)
        top.legend(fontsize=8, loc="upper left")
        top.axhline(0.05, color="tab:red", lw=0.6, ls=":")  # the harm bar: rolled back before the ramp passes 5%
        top.set_title(f"{label}: v{run['treatment']} ({run['final_action']})")
        top.set_ylabel("traffic share")
        lifts = [abs(t[f"{k}_lift"]) for t in ticks for k in ("primary", "guardrail") if t[f"{k}_lift"] is not None]
        cap = max([1.0, *lifts]) * 1.3  # a band with an endpoint far off (few users) is drawn up to here
        for metric, key, colour in ((PRIMARY, "primary", "tab:blue"), (GUARDRAIL, "guardrail", "tab:red")):
            pts = [(t["tick"], t[f"{key}_lift"], *t[f"{key}_cs"]) for t in ticks if t[f"{key}_lift"] is not None]
            if not pts:
                continue
            px, lift, lo, hi = zip(*pts)
            bottom.plot(px, lift, color=colour, marker="o", ms=3, label=f"{metric} lift")
            band = [(a, max(b, -1.0), min(c, cap)) for a, b, c in zip(px, lo, hi) if b is not None and c is not None]
            if band:
                bx, blo, bhi = zip(*band)
                bottom.fill_between(bx, blo, bhi, color=colour, alpha=0.15)
        bottom.axhline(0, color="black", lw=0.6)
        bottom.set_ylim(-1.05, cap)
        bottom.set_xlabel("tick (simulated hour)")
        bottom.set_ylabel("relative lift, confidence sequence")
        bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    import tempfile

    parser = argparse.ArgumentParser(prog="encore bench rollout-loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="the drill's platform (default: a temp dir)")
    parser.add_argument("--users", type=int, default=2000, help="users of the simulated world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the timelines (JSON) and a plot here")
    parser.add_argument("--replot", type=Path, default=None, metavar="DIR",
                        help="only redraw DIR/rollout-loop.png from DIR/rollout-loop.json")
    args = parser.parse_args(argv)
    if args.replot:
        print(timeline_png(json.loads((args.replot / "rollout-loop.json").read_text()),
                           args.replot / "rollout-loop.png"))
        return
    logging.basicConfig(level=logging.WARNING)
    say = lambda m: print(m, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.data_dir or Path(tmp) / "encore", users=args.users, seed=args.seed, say=say)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rollout-loop.json").write_text(json.dumps(result, indent=1, default=str))
        timeline_png(result, args.out / "rollout-loop.png")
    print(json.dumps(result["summary"], default=str))


if __name__ == "__main__":
    main()
